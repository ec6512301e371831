"""Text-to-image with the prompt KV reused equals the official loop, which recomputes the
whole sequence at every step; batching does not change an image: a row computes what it computes alone
whatever its batch's other rows' steps, guidance and prompts, and whenever rows join or leave. The batches'
KV pool keeps fixed addresses."""
import numpy as np
import pytest
import torch

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.fast_path import call_key
from rfserve.model_zoo.janusflow.llm import KVPool
from rfserve.model_zoo.janusflow.pipeline import JanusFlowPipeline


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


class Driven:
    """A running batch driven as the engine's worker drives it: rows that have taken their steps are finished at
    once (their final latents and image recorded under their spec), the others step; rows join and leave between
    steps. Specs name rows, so a test's specs differ (in seed, say)."""

    def __init__(self, pipe, specs):
        self.pipe, self.names, self.got = pipe, list(specs), {}
        self.running = pipe.begin(list(specs))

    def admit(self, *specs):
        self.pipe.admit(self.running, list(specs))
        self.names += specs

    def drop(self, *specs):
        keep = [i for i, name in enumerate(self.names) if name not in specs]
        self.running.keep(keep)
        self.names = [self.names[i] for i in keep]

    def step(self, times=1):
        for _ in range(times):
            self._finish_done()
            self.pipe.step(self.running)
        self._finish_done()
        return self

    def to_end(self):
        while len(self.running):
            self.step()
        return self.got

    def _finish_done(self):
        done = self.running.finished()
        if done:
            z = self.running.rows["z"][done]
            out = self.pipe.finish(self.running, done)
            self.got.update({self.names[i]: (z[k], out.images[k]) for k, i in enumerate(done)})
            self.names = [name for i, name in enumerate(self.names) if i not in done]


@torch.inference_mode()
@pytest.mark.smoke
def test_kv_reuse_matches_full_recompute(janus_pipe):
    parts = janus_pipe.parts
    z0 = janus_pipe.noise([7, 8])
    prompt = "a red cat on a blue chair"
    want = official_loop(parts, prompt, z0, steps=5, w=2.0)
    running = janus_pipe.begin([spec(prompt, 7, steps=5), spec(prompt, 8, steps=5)])
    for _ in range(5):
        janus_pipe.step(running)
    got = running.rows["z"]
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert (got - z0).abs().max() > 0.1               # the loop moved the latents


@torch.inference_mode()
def test_a_row_without_guidance_matches_the_reference_at_w_1(janus_pipe):
    """At w = 1 the row runs without its unconditional branch: the reference's w·v_c − (w−1)·v_u is v_c."""
    z0 = janus_pipe.noise([4])
    want = official_loop(janus_pipe.parts, "a cat", z0, steps=3, w=1.0)
    running = janus_pipe.begin([spec("a cat", 4, guidance=1.0)])
    assert len(running.rows["kv"].owner) == 1                        # one KV row: no unconditional one
    for _ in range(3):
        janus_pipe.step(running)
    torch.testing.assert_close(running.rows["z"], want, atol=1e-3, rtol=0)


def spec(prompt, seed, guidance=2.0, steps=3):
    return ImageSpec(prompt, "", seed, 16, 16, steps, guidance)


LONG = "the quick brown fox jumps over the lazy dog " * 4       # a prefix past PREFIX_BUCKET: a wider KV


def alone(pipe, s):
    """A spec's final latents and image on its own (`Stepped.run` for the image)."""
    z, _ = Driven(pipe, [s]).to_end()[s]
    return z, pipe.run([s]).images[0]


def assert_as_alone(pipe, got, specs):
    for s in specs:
        z, image = alone(pipe, s)
        torch.testing.assert_close(got[s][0], z, atol=1e-4, rtol=0)
        assert np.abs(got[s][1].astype(int) - image.astype(int)).max() <= 1
        assert image.std() > 0


def test_request_alone_equals_batched_with_other_lengths(janus_pipe):
    prompts = ["the quick brown fox jumps over the lazy dog", "a cat", "blue"]
    prefixes, _ = janus_pipe.prefixes(prompts)
    assert len({len(p) for p in prefixes}) == 3
    specs = [spec(p, seed, guidance) for p, seed, guidance in zip(prompts, (3, 11, 5), (2.0, 2.0, 3.0))]
    got = Driven(janus_pipe, specs).to_end()
    assert_as_alone(janus_pipe, got, specs)
    assert (got[specs[0]][0] - got[specs[1]][0]).abs().max() > 0.1


def test_rows_with_their_own_steps_and_guidance_compute_what_they_compute_alone(janus_pipe):
    """One batch: other step counts, other w (1: no unconditional row; below 1: both), other prefix widths."""
    specs = [spec("a cat", 3, 2.0, steps=2), spec("a cat", 11, 1.0, steps=4), spec(LONG, 5, 3.5, steps=3),
             spec("blue", 7, 0.5, steps=3)]
    driven = Driven(janus_pipe, specs)
    assert len(driven.running.rows["kv"].owner) == 7 and driven.running.rows["kv"].width == 128
    got = driven.to_end()
    assert_as_alone(janus_pipe, got, specs)
    w2, _ = alone(janus_pipe, spec("a cat", 11, 2.0, steps=4))
    assert (got[specs[1]][0] - w2).abs().max() > 0.1                # the row followed its own w


