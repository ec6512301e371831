"""Text to image against transformers' `generate(generation_mode="image")` on the same weights, and the
serving properties: seeded images independent of their batch (its other images' guidance, prompt widths and how
far along they are), images joining after k tokens, images leaving mid-run.

Batch invariance is asserted on the tokens exactly: a batch changes a logit's rounding (~1e-6: MKL's GEMMs round
by batch size, attention by cache width), which moves no argmax, and a sampled token only where its uniform falls
within ~1e-6 of a bucket's edge. Pixels are compared within one 8-bit level, as the VQ decoder's convolutions
round by how many images they decode."""
import numpy as np
import pytest
import torch

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.seeding import generators

PROMPTS = ["a cat", "a photo of a red square on a table next to a blue circle", "the quick brown fox"]
LONG = " ".join(["a red square on a blue table"] * 12)       # over 64 tokens: a wider prompt bucket


def spec(prompt: str, seed: int, guidance: float = 5.0) -> ImageSpec:
    return ImageSpec(prompt=prompt, negative_prompt="", seed=seed, width=16, height=16, steps=1, guidance=guidance)


def tokens(pipe, specs: list[ImageSpec]) -> torch.Tensor:
    """The image tokens (B, G) of specs begun together and stepped to the end."""
    running = pipe.begin(specs)
    while running.stepping():
        pipe.step(running)
    return running.rows["tokens"]


def sample(pipe, prompts: list[str], guidance: float | list[float]) -> torch.Tensor:
    weights = guidance if isinstance(guidance, list) else [guidance] * len(prompts)
    return tokens(pipe, [spec(p, 0, w) for p, w in zip(prompts, weights)])


def assert_near(images: np.ndarray, expected: np.ndarray) -> None:
    assert images.shape == expected.shape
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


@pytest.fixture()
def greedy(janus_pipe):
    janus_pipe.temperature = 0.0
    yield janus_pipe
    janus_pipe.temperature = 1.0


def reference_tokens(pipe, prompts: list[str], guidance: float) -> torch.Tensor:
    proc = pipe.parts.processor
    chats = [proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": p}]}],
                                      add_generation_prompt=True) for p in prompts]
    inputs = proc(text=chats, generation_mode="image", padding=True, return_tensors="pt")
    return pipe.parts.model.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=guidance)


@pytest.mark.parametrize("guidance", [5.0, 2.0])
@pytest.mark.smoke
def test_greedy_tokens_and_pixels_equal_transformers(greedy, guidance):
    """Prompts of different lengths in one batch (transformers left-pads them, we right-pad)."""
    ids, _ = greedy.prompt_ids(PROMPTS)
    assert len({len(i) for i in ids}) == len(PROMPTS)
    ours = sample(greedy, PROMPTS, guidance)
    ref = reference_tokens(greedy, PROMPTS, guidance)
    assert ours.shape == ref.shape == (len(PROMPTS), greedy.parts.num_image_tokens)
    assert len(set(ours.flatten().tolist())) > 3            # not a degenerate constant image
    assert torch.equal(ours, ref)
    with torch.inference_mode():
        ref_pixels = greedy.parts.model.decode_image_tokens(ref).float().clip(-1, 1)
    torch.testing.assert_close(greedy.decode_pixels(ours), ref_pixels, atol=1e-4, rtol=0)


def test_guidance_changes_the_tokens(greedy):
    assert not torch.equal(sample(greedy, PROMPTS[:2], 5.0), sample(greedy, PROMPTS[:2], 1.0))


def test_unguided_image_equals_transformers_conditional_logits(greedy):
    """At guidance ≤ 1 an image runs no unconditional row: its tokens are the conditional logits' argmax, which
    `generate()` at guidance_scale 1 (no CFG processor) would take, checked against the plain HF forward."""
    ours = sample(greedy, PROMPTS[:1], 1.0)[0]
    ids = torch.tensor([greedy.prompt_ids(PROMPTS[:1])[0][0]])
    model = greedy.parts.model
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(ids)
        for token in ours:
            h = model.model.language_model(inputs_embeds=embeds).last_hidden_state[:, -1]
            assert model.model.generation_head(h).argmax(-1).item() == token.item()
            embeds = torch.cat([embeds, model.prepare_embeddings_for_image_generation(token.view(1, 1))], dim=1)


def test_per_row_guidance_is_each_rows_own(greedy):
    mixed = sample(greedy, PROMPTS[:3], [5.0, 2.0, 1.0])
    for i, w in enumerate([5.0, 2.0, 1.0]):
        assert torch.equal(mixed[i], sample(greedy, PROMPTS[i:i + 1], w)[0])


def test_seeded_image_same_alone_and_batched(janus_pipe):
    alone = janus_pipe.run([spec(PROMPTS[1], seed=7)]).images[0]
    batched = janus_pipe.run([spec(PROMPTS[0], 3), spec(PROMPTS[1], 7), spec(PROMPTS[2], 11)]).images
    assert batched.shape == (3, 16, 16, 3) and batched.dtype == np.uint8
    np.testing.assert_array_equal(batched[1], alone)
    other_seed = janus_pipe.run([spec(PROMPTS[1], seed=8)]).images[0]
    assert not np.array_equal(other_seed, alone)


def test_sampling_follows_the_distribution(janus_pipe):
    """The inverse-CDF draw picks token k with probability p_k (a chi-square-free check on a peaked case)."""
    from rfserve.model_zoo.janus.sampling import next_tokens

    scores = torch.log(torch.tensor([[0.7, 0.0, 0.3]])).expand(4000, 3)
    drawn = next_tokens(scores, 1.0, generators(list(range(4000))))
    share = torch.bincount(drawn, minlength=3).float() / 4000
    assert share[1] == 0 and abs(share[0] - 0.7) < 0.03


