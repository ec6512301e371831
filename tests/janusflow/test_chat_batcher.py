"""Continuous batching: greedy tokens equal transformers `generate()` for each request, while
requests of different lengths join and leave the running batch."""
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from rfserve.model_zoo.janusflow.decoder import JanusFlowChat
from rfserve.model_zoo.janusflow.processor import IMAGE_TAG, SYSTEM_PROMPT, USER, sft_prompt
from rfserve.server.chat.batcher import ChatSequence, ContinuousBatcher
from rfserve.server.chat.detok import TextStream


def prompt_inputs(parts, text: str, images: list[Image.Image]):
    proc = parts.processor
    content = "\n".join([IMAGE_TAG] * len(images) + [text])      # the demo's "<image_placeholder>\n{question}"
    ids, positions = proc.chat_ids(sft_prompt([(USER, content)], SYSTEM_PROMPT))
    pixels = proc.pixels(images) if images else None
    return ids, pixels, positions


def hf_generate(parts, ids, pixels, positions, max_new: int) -> list[int]:
    """The README call: `language_model.generate(inputs_embeds=..., do_sample=False)`."""
    model, eos = parts.model, parts.processor.eos_id
    embeds = model.embed_prompt(torch.tensor(ids), pixels, torch.tensor(positions, dtype=torch.long))
    out = model.language_model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(ids)),
                                        max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                                        pad_token_id=eos, bos_token_id=parts.processor.bos_id)
    tokens = out[0].tolist()
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


class Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event.finish_reason:
            self.done.set()


def make_seq(parts, text, images, max_tokens, **kw):
    ids, pixels, positions = prompt_inputs(parts, text, images)
    sink = Collector()
    seq = ChatSequence(ids, pixels, positions, max_tokens, kw.get("temperature", 0.0), 1.0, kw.get("stop", []),
                       None, sink)
    return seq, sink


@pytest.mark.timeout(120)
def test_greedy_tokens_equal_generate_while_requests_join_and_leave(janus_pipe):
    parts = janus_pipe.parts
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (20, 12, 3), dtype=np.uint8))
    requests = [("hi", [], 8), ("describe the image in detail please", [image], 12),
                ("what color is the sky", [], 9), ("a longer question about numbers 0 1 2 3 4", [], 10)]
    batcher = ContinuousBatcher(JanusFlowChat(parts).decoder(slots=3, max_len=256), parts.tokenizer,
                                parts.processor.eos_id).start()
    try:
        seqs = [make_seq(parts, t, im, n) for t, im, n in requests]
        for seq, _ in seqs[:2]:
            batcher.submit(seq)
        deadline = time.monotonic() + 30
        while batcher.load[0] < 2 and time.monotonic() < deadline:   # both admitted (prefill is one at a time)
            time.sleep(0.001)
        assert batcher.load[0] == 2                       # two running when the others arrive
        for seq, _ in seqs[2:]:
            batcher.submit(seq)
        for _, sink in seqs:
            assert sink.done.wait(60)
    finally:
        batcher.close()
    assert batcher.load == (0, 0)
    assert len({len(s.ids) for s, _ in seqs}) == 4
    for (seq, sink), (text, images, n) in zip(seqs, requests):
        ids, pixels, positions = prompt_inputs(parts, text, images)
        want = hf_generate(parts, ids, pixels, positions, n)
        assert seq.generated == want, text
        assert sink.events[-1].completion_tokens == len(want)
        assert sink.events[-1].prompt_tokens == len(ids)
        streamed = "".join(e.delta for e in sink.events)
        assert streamed == parts.processor.decode(want)


def test_cancel_frees_the_slot(janus_pipe):
    """A sequence cancelled mid-decode leaves at the next step, without finishing."""
    parts = janus_pipe.parts
    batcher = ContinuousBatcher(JanusFlowChat(parts).decoder(slots=2, max_len=256), parts.tokenizer,
                                parts.processor.eos_id).start()
    try:
        seq, sink = make_seq(parts, "write a short poem about the sea", [], 100, temperature=1.0)
        seq.fault = ("hang", 0.05)                # 50 ms a step: 100 tokens would take 5 s
        batcher.submit(seq)
        deadline = time.monotonic() + 30
        while len(seq.generated) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert batcher.load == (1, 0) and not sink.done.is_set(), "the sequence must be running when cancelled"
        cancelled_at = len(seq.generated)
        seq.cancel()
        while batcher.load != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert batcher.load == (0, 0)
        assert len(seq.generated) <= cancelled_at + 1      # at most the step already running
        assert not sink.done.is_set()                      # it left; it did not run to a finish
    finally:
        batcher.close()


class FakeTokenizer:
    """Token i decodes to pieces[i]; 0xFF-style partial characters are modelled by '\ufffd'."""
    pieces = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "STO", 6: "P!", 7: "\ufffd"}

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.pieces[i] for i in ids)
        return text.replace("\ufffd" + "lo", "é") if 7 in ids else text


def test_stop_strings_are_held_back_and_cut():
    stream = TextStream(FakeTokenizer(), stop=["STOP"])
    out = [stream.push(t) for t in (1, 2, 3, 5)]
    assert "".join(d for d, _ in out) == "Hello wor"        # "STO" is held: it may become STOP
    delta, hit = stream.push(6)
    assert hit and delta == "" and stream.text == "Hello wor"
    other = TextStream(FakeTokenizer(), stop=["STOP"])
    other.push(5)
    assert other.push(4) == ("STOld", False)               # released once it cannot be a stop


def test_partial_characters_wait_for_completion():
    stream = TextStream(FakeTokenizer(), stop=[])
    assert stream.push(7) == ("", False)
    assert stream.push(2) == ("é", False)
