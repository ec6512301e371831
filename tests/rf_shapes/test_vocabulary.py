"""What rf-shapes tells clients it understands: the training captions' words, and which prompt words it does not."""
import numpy as np

from rfserve.model_zoo.presets import PRESETS
from rfserve.model_zoo.rf_shapes.data import COLOURS, SHAPES, WORD_COUNTS, all_scenes, parse_caption
from rfserve.model_zoo.rf_shapes.tokenizer import build_tokenizer
from rfserve.model_zoo.rf_shapes.vocabulary import FILLERS, VOCABULARY


def test_the_groups_are_the_training_grammars():
    assert (VOCABULARY.colours, VOCABULARY.shapes, VOCABULARY.counts) == (COLOURS, SHAPES, tuple(WORD_COUNTS))
    scenes = all_scenes(False) + all_scenes(True)
    assert set(VOCABULARY.backgrounds) == {s.background for s in scenes}
    assert all(parse_caption(e) for e in VOCABULARY.examples)        # raises for one outside the grammar
    assert PRESETS["rf-shapes"].vocabulary is PRESETS["rf-shapes-2rf"].vocabulary is VOCABULARY
    assert PRESETS["instaflow-0.9b"].vocabulary is None


def test_no_caption_the_model_was_trained_on_warns():
    rng = np.random.default_rng(0)
    for scene in all_scenes(False) + all_scenes(True):
        for _ in range(2):                                            # "a" and "one" both say one
            assert VOCABULARY.unknown(scene.caption(rng)) == [], scene


def test_fillers_are_words_the_model_reads_as_unknown():
    """A filler draws no warning though the tokenizer has no id for it: it asks for nothing to be drawn."""
    tok = build_tokenizer()
    for word in FILLERS:
        assert tok(word, add_special_tokens=False).input_ids == [tok.unk_token_id], word


def test_content_words_outside_the_grammar_are_named_once_in_order():
    assert VOCABULARY.unknown("a cat") == ["cat"]
    assert VOCABULARY.unknown("Two yellow STARS and a cat, with the stars on a pink background.") == [
        "stars", "cat", "pink"]
    assert VOCABULARY.unknown("2 red circles") == ["2"]                # the model knows counts as words only
    assert VOCABULARY.unknown("The red circles, on an orange background!") == []
