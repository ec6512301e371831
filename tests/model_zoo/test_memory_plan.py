"""The memory plan (`model_zoo.memory_plan`): every preset fits an 80 GiB GPU with room for chat KV, the weights
match the published sizes, and the meta-device figures match what the CPU really allocates for a small model."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from rfserve.model_zoo.lora.pool import PoolConfig
from rfserve.model_zoo.memory_plan import (PAGE, kv_blocks, parse_bytes, plan_memory, plan_model, footprint)
from rfserve.model_zoo.meta_peak import peak_bytes
from rfserve.model_zoo.presets import PRESETS
from rfserve.model_zoo.registry import load_model, parse_spec

GiB = 2 ** 30
CHAT = [name for name, p in PRESETS.items() if p.chats]


@pytest.fixture(scope="module")
def alone():
    """Each preset planned alone on an 80 GiB GPU at the defaults (bf16, batch 8, 32 sequences, 0.9)."""
    return {name: plan_memory([name], device_memory=80 * GiB) for name in PRESETS}


def test_peak_tracker_counts_a_matmul_chain_on_meta():
    w = torch.empty(1024, 1024, device="meta")
    x = torch.empty(8, 1024, device="meta")

    def chain():
        h = x
        for _ in range(4):
            h = h @ w                     # the old h dies once the new one exists: two (8, 1024) live at most
        return h

    assert peak_bytes(chain) == 2 * 8 * 1024 * 4
    assert peak_bytes(lambda: [x @ w for _ in range(3)]) == 3 * 8 * 1024 * 4      # all kept
    assert peak_bytes(lambda: w.t()[:2]) == 0                                       # views allocate nothing


@pytest.mark.smoke            # builds every family on meta with the libraries' own classes: upstream changes show
def test_every_preset_fits_80gib_and_chat_gets_64k_tokens(alone):
    for name, plan in alone.items():
        assert plan.fits, f"{name}: {plan.problem}"
        model = plan.models[0]
        assert model.total_bytes == model.weights_bytes + model.activation_bytes + model.kv_bytes
        if name in CHAT:
            assert model.kv_tokens >= 65_536 and model.kv_tokens % PAGE == 0, name
            assert model.kv_bytes + model.weights_bytes + model.activation_bytes <= plan.budget_bytes
        else:
            assert model.kv_tokens == model.kv_bytes == 0
    assert alone["synthetic"].models[0].weights_bytes == 0
    # Janus-Pro-7B: 2 × 30 layers × 32 KV heads × 128 × 2 bytes per token.
    assert alone["janus-pro-7b"].models[0].kv_bytes_per_token == 2 * 30 * 32 * 128 * 2


def test_text_to_image_pools_are_held_apart_from_the_shared_reserve():
    """Janus-Pro's text-to-image KV pool is reserved at load (KVPool.reserve) and held: counted once for its model,
    beside the one transient reserve that Hunyuan-DiT's decode sets, not inside it."""
    plan = plan_memory(["janus-pro-7b", "hunyuan-dit-v1.2"], device_memory=80 * GiB)
    janus, hunyuan = plan.models
    assert janus.held_bytes == 2 * 8 * (512 + 576) * janus.kv_bytes_per_token       # CFG rows × (prefix + image)
    assert 0 < janus.held_bytes < janus.activation_bytes and hunyuan.held_bytes == 0
    assert plan.reserve_bytes == max(janus.activation_bytes - janus.held_bytes, hunyuan.activation_bytes)
    used = janus.weights_bytes + hunyuan.weights_bytes + janus.held_bytes + plan.reserve_bytes + janus.kv_bytes
    assert plan.fits and 0 <= plan.budget_bytes - used < PAGE * janus.kv_bytes_per_token


def test_weights_match_the_published_checkpoints(alone):
    """Janus-Pro-7B: 7.42B parameters (the hub's safetensors count), bf16, lm_head apart from the embeddings.
    JanusFlow-1.3B: model.safetensors is 4.09 GB of bf16 (2.05B parameters, with a 12.6M pooling head we do not
    build), plus the SDXL VAE's 83.65M parameters. Both within 3%."""
    assert alone["janus-pro-7b"].models[0].weights_bytes == pytest.approx(2 * 7.42e9, rel=0.03)
    assert alone["janusflow-1.3b"].models[0].weights_bytes == pytest.approx(4.09e9 + 2 * 83.65e6, rel=0.03)
    # Hunyuan-DiT v1.2 with the published vocabularies: DiT 1.5B + mT5-xl encoder 1.7B + BERT 0.33B + VAE.
    assert alone["hunyuan-dit-v1.2"].models[0].weights_bytes > 6.5 * GiB


def test_chat_models_share_kv_equally_and_respect_the_sequence_cap():
    plan = plan_memory(["janus-pro-1b", "janus-pro-7b"], device_memory=80 * GiB)
    small, large = plan.models
    assert plan.fits and small.kv_tokens == large.kv_tokens
    used = (small.weights_bytes + large.weights_bytes + plan.held_bytes + plan.reserve_bytes + small.kv_bytes
            + large.kv_bytes)
    assert plan.budget_bytes - used < PAGE * (small.kv_bytes_per_token + large.kv_bytes_per_token)
    capped = plan_memory(["janusflow-1.3b"], device_memory=80 * GiB, max_seqs=4)
    assert capped.models[0].kv_tokens == 4 * 4096                    # 4 sequences at JanusFlow's full context


