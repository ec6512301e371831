"""The tiny checkpoint loads through our loader and the registry; missing files are one clear error."""
import shutil

import pytest

from rfserve.model_zoo.janus.random_checkpoint import BOI, IMAGE
from rfserve.model_zoo.loading import CheckpointError
from rfserve.model_zoo.presets import PRESETS
from rfserve.model_zoo.registry import load_model, parse_spec


def test_loads_through_the_registry(tiny_janus):
    import torch

    loaded = load_model(parse_spec(f"janus-pro-1b={tiny_janus}?temperature=0"), torch.device("cpu"), torch.float32)
    card, pipe = loaded.card, loaded.pipeline
    assert loaded.chat is not None and PRESETS["janus-pro-1b"].chats       # as `rfserve serve -h` says
    assert (card.family, card.sizes, card.defaults.size) == ("janus", ("16x16",), "16x16")
    assert (card.defaults.steps, card.max_steps, card.defaults.guidance) == (1, 1, 5.0)
    assert not card.supports_negative_prompt
    assert pipe.temperature == 0 and pipe.parts.num_image_tokens == 16
    tok = pipe.parts.tokenizer
    assert pipe.parts.keep_ids == (tok.bos_token_id, tok.convert_tokens_to_ids(BOI))
    assert pipe.parts.model.config.image_token_id == tok.convert_tokens_to_ids(IMAGE)


def test_prompt_is_the_processors(janus_pipe):
    """BOS, the template's user turn and generation prompt, then BOI, as JanusProcessor builds it."""
    tok = janus_pipe.parts.tokenizer
    ids = janus_pipe.prompt_ids(["a cat"])[0][0]
    assert tok.decode(ids) == f"{tok.bos_token}<|User|>: a cat\n\n<|Assistant|>:{BOI}"
    assert janus_pipe.prompt_tokens("a cat") == len(ids)


def test_long_prompt_is_cut(janus_pipe):
    prompt = "a photo of a cat " * 200
    ids, truncated = janus_pipe.prompt_ids([prompt, "a cat"])
    assert truncated == [True, False]
    assert len(ids[0]) + janus_pipe.parts.num_image_tokens <= janus_pipe.parts.context_length
    assert len(janus_pipe.kept_prompt(prompt)) < len(prompt)


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json", "tokenizer.json"])
def test_missing_file_is_named(tiny_janus, tmp_path, missing):
    from rfserve.model_zoo.janus.loading import load_parts

    copy = shutil.copytree(tiny_janus, tmp_path / "ckpt")
    (copy / missing).unlink()
    with pytest.raises(CheckpointError, match=f"missing file: .*{missing}"):
        load_parts(copy)
