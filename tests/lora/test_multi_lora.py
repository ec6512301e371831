"""Rows with different LoRA adapters in one forward give, row by row, what diffusers/peft give with that adapter
loaded alone (CPU, fp32, within 1e-5), from files in both formats; the pool swaps adapters LRU without touching
pinned ones; and a compiled forward serves a new binding of adapters to rows without recompiling."""
import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from safetensors.torch import save_file
from transformers import CLIPTextModel

from rfserve.kernels.lora import lora_delta
from rfserve.model_zoo.lora.files import load_lora
from rfserve.model_zoo.lora.pool import AdapterPool, PoolConfig, PoolFull
from tests.lora.adapters import SPECS, make

ATOL = 1e-5


@pytest.fixture(scope="module")
def base(tiny_sd):
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval().requires_grad_(False)
    te = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder").eval().requires_grad_(False)
    return unet, te


@pytest.fixture(scope="module")
def made(base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {name: make(spec, *base, folder, seed=i + 1) for i, (name, spec) in enumerate(SPECS.items())}


def unet_inputs(rows: int):
    g = torch.Generator().manual_seed(7)
    return (torch.randn(rows, 4, 8, 8, generator=g), torch.tensor([999.0, 500.0, 10.0, 250.0][:rows]),
            torch.randn(rows, 77, 32, generator=g))


def wrapped_unet(base_unet, made, fmt="diffusers", **config):
    unet = copy.deepcopy(base_unet)
    pool = AdapterPool(unet, "unet", PoolConfig(slots=3, max_rank=4, max_rows=8, **config))
    for name, m in made.items():
        pool.register(name, load_lora(m.diffusers_dir if fmt == "diffusers" else m.kohya_file))
    return unet, pool


def run(unet, x, t, emb):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=emb).sample


CHOICES = [[("a", 1.0)], [], [("a", 0.7), ("b", -0.5)], [("b", 1.3)]]


def diffusers_reference(base_unet, made):
    """The base UNet with each adapter loaded by diffusers from its diffusers-format file."""
    ref = copy.deepcopy(base_unet)
    for name in ("a", "b"):
        ref.load_lora_adapter(str(made[name].diffusers_dir), prefix="unet", adapter_name=name,
                              weight_name="pytorch_lora_weights.safetensors")
    return ref


@pytest.mark.smoke     # diffusers' and peft's converters and layers, on every release allowed
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_mixed_batch_rows_equal_diffusers_with_each_adapter_alone(base, made, fmt):
    base_unet, _ = base
    unet, pool = wrapped_unet(base_unet, made, fmt)
    slots, scales = pool.rows(CHOICES)
    pool.bind(slots, scales)
    x, t, emb = unet_inputs(4)
    mixed = run(unet, x, t, emb)
    ref = diffusers_reference(base_unet, made)
    for i, choice in enumerate(CHOICES):
        one = (x[i:i + 1], t[i:i + 1], emb[i:i + 1])
        if choice:
            ref.set_adapters([n for n, _ in choice], [s for _, s in choice])
            want = run(ref, *one)
        else:
            want = run(base_unet, *one)
        assert (want - run(base_unet, *one)).abs().max() > 1e-3 or not choice, "the adapter must change the row"
        torch.testing.assert_close(mixed[i:i + 1], want, atol=ATOL, rtol=0, msg=f"row {i} {choice} ({fmt})")


@pytest.mark.smoke     # diffusers' and peft's converters and layers, on every release allowed
@pytest.mark.parametrize("other", ["kohya_file", "mixed_dir"])
def test_kohya_and_diffusers_files_read_the_same(made, other):
    for name in ("a", "b"):
        d, k = load_lora(made[name].diffusers_dir), load_lora(getattr(made[name], other))
        assert d.rank == k.rank == max(SPECS[name].unet.r, SPECS[name].text_encoder.r)
        assert d.components.keys() == k.components.keys() == {"unet", "text_encoder"}
        for component, layers in d.components.items():
            assert layers.keys() == k.components[component].keys()
            for module, w in layers.items():
                same = k.components[component][module]
                assert w.scale == same.scale != 1.0
                torch.testing.assert_close(w.b @ w.a, same.b @ same.a, atol=0, rtol=0)