def test_rows_joining_a_running_batch_compute_what_they_compute_alone(janus_pipe):
    """Joiners take their first step with the batch's next: one at the running width after 1 step, then one whose
    longer prompt widens every row's KV after 2 (the first row has finished by then)."""
    first, second = spec("a cat", 3, 2.0, steps=2), spec("blue", 11, 1.0, steps=4)
    same_width, wider = spec("a red cat", 5, 3.0, steps=3), spec(LONG, 7, 2.0, steps=2)
    driven = Driven(janus_pipe, [first, second])
    driven.step()
    driven.admit(same_width)
    driven.step()
    assert driven.running.rows["kv"].width == 64
    driven.admit(wider)
    assert driven.running.rows["kv"].width == 128 and len(driven.running) == 3
    got = driven.to_end()
    assert_as_alone(janus_pipe, got, [first, second, same_width, wider])


def test_rows_released_mid_way_leave_the_others_unchanged(janus_pipe):
    """Running.keep (a cancelled request) after 2 steps: the rows left, laid out again at their own narrower width
    and without the released unconditional rows, go on as alone."""
    specs = [spec("a cat", 3, 2.0, steps=4), spec(LONG, 11, 2.0, steps=4), spec("blue", 5, 1.0, steps=3),
             spec("a red cat", 7, 3.0, steps=5)]
    driven = Driven(janus_pipe, specs)
    driven.step(2)
    driven.drop(specs[1], specs[2])
    kv = driven.running.rows["kv"]
    assert kv.width == 64 and len(kv.owner) == 4
    got = driven.to_end()
    assert set(got) == {specs[0], specs[3]}
    assert_as_alone(janus_pipe, got, [specs[0], specs[3]])


def test_a_join_keeps_the_flow_step_call_shapes(janus_pipe, monkeypatch):
    """Per-row t, positions and mask are tensor inputs of the hot call: batches of rows at other points of other
    schedules call it with the same tensor shapes (what the fast path keys on), and the write column follows
    from them."""
    keys = []

    def spy(*args):
        keys.append(call_key(args, {}))
        z2, t, positions, mask, kv, write = args
        assert write == mask.shape[-1] - 1 - janus_pipe.parts.num_gen_tokens
        return janus_pipe.velocity(*args)

    monkeypatch.setattr(janus_pipe, "flow_step", spy)
    Driven(janus_pipe, [spec("a cat", 1, steps=2), spec("blue", 2, steps=2)]).to_end()
    uniform = set(keys)
    keys.clear()
    driven = Driven(janus_pipe, [spec("a cat", 1, 3.0, steps=3)])
    driven.step()
    driven.admit(spec("blue", 2, 5.0, steps=4))
    driven.step()
    assert len(uniform) == 1 and set(keys[1:2]) == uniform


def test_joins_stay_within_the_reserved_pool(janus_pipe):
    pipe = JanusFlowPipeline(janus_pipe.parts)
    pipe.reserve_memory(2)
    flat = pipe.kv_pool.flat[0]
    driven = Driven(pipe, [spec("a cat", 1)])
    driven.step()
    driven.admit(spec("blue " * (pipe.max_prompt_tokens + 20), 2))       # the longest prefix there is
    driven.to_end()
    assert pipe.kv_pool.flat[0] is flat


def test_a_second_running_batch_cannot_step_over_the_first(janus_pipe):
    """The pool holds one batch's KV: a batch begun later has laid out over the earlier one, which must not step."""
    pipe = JanusFlowPipeline(janus_pipe.parts)
    first = pipe.begin([spec("a cat", 1)])
    pipe.begin([spec("blue", 2)])
    with pytest.raises(RuntimeError, match="holds its KV pool"):
        pipe.step(first)


def test_run_returns_uint8_images_independent_of_the_batch(janus_pipe):
    alone = janus_pipe.run([spec("a cat", 11)])
    batch = janus_pipe.run([spec("the quick brown fox", 3), spec("a cat", 11)])
    assert alone.images.shape == (1, 16, 16, 3) and alone.images.dtype == np.uint8
    assert np.abs(alone.images[0].astype(int) - batch.images[1].astype(int)).max() <= 1
    assert alone.images.std() > 0
    assert set(alone.timings) == {"encode", "sample", "decode"} and alone.prompt_truncated == [False]


def test_previews_carry_each_row_its_own_distance(janus_pipe):
    """A preview continues each row's last step straight to t = 1: (steps − done) times its length, per row, so
    a row that has taken all its steps previews as it finishes."""
    running = janus_pipe.begin([spec("a cat", 3, steps=3), spec("blue", 5, steps=1)])
    janus_pipe.step(running)
    z, z_prev = running.rows["z"], running.rows["z_prev"]
    want = janus_pipe.decode(torch.stack([z[0] + (z[0] - z_prev[0]) * 2, z[1]]))      # 2 steps left; none
    np.testing.assert_array_equal(janus_pipe.preview(running, [0, 1]), want)
    np.testing.assert_array_equal(janus_pipe.preview(running, [1]), janus_pipe.finish(running, [1]).images)
    assert [s.prompt for s in running.specs] == ["a cat"] and len(running.rows["kv"].owner) == 2


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
        kept = pool.lay_out(kv, [2, 0], 2, 8)
        assert kept.keys[0].data_ptr() == kv.keys[0].data_ptr()
        assert [float(t[r].unique()) for t in (kept.keys[1], kept.values[0]) for r in (0, 1)] == [2, 0, 2, 0]
        kept.keys[0].fill_(float("nan"))                                     # a bad batch's cache
        assert all(bool((t == 0).all()) for t in (*pool.batch(3, 8).keys, *pool.batch(3, 8).values))
