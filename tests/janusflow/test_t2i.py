"""Text-to-image with the prompt KV reused equals the official loop, which recomputes the
whole sequence at every step; batching does not change an image. The batches' KV pool keeps fixed addresses."""
import numpy as np
import pytest
import torch

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.janusflow.llm import KVPool


def official_loop(parts, prompt: str, z: torch.Tensor, steps: int, w: float) -> torch.Tensor:
    """demo/app_janusflow.py `generate()`, restated: full LLM recompute every step, no KV cache."""
    model, proc = parts.model, parts.processor
    lm = model.language_model
    B, G = z.shape[0], parts.num_gen_tokens
    ids = torch.tensor(proc.t2i_prefix(prompt) + [proc.image_start_id])
    tokens = torch.stack([ids] * 2 * B)
    tokens[B:, 1:] = proc.pad_id
    embeds = lm.get_input_embeddings()(tokens)[:, :-1]
    mask = torch.ones(2 * B, embeds.shape[1] + 1 + G, dtype=torch.int)
    mask[B:, 1:embeds.shape[1]] = 0
    dt = torch.zeros_like(z) + 1.0 / steps
    for step in range(steps):
        z_in = torch.cat([z, z])
        t = torch.tensor([step / steps * 1000.0] * z_in.shape[0]).to(dt)
        z_emb, t_emb, hs = model.vision_gen_enc_model(z_in, t)
        side = z_emb.shape[-1]
        z_emb = model.vision_gen_enc_aligner(z_emb.view(z_emb.shape[0], z_emb.shape[1], -1).permute(0, 2, 1))
        llm_emb = torch.cat([embeds, t_emb.unsqueeze(1), z_emb], dim=1)
        hidden = lm.model(inputs_embeds=llm_emb, attention_mask=mask).last_hidden_state
        h = model.vision_gen_dec_aligner(model.vision_gen_dec_aligner_norm(hidden[:, -G:]))
        h = h.reshape(z_in.shape[0], side, side, -1).permute(0, 3, 1, 2)
        v = model.vision_gen_dec_model(h, hs, t_emb)
        v_cond, v_uncond = torch.chunk(v, 2)
        z = z + dt * (w * v_cond - (w - 1.0) * v_uncond)
    return z


@torch.inference_mode()
@pytest.mark.smoke
def test_kv_reuse_matches_full_recompute(janus_pipe):
    parts = janus_pipe.parts
    z0 = janus_pipe.noise([7, 8])
    prompt = "a red cat on a blue chair"
    want = official_loop(parts, prompt, z0, steps=5, w=2.0)
    prefixes, _ = janus_pipe.prefixes([prompt, prompt])
    got = janus_pipe.sample(prefixes, z0, steps=5, guidance=2.0)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert (got - z0).abs().max() > 0.1               # the loop moved the latents


def spec(prompt, seed, guidance=2.0, steps=3):
    return ImageSpec(prompt, "", seed, 16, 16, steps, guidance)


def test_request_alone_equals_batched_with_other_lengths(janus_pipe):
    prompts = ["the quick brown fox jumps over the lazy dog", "a cat", "blue"]
    prefixes, _ = janus_pipe.prefixes(prompts)
    assert len({len(p) for p in prefixes}) == 3
    z = janus_pipe.noise([3, 11, 5])
    guidance = torch.tensor([2.0, 2.0, 3.0])
    batched = janus_pipe.sample(prefixes, z, steps=3, guidance=guidance)
    for i in range(3):
        alone = janus_pipe.sample(prefixes[i:i + 1], z[i:i + 1], steps=3, guidance=float(guidance[i]))
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-4, rtol=0)
    assert (batched[0] - batched[1]).abs().max() > 0.1


def test_run_returns_uint8_images_independent_of_the_batch(janus_pipe):
    alone = janus_pipe.run([spec("a cat", 11)])
    batch = janus_pipe.run([spec("the quick brown fox", 3), spec("a cat", 11)])
    assert alone.images.shape == (1, 16, 16, 3) and alone.images.dtype == np.uint8
    assert np.abs(alone.images[0].astype(int) - batch.images[1].astype(int)).max() <= 1
    assert alone.images.std() > 0
    assert set(alone.timings) == {"encode", "sample", "decode"} and alone.prompt_truncated == [False]


def test_noise_is_the_per_seed_bf16_cpu_draw(janus_pipe):
    z = janus_pipe.noise([5, 6])
    g = torch.Generator("cpu").manual_seed(6)
    want = torch.randn((1, *janus_pipe.parts.latent_shape), generator=g, dtype=torch.bfloat16).float()
    torch.testing.assert_close(z[1:2], want, atol=0, rtol=0)


def test_over_long_prompt_is_truncated_and_flagged(janus_pipe):
    limit = janus_pipe.max_prompt_tokens
    prefixes, truncated = janus_pipe.prefixes(["blue " * (limit + 20), "short"])
    assert truncated == [True, False]
    assert len(prefixes[0]) + 1 + janus_pipe.parts.num_gen_tokens <= janus_pipe.parts.context_length


def test_kv_pool_views_sit_at_fixed_addresses(janus_pipe):
    """Every batch's cache starts at the pool's first element, contiguous and marked static, so a captured CUDA
    graph replays over the same addresses; it grows only for a larger batch."""
    pool = KVPool(janus_pipe.parts.model.language_model, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        big = pool.batch(4, 70)
        start = big.keys[0].data_ptr()
        for rows, length in ((4, 70), (2, 70), (4, 33)):
            kv = pool.batch(rows, length)
            assert kv.keys[0].shape == (rows, *big.keys[0].shape[1:2], length, big.keys[0].shape[3])
            assert all(t.is_contiguous() and t._dynamo_static_input_type for t in (*kv.keys, *kv.values))
            assert kv.keys[0].data_ptr() == start and kv.values[-1].data_ptr() == big.values[-1].data_ptr()
        assert pool.batch(6, 70).keys[0].data_ptr() != start                  # grown: a new buffer


def test_kv_pool_keeps_rows_in_order_and_zeroes_each_batch(janus_pipe):
    pool = KVPool(janus_pipe.parts.model.language_model, torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        kv = pool.batch(3, 8)
        for t in (*kv.keys, *kv.values):
            t.copy_(torch.arange(3.0)[:, None, None, None].expand_as(t))      # row r holds r
        kept = pool.keep(kv, [2, 0])
        assert kept.keys[0].data_ptr() == kv.keys[0].data_ptr()
        assert [float(t[r].unique()) for t in (kept.keys[1], kept.values[0]) for r in (0, 1)] == [2, 0, 2, 0]
        kept.keys[0].fill_(float("nan"))                                     # a bad batch's cache
        assert all(bool((t == 0).all()) for t in (*pool.batch(3, 8).keys, *pool.batch(3, 8).values))