@pytest.mark.smoke     # diffusers' and peft's converters and layers, on every release allowed
@pytest.mark.parametrize("fmt", ["diffusers_dir", "kohya_file", "a1111_file"])
def test_text_encoder_rows_equal_peft(base, made, fmt):
    _, base_te = base
    te = copy.deepcopy(base_te)
    pool = AdapterPool(te, "text_encoder", PoolConfig(slots=2, max_rank=4, max_rows=4, per_row=1))
    for name in ("a", "b", "c"):
        pool.register(name, load_lora(getattr(made[name], fmt)))
    choices = [[("a", 1.0)], [], [("b", 1.0)], [("c", 1.0)]]      # c has no text-encoder layers: the zero slot
    pool.bind(*pool.rows(choices))
    ids = torch.randint(0, 200, (4, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mixed = te(ids)[0]
        for i, choice in enumerate(choices):
            ref = made[choice[0][0]].text_encoder if choice and choice[0][0] != "c" else base_te
            torch.testing.assert_close(mixed[i:i + 1], ref(ids[i:i + 1])[0], atol=ATOL, rtol=0, msg=f"row {i}")


def test_lru_swaps_and_never_evicts_a_pinned_slot(base, made):
    base_unet, _ = base
    unet = copy.deepcopy(base_unet)
    pool = AdapterPool(unet, "unet", PoolConfig(slots=2, max_rank=4, max_rows=4))
    for name, m in made.items():
        pool.register(name, load_lora(m.kohya_file))
    layer = pool.layers["mid_block.attentions.0.transformer_blocks.0.attn1.to_k"]
    addresses = [t.data_ptr() for t in (layer.lora_a, layer.lora_b, pool.binding.slots, pool.binding.scales)]
    (sa,) = pool.ensure(["a"])
    (sb,) = pool.ensure(["b"])
    pool.pin([sa])
    (sc,) = pool.ensure(["c"])                      # b, the least recently used unpinned, makes room
    assert sc == sb and pool.resident() == {"a": sa, "c": sc}
    pool.ensure(["a"])
    with pytest.raises(RuntimeError, match="in use"):
        pool.unregister("a")
    pool.pin([sc])
    with pytest.raises(PoolFull):
        pool.ensure(["b"])
    pool.unpin([sc])
    assert pool.ensure(["b"]) == [sc] and pool.resident() == {"a": sa, "b": sc}
    (sc,) = pool.ensure(["c"])                      # c comes back into b's slot: b's layers must be cleared
    pool.bind(*pool.rows([[("c", 1.0)], [("a", 1.0)]]))
    x, t, emb = unet_inputs(2)
    mixed = run(unet, x, t, emb)
    for i, name in enumerate(("c", "a")):
        want = run(made[name].unet, x[i:i + 1], t[i:i + 1], emb[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], want, atol=ATOL, rtol=0, msg=name)
    # A CUDA graph reads the slots and the binding where setup put them: swaps and binds write in place.
    assert [t.data_ptr() for t in (layer.lora_a, layer.lora_b, pool.binding.slots, pool.binding.scales)] == addresses


def test_lora_delta_is_each_rows_sum_of_updates():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, 5, generator=g), torch.randn(4, 6, 3, generator=g)
    a[0], b[0] = 0, 0
    x = torch.randn(3, 2, 5, generator=g)
    slots, scales = torch.tensor([[1, 2], [0, 0], [3, 1]]), torch.tensor([[0.5, -2.0], [1.0, 1.0], [1.0, 0.25]])
    want = torch.stack([sum(scales[i, k] * (x[i] @ a[slots[i, k]].T) @ b[slots[i, k]].T for k in range(2))
                        for i in range(3)])
    torch.testing.assert_close(lora_delta(x, a, b, slots, scales), want)
    torch.testing.assert_close(lora_delta(x[:, 0], a, b, slots, scales), want[:, 0])


def test_clear_errors_name_the_file(base, made, tmp_path):
    base_unet, _ = base
    unet = copy.deepcopy(base_unet)
    pool = AdapterPool(unet, "unet", PoolConfig(slots=1, max_rank=2, max_rows=2))
    with pytest.raises(ValueError, match=r"a-kohya.*rank 4 is above the pool's max rank 2"):
        pool.register("a", load_lora(made["a"].kohya_file))
    bad = tmp_path / "bad.safetensors"
    save_file({"model.layer.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(ValueError, match=r"bad.safetensors: unknown LoRA layout"):
        load_lora(bad)
    resnet = one_layer(tmp_path / "resnet", "down_blocks.0.resnets.0.time_emb_proj", 128, 32)
    with pytest.raises(ValueError, match=r"resnet.*time_emb_proj is not a layer this pool serves"):
        pool.register("r", load_lora(resnet))
    missing = one_layer(tmp_path / "missing", "mid_block.attentions.7.to_q", 64, 64)
    with pytest.raises(ValueError, match=r"missing.*has no module"):
        pool.register("m", load_lora(missing))


def one_layer(folder, layer: str, n_in: int, n_out: int):
    """A diffusers LoRA file of rank 2 on the UNet's `layer` alone."""
    StableDiffusionLoraLoaderMixin.save_lora_weights(folder, unet_lora_layers={
        f"{layer}.lora_A.weight": torch.ones(2, n_in), f"{layer}.lora_B.weight": torch.ones(n_out, 2)})
    return folder


@pytest.mark.slow
def test_compiled_forward_serves_new_bindings_without_recompiling(base, made):
    from torch._dynamo.testing import CompileCounterWithBackend

    base_unet, _ = base
    unet, pool = wrapped_unet(base_unet, made)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(unet, backend=counter, fullgraph=True, dynamic=False)
    x, t, emb = unet_inputs(4)
    torch._dynamo.reset()
    for choices in (CHOICES, [[("b", 0.3)], [("c", 1.0)], [], [("a", -1.0), ("c", 2.0)]]):
        pool.bind(*pool.rows(choices))
        with torch.no_grad():
            got = compiled(x, t, encoder_hidden_states=emb).sample
        torch.testing.assert_close(got, run(unet, x, t, emb), atol=ATOL, rtol=0)
    assert counter.frame_count == 1


def test_guided_rows_unconditional_copies_use_their_rows_adapters(base, made):
    """The pipelines' forward is [unconditional copies of the guided rows; every row] (`with_uncond`): binding the
    rows' choices through the same function gives each copy its row's adapter."""
    from rfserve.model_zoo.samplers import with_uncond

    base_unet, _ = base
    unet, pool = wrapped_unet(base_unet, made)
    choices, cfg = [[("a", 1.0)], [], [("c", 0.5), ("b", 1.0)]], [0, 2]
    slots, scales = pool.rows(choices)
    pool.bind(with_uncond(slots, cfg), with_uncond(scales, cfg))
    x, t, emb = unet_inputs(3)
    neg = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(5))
    mixed = run(unet, with_uncond(x, cfg), with_uncond(t, cfg), with_uncond(emb, cfg, neg))
    ref = diffusers_reference(base_unet, made)
    ref.load_lora_adapter(str(made["c"].diffusers_dir), prefix="unet", adapter_name="c",
                          weight_name="pytorch_lora_weights.safetensors")
    for j, (row, e) in enumerate([(0, neg), (2, neg), (0, emb), (1, emb), (2, emb)]):
        one = (x[row:row + 1], t[row:row + 1], e[row:row + 1])
        if choices[row]:
            ref.set_adapters([n for n, _ in choices[row]], [s for _, s in choices[row]])
        want = run(ref if choices[row] else base_unet, *one)
        torch.testing.assert_close(mixed[j:j + 1], want, atol=ATOL, rtol=0, msg=f"forward row {j} (row {row})")


def test_an_eager_forward_computes_only_the_columns_its_rows_use(base, made, monkeypatch):
    """Rows of one adapter each use one column of K = 3, rows without any use none (the layers then add nothing
    and call no update); the result is the full-width one."""
    import rfserve.model_zoo.lora.layers as layers

    unet, pool = wrapped_unet(base[0], made, per_row=3)
    x, t, emb = unet_inputs(3)
    widths = []
    update = layers.lora_delta

    def counted(x, a, b, slots, scales):
        widths.append(slots.shape[1])
        return update(x, a, b, slots, scales)

    monkeypatch.setattr(layers, "lora_delta", counted)
    choices = [[("a", 1.0)], [], [("b", 0.5)]]
    pool.bind(*pool.rows(choices))
    assert pool.binding.width == 1
    narrow = run(unet, x, t, emb)
    assert widths and set(widths) == {1}
    full = torch.zeros_like(narrow)
    for i, choice in enumerate(choices):           # each row alone at full width: its columns, then zero slots
        pool.bind(*pool.rows([choice]))
        pool.binding.width = 3
        full[i] = run(unet, x[i:i + 1], t[i:i + 1], emb[i:i + 1])[0]
    torch.testing.assert_close(narrow, full, atol=ATOL, rtol=0)
    pool.bind(*pool.rows([[], [], []]))
    widths.clear()
    assert pool.binding.width == 0
    torch.testing.assert_close(run(unet, x, t, emb), run(base[0], x, t, emb), atol=0, rtol=0)
    assert widths == []
