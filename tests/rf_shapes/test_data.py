"""The procedural dataset, caption grammar, tokenizer and geometric checker (no checkpoints needed)."""
import numpy as np
import pytest

from rfserve.model_zoo.rf_shapes.checker import FEATURE_DIM, check, read
from rfserve.model_zoo.rf_shapes.data import HELD_OUT, SHAPES, Scene, all_scenes, make_batch, parse_caption, render
from rfserve.model_zoo.rf_shapes.tokenizer import build_tokenizer


def test_dataset_is_deterministic_by_seed():
    a, scenes_a, caps_a = make_batch(3, 16)
    b, scenes_b, caps_b = make_batch(3, 16)
    c, _, _ = make_batch(4, 16)
    assert a.dtype == np.uint8 and a.shape == (16, 64, 64, 3)
    assert np.array_equal(a, b) and scenes_a == scenes_b and caps_a == caps_b
    assert not np.array_equal(a, c)


def test_splits_partition_the_held_out_triples():
    train, held = all_scenes(held_out=False), all_scenes(held_out=True)
    assert not any(s.held_out for s in train) and all(s.held_out for s in held)
    assert {(s.colour, s.shape, s.background) for s in held} == HELD_OUT
    # Every held-out colour, shape and background still occurs in training.
    for c, s, b in HELD_OUT:
        assert any(t.colour == c for t in train) and any(t.shape == s for t in train)
        assert any(t.background == b for t in train)
    _, scenes, _ = make_batch(0, 64, held_out=True)
    assert all(s.held_out for s in scenes)


def test_captions_round_trip_and_tokenize_without_unknowns():
    tok = build_tokenizer()
    rng = np.random.default_rng(0)
    for scene in all_scenes(False) + all_scenes(True):
        caption = scene.caption(rng)
        assert parse_caption(caption) == scene
        ids = tok(caption).input_ids
        assert tok.unk_token_id not in ids and len(ids) <= tok.model_max_length
    with pytest.raises(ValueError):
        parse_caption("four red circles on a blue background")


@pytest.mark.parametrize("held_out", [False, True])
def test_checker_accuracy_on_procedural_images(held_out):
    images, scenes, _ = make_batch(77, 150, held_out=held_out)
    acc = check(images, scenes)
    assert acc["all"] >= 0.98, acc
    features = read(images[0]).features
    assert features.shape == (FEATURE_DIM,) and np.isfinite(features).all()


def test_checker_rejects_the_wrong_caption():
    rng = np.random.default_rng(5)
    for shape, other in zip(SHAPES, SHAPES[1:] + SHAPES[:1]):
        image = render(Scene("yellow", shape, 2, "blue"), rng)
        verdict = read(image).matches(Scene("red", other, 3, "green"))
        assert not any(verdict.values()), verdict
