"""The processor completes a tokenizer as the official VLChatProcessor does: image tags it lacks are added as
special tokens in the official order (so they get the ids the official code gives them), the pad token falls
back to EOS, and processor_config.json names the tags. Files that are really broken get one clear error."""
import json
import shutil

import pytest
from transformers import PreTrainedTokenizerFast

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.janusflow.pipeline import JanusFlowPipeline
from rfserve.model_zoo.janusflow.processor import (BOS, EOS, GEN_TAG, IMAGE_END, IMAGE_START, IMAGE_TAG, JanusFlowProcessor,
                                                   USER, sft_prompt)
from rfserve.model_zoo.janusflow.random_checkpoint import build_tokenizer
from rfserve.model_zoo.loading import CheckpointError

OFFICIAL_ORDER = (IMAGE_TAG, GEN_TAG, IMAGE_START, IMAGE_END)


@pytest.fixture
def bare_tokenizer_checkpoint(tiny_janus, tmp_path):
    """The tiny checkpoint with a tokenizer that has BOS and EOS only, as the published special-token map
    suggests, and four ids short of the model's vocabulary so the added tags fit its embedding table."""
    root = tmp_path / "janusflow"
    shutil.copytree(tiny_janus, root)
    vocab = json.loads((root / "config.json").read_text())["language_config"]["vocab_size"]
    tok = build_tokenizer(vocab_size=vocab - 4, special_tokens=(BOS, EOS))
    assert tok.get_vocab_size() <= vocab - 4
    tok.save(str(root / "tokenizer.json"))
    return root


def _official_ids(root, prompt: str, num_image_tokens: int) -> list[int]:
    """What VLChatProcessor gives: tags added in its order, then BOS + encode, each image tag expanded."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"))
    for tag in OFFICIAL_ORDER:
        if tag not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": [tag]})
    vocab = tok.get_vocab()
    out = []
    for t in [vocab[BOS]] + tok.encode(prompt, add_special_tokens=False):
        out += [vocab[IMAGE_START]] + [vocab[IMAGE_TAG]] * num_image_tokens + [vocab[IMAGE_END]] \
            if t == vocab[IMAGE_TAG] else [t]
    return out


def test_missing_tags_are_added_with_the_official_ids(bare_tokenizer_checkpoint):
    pipe = JanusFlowPipeline.from_pretrained(bare_tokenizer_checkpoint)
    proc = pipe.parts.processor
    size = PreTrainedTokenizerFast(tokenizer_file=str(bare_tokenizer_checkpoint / "tokenizer.json")).vocab_size
    assert [proc.tokenizer.get_vocab()[t] for t in OFFICIAL_ORDER] == list(range(size, size + 4))
    assert proc.pad_id == proc.eos_id                                  # no pad token: EOS pads, as officially
    prompt = sft_prompt([(USER, f"{IMAGE_TAG}\nwhat is this?")], system="a system prompt")
    ids, positions = proc.chat_ids(prompt)
    assert ids == _official_ids(bare_tokenizer_checkpoint, prompt, proc.num_image_tokens)
    assert positions == [ids.index(proc.image_start_id) + k for k in range(1 + proc.num_image_tokens)]
    assert proc.t2i_prefix("a red circle") == _official_ids(
        bare_tokenizer_checkpoint, sft_prompt([(USER, "a red circle")], system="") + IMAGE_START, 0)[:-1]
    w, h = pipe.default_size
    out = pipe.run([ImageSpec("a red circle", "", 1, w, h, 2, 2.0)])     # the added ids index the embeddings
    assert out.images.shape == (1, h, w, 3)


def test_processor_config_names_the_tags(bare_tokenizer_checkpoint):
    cfg_path = bare_tokenizer_checkpoint / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "image_tag": "<img>", "image_start_tag": "<img_start>"}))
    proc = JanusFlowProcessor.load(bare_tokenizer_checkpoint, cfg["num_image_tokens"])
    vocab = proc.tokenizer.get_vocab()
    assert proc.image_id == vocab["<img>"] and proc.image_start_id == vocab["<img_start>"]
    assert proc.tags.image == "<img>" and proc.reserved_in("look: <img>") == "<img>"
    ids, _ = proc.chat_ids("<img>\nhi")
    assert ids[:3] == [proc.bos_id, vocab["<img_start>"], vocab["<img>"]]


@pytest.mark.parametrize("change,needle", [({"num_image_tokens": 7}, "num_image_tokens is 7"),
                                           ({"add_special_token": True}, "add_special_token")])
def test_processor_config_we_cannot_honour_is_refused(bare_tokenizer_checkpoint, change, needle):
    cfg_path = bare_tokenizer_checkpoint / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=needle) as err:
        JanusFlowProcessor.load(bare_tokenizer_checkpoint, cfg["num_image_tokens"])
    assert "processor_config.json" in str(err.value)


def test_a_tokenizer_without_eos_is_refused(tiny_janus, tmp_path):
    root = tmp_path / "janusflow"
    shutil.copytree(tiny_janus, root)
    build_tokenizer(special_tokens=(BOS,)).save(str(root / "tokenizer.json"))
    tokens = json.loads((root / "processor_config.json").read_text())["num_image_tokens"]
    with pytest.raises(CheckpointError, match=r"lacks the special token\(s\) \['<｜end▁of▁sentence｜>'\]"):
        JanusFlowProcessor.load(root, tokens)