# Σ (in + out) over the layers the pools wrap, from the published configs. SD1.5: 192 UNet layers (16 transformer
# blocks × q, k, v, out, 2 ff, proj_in, proj_out), 267.0M parameters at full rank, and 72 CLIP layers, 84.9M.
# Hunyuan-DiT v1.2: 400 transformer layers (40 blocks × two attentions' q, k, v, out and 2 ff), 1283.2M at full rank.
SD15_IN_OUT, HUNYUAN_IN_OUT = 423_936 + 165_888, 1_474_560


def test_lora_slots_are_planned_per_model(alone):
    """8 slots of rank 64 (the zero slot makes 9 stacks), 2 adapters a row, 16 rows (batch 8 with CFG): one SD1.5
    slot is 64 × 589,824 × 2 bytes = 75.5 MB, what a rank-64 SD1.5 LoRA file of these layers weighs in fp16 (a
    tenth of those layers at full rank); 648 MiB for the pools. Hunyuan-DiT's transformer: 1,620 MiB."""
    binding = 16 * 2 * (8 + 4)                          # slot ids (int64) and scales (fp32) per pool
    plan = plan_memory(["instaflow-2rf", "hunyuan-dit-v1.2", "janusflow-1.3b", "synthetic"], device_memory=80 * GiB,
                       lora=PoolConfig(slots=8, max_rank=64))
    sd, hunyuan, janusflow, synthetic = plan.models
    assert sd.lora_bytes == 9 * 64 * SD15_IN_OUT * 2 + 2 * binding            # UNet and text encoder pools
    assert 0.05 < 64 * SD15_IN_OUT / (267.0e6 + 84.9e6) < 0.15
    assert hunyuan.lora_bytes == 9 * 64 * HUNYUAN_IN_OUT * 2 + binding        # the transformer's pool only
    assert janusflow.lora_bytes == synthetic.lora_bytes == 0
    for model in plan.models:
        before = alone[model.name].models[0]
        assert model.total_bytes - before.total_bytes == model.lora_bytes
        assert model.to_json()["lora_bytes"] == model.lora_bytes
    assert plan.fixed_bytes == sum(m.weights_bytes + m.lora_bytes for m in plan.models) + plan.held_bytes
    header, *rows = plan.table().splitlines()[:3]
    assert header.split()[3] == "lora" and rows[0].split()[3] == f"{sd.lora_bytes / GiB:.2f}"


def test_lora_slots_count_against_the_budget():
    """Hunyuan-DiT fits a 40 GiB GPU alone (6.7 GiB of weights, 18.8 GiB activation reserve, 36 GiB budget); 16
    slots of rank 256 (11.95 GiB) take it past the budget."""
    assert plan_memory(["hunyuan-dit-v1.2"], device_memory=40 * GiB).fits
    plan = plan_memory(["hunyuan-dit-v1.2"], device_memory=40 * GiB, lora=PoolConfig(slots=16, max_rank=256))
    assert not plan.fits and "LoRA slots" in plan.problem


def test_a_plan_that_cannot_fit_says_why():
    plan = plan_memory(["janus-pro-7b"], device_memory=16 * GiB)
    assert not plan.fits and "exceed the budget" in plan.problem
    short = plan_memory(["janus-pro-7b"], device_memory=30 * GiB)   # fits the weights, not one 16k sequence
    assert not short.fits and "less than one full-context sequence" in short.problem
    assert "does not fit" in short.table()


def test_units_and_blocks():
    assert parse_bytes("80GiB") == parse_bytes("80G") == 80 * GiB
    assert parse_bytes("80GB") == 80 * 10 ** 9 and parse_bytes("85899345920") == 80 * GiB
    with pytest.raises(ValueError, match="--device-memory"):
        parse_bytes("eighty")
    assert kv_blocks(PAGE * 100 * 3 - 1, 100) == 2


def _cpu_peak(stage) -> int:
    """The peak of real CPU allocation while `stage` runs, from the profiler's allocator events (signed bytes,
    in time order): independent of `meta_peak`'s tracker."""
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        stage()
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_tiny_plan_matches_real_cpu_allocation():
    """rf-shapes-2rf (the shipped checkpoint, CFG at its defaults) in fp32: the plan from its config files on meta
    against the tensors the real loader puts in memory, and against the allocator's peak for each stage."""
    spec = parse_spec("rf-shapes-2rf")
    plan = plan_model(spec, device="meta", dtype=torch.float32, max_batch=8)
    parts = load_model(spec, torch.device("cpu"), torch.float32).pipeline.parts
    loaded = {id(t): t for m in (parts.unet, parts.vae, parts.text_encoder) for t in (*m.parameters(), *m.buffers())}
    assert plan.weights_bytes == pytest.approx(sum(t.nbytes for t in loaded.values()), rel=0.10)
    real = footprint(spec, torch.device("cpu"), torch.float32, 8)
    measured = {name: _cpu_peak(stage) for name, stage in real.stages.items()}
    for name in ("encode", "denoise"):                      # measured: 657,408 = 657,408; 7,555,136 vs 7,665,728
        assert plan.stages[name] == pytest.approx(measured[name], rel=0.10), (plan.stages, measured)
    # The VAE decode is 20% under (12.7 MB vs 15.9 MB): oneDNN's convolution workspace, which no op returns and
    # meta cannot show (without oneDNN, the im2col fallback takes 49 MB). A known gap of the plan, not hidden.
    assert measured["decode"] * 0.75 <= plan.stages["decode"] <= measured["decode"] * 1.10, (plan.stages, measured)