def test_mixed_batch_images_equal_each_alone(janus_pipe):
    """Sampled images of different guidance (one unguided, one below 1) and prompt buckets in one batch."""
    specs = [spec(PROMPTS[0], 3, 5.0), spec(LONG, 7, 1.0), spec(PROMPTS[1], 11, 2.0), spec(PROMPTS[2], 5, 0.5)]
    alone = torch.cat([tokens(janus_pipe, [s]) for s in specs])
    assert torch.equal(tokens(janus_pipe, specs), alone)
    assert len({tuple(row.tolist()) for row in alone}) == len(specs)
    assert_near(janus_pipe.run(specs).images, np.concatenate([janus_pipe.run([s]).images for s in specs]))


@pytest.mark.parametrize("first, joiner", [(PROMPTS[0], LONG), (LONG, PROMPTS[1])])
@pytest.mark.parametrize("k", [1, 6])
def test_image_joining_after_k_tokens_equals_alone(janus_pipe, first, joiner, k):
    """A joiner with a wider prompt bucket than the batch (the cache widens) or a narrower one; one guided and
    one not, so the batch's KV rows are not simply [cond; uncond]. Each finishes when its own G tokens are
    taken. Tokens equal exactly; pixels within one level, as the VQ decoder rounds by how many it decodes."""
    specs = [spec(first, 3, 5.0), spec(joiner, 9, 1.0), spec(PROMPTS[2], 4, 3.0)]
    G = janus_pipe.parts.num_image_tokens
    running = janus_pipe.begin(specs[:1])
    for _ in range(k):
        janus_pipe.step(running)
    janus_pipe.admit(running, specs[1:])
    assert running.done == [k, 0, 0]
    for _ in range(G - k):
        janus_pipe.step(running)
    assert running.finished() == [0]
    made = [running.rows["tokens"][0].clone()]
    images = [janus_pipe.finish(running, [0]).images]
    while running.stepping():
        janus_pipe.step(running)
    made += list(running.rows["tokens"].clone())
    images.append(janus_pipe.finish(running, [0, 1]).images)
    assert len(running) == 0
    for s, got, image in zip(specs, made, np.concatenate(images)):
        assert torch.equal(got, tokens(janus_pipe, [s])[0])
        assert_near(image, janus_pipe.run([s]).images[0])


def test_a_failed_join_leaves_the_batch_as_it_was(janus_pipe, monkeypatch):
    """The prefill fails after the cache was laid out again for the joiner (out of memory, say): the batch goes on
    as if nobody had tried to join."""
    a = spec(PROMPTS[0], 3)
    running = janus_pipe.begin([a])
    for _ in range(3):
        janus_pipe.step(running)

    def fails(*args):
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(janus_pipe, "prefill", fails)
    with pytest.raises(torch.OutOfMemoryError):
        janus_pipe.admit(running, [spec(LONG, 9)])
    monkeypatch.undo()
    assert len(running) == 1 and running.done == [3] and len(running.rows["kv"].owner) == 2
    while running.stepping():
        janus_pipe.step(running)
    assert torch.equal(running.rows["tokens"][0], tokens(janus_pipe, [a])[0])


def test_rows_leaving_mid_run_leave_the_others_unchanged(janus_pipe):
    """`Running.keep` mid-run, as the engine cancels: the widest prompt leaves (the cache narrows) and the rest go
    on reordered."""
    specs = [spec(p, seed=s) for p, s in zip([PROMPTS[0], LONG, PROMPTS[2]], (3, 7, 11))]
    full, images = tokens(janus_pipe, specs), janus_pipe.run(specs).images
    running = janus_pipe.begin(specs)
    for _ in range(5):
        janus_pipe.step(running)
    running.keep([2, 0])
    while running.stepping():
        janus_pipe.step(running)
    assert torch.equal(running.rows["tokens"], full[[2, 0]])
    assert_near(janus_pipe.finish(running, [0, 1]).images, images[[2, 0]])


def test_the_pool_reserved_at_load_holds_every_layout(janus_pipe):
    """Images join (the longest prompt allowed among them) and leave a batch of `--max-batch` 2: the cache is laid
    out again each time, always inside the pool reserved at load, which never grows."""
    from rfserve.model_zoo.janus.pipeline import JanusPipeline

    pipe = JanusPipeline(janus_pipe.parts)
    pipe.reserve_memory(2)
    flat = pipe.kv_pool.flat[0]
    running = pipe.begin([spec(PROMPTS[0], 3)])
    pipe.step(running)
    pipe.admit(running, [spec(" ".join(["word"] * 1000), 4)])
    pipe.step(running)
    running.keep([1])
    pipe.admit(running, [spec(PROMPTS[1], 5)])
    pipe.step(running)
    assert pipe.kv_pool.flat[0] is flat


def test_preview_is_each_rows_own_tokens_so_far(janus_pipe):
    """Two images at different tokens: each preview is its own first n tokens, its n-th repeated."""
    running = janus_pipe.begin([spec(PROMPTS[0], 3)])
    for _ in range(4):
        janus_pipe.step(running)
    janus_pipe.admit(running, [spec(PROMPTS[1], 7)])
    janus_pipe.step(running)
    made = running.rows["tokens"]
    expected = janus_pipe.decode(torch.cat([janus_pipe.preview_tokens(made[:1], 5),
                                            janus_pipe.preview_tokens(made[1:], 1)]))
    previews = janus_pipe.preview(running, [1, 0])
    assert previews.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(previews, expected[[1, 0]])


def test_preview_repeats_the_last_token(janus_pipe):
    tokens = torch.arange(16).reshape(1, 16)
    assert janus_pipe.preview_tokens(tokens, 5).tolist() == [[0, 1, 2, 3, 4] + [4] * 11]
