"""Janus chat through the continuous batcher: greedy tokens equal `JanusForConditionalGeneration.generate()`
token for token, for 4 concurrent requests of different lengths, with and without an image; and our prompt
is the one `JanusProcessor` builds from the checkpoint's chat template."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

from rfserve.model_zoo.janus.chat import JanusChat
from rfserve.server.chat.batcher import ChatSequence, ContinuousBatcher
from tests.janusflow.test_chat_batcher import Collector


@pytest.fixture(scope="module")
def chat(janus_pipe):
    return JanusChat(janus_pipe.parts)


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 12, 3), dtype=np.uint8))


def official_inputs(chat, text: str, images: list[Image.Image]):
    """What the model card's example feeds `generate()`: the template, then the processor."""
    proc = chat.parts.processor
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return proc(text=prompt, images=images or None, return_tensors="pt")


def test_the_prompt_is_the_processors(chat):
    for images in ([], [picture(0)], [picture(1), picture(2)]):
        ours = chat.processor.prompt([("User", "".join([chat.processor.image_tag] * len(images)) + "what is it?")],
                                     chat.processor.default_system, images)
        want = official_inputs(chat, "what is it?", images)
        assert ours.ids == want.input_ids[0].tolist()
        image_id = chat.processor.image_id
        assert ours.image_positions == [i for i, t in enumerate(ours.ids) if t == image_id]
        if images:
            assert torch.equal(ours.pixel_values, want.pixel_values)


def test_a_system_message_replaces_the_default(chat):
    ours = chat.processor.prompt([("User", "hi")], "Answer briefly.", [])
    text = chat.parts.tokenizer.decode(ours.ids)
    assert "Answer briefly." in text and chat.processor.default_system.strip() not in text


def hf_generate(chat, text, images, max_new: int) -> list[int]:
    inputs = official_inputs(chat, text, images)
    eos = chat.processor.eos_id
    out = chat.parts.model.generate(**inputs, max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                                    pad_token_id=eos)
    tokens = out[0, inputs.input_ids.shape[1]:].tolist()
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.timeout(120)
@pytest.mark.smoke
def test_greedy_tokens_equal_generate_for_concurrent_requests(chat):
    requests = [("hi", [], 8), ("describe the image in detail please", [picture(3)], 12),
                ("what color is the sky", [], 9), ("a longer question about numbers 0 1 2 3 4", [], 10)]
    proc = chat.processor
    batcher = ContinuousBatcher(chat.decoder(slots=3, max_len=256), chat.tokenizer, proc.eos_id).start()
    seqs = []
    try:
        for text, images, n in requests:
            prompt = proc.prompt([("User", proc.image_tag * len(images) + text)], proc.default_system, images)
            sink = Collector()
            seq = ChatSequence(prompt.ids, prompt.pixel_values, prompt.image_positions, n, 0.0, 1.0, [], None, sink)
            batcher.submit(seq)
            seqs.append((seq, sink))
        for _, sink in seqs:
            assert sink.done.wait(60)
    finally:
        batcher.close()
    assert len({len(s.ids) for s, _ in seqs}) == 4
    for (seq, sink), (text, images, n) in zip(seqs, requests):
        want = hf_generate(chat, text, images, n)
        assert seq.generated == want, text
        assert sink.events[-1].completion_tokens == len(want)
    deadline = time.monotonic() + 5
    while batcher.load != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.load == (0, 0)
