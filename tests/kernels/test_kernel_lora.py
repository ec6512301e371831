"""The per-row multi-LoRA kernels (CPU interpreter here) against their torch twin, and the twin against a plain
per-row loop over each row's adapters."""
import pytest
import torch

from rfserve.kernels import dispatch, lora, triton_lora
from rfserve.kernels.lora import lora_delta, lora_delta_torch
from rfserve.kernels.triton_lora import lora_delta_triton, lora_launches

from kernel_checks import DEVICE, assert_close_to

DTYPES = [torch.float16, torch.float32]
SLOTS = 6  # five adapters and the zero slot
IN, OUT, L = 50, 45, 21  # none a multiple of the interpreter's tiles (32 of in or out, 16 tokens)


def _stacks(rank, dtype, n_in=IN, n_out=OUT):
    """A (S, rank, in) and B (S, out, rank) with slot 0 zero, scaled so the update is about unit size."""
    a = torch.randn(SLOTS, rank, n_in, device=DEVICE) / n_in ** 0.5
    b = torch.randn(SLOTS, n_out, rank, device=DEVICE) / rank ** 0.5
    a[0], b[0] = 0, 0
    return a.to(dtype), b.to(dtype)


# (slots, scales) per row, for K = 1, 2, 3: a row without an adapter (slot 0), negative scales, one adapter
# twice in a row, rows sharing adapters, and a zero slot between live ones.
BINDINGS = {
    1: ([[3], [0], [5], [3]], [[0.8], [1.0], [-1.5], [2.0]]),
    2: ([[1, 2], [0, 0], [4, 4], [2, 0]], [[0.5, -2.0], [1.0, 1.0], [1.0, 0.25], [-0.7, 3.0]]),
    3: ([[1, 0, 5], [0, 0, 0], [2, 2, 3], [5, 4, 1]], [[1.0, 9.0, -0.5], [0.3, 1.0, 1.0], [0.5, 0.5, -1.0],
                                                       [1.0, 2.0, -3.0]]),
}


def _binding(k):
    slots, scales = BINDINGS[k]
    return torch.tensor(slots, device=DEVICE), torch.tensor(scales, device=DEVICE)


def reference(x, a, b, slots, scales):
    """Row by row, adapter by adapter, in fp64: Σ_k scales[i, k] · (x[i] @ A[s]ᵀ) @ B[s]ᵀ."""
    rows = []
    for i in range(x.shape[0]):
        terms = [scales[i, k].double() * (x[i].double() @ a[s].double().T) @ b[s].double().T
                 for k, s in enumerate(slots[i].tolist())]
        rows.append(sum(terms))
    return torch.stack(rows)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("flat", [False, True])
def test_twin_is_the_per_row_sum(k, flat):
    a, b = _stacks(7, torch.float32)
    slots, scales = _binding(k)
    x = torch.randn(4, IN, device=DEVICE) if flat else torch.randn(4, L, IN, device=DEVICE)
    twin = lora_delta_torch(x, a, b, slots, scales)
    assert twin.shape == ((4, OUT) if flat else (4, L, OUT))
    assert_close_to(twin, reference(x, a, b, slots, scales).float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,rank", [(1, 5), (2, 12), (3, 20)])
def test_kernel_matches_the_twin(dtype, k, rank):
    """Odd sizes, ranks that are not powers of two (padded to 16 and 32), every binding of BINDINGS."""
    a, b = _stacks(rank, dtype)
    slots, scales = _binding(k)
    x = torch.randn(4, L, IN, device=DEVICE, dtype=dtype)
    out = torch.full((4, L, OUT), float("nan"), device=DEVICE, dtype=dtype)  # poison: every element is written
    assert lora_delta_triton(x, a, b, slots, scales, out=out) is out
    assert_close_to(out, lora_delta_torch(x, a, b, slots, scales))
    assert (out[1] == 0).all()  # the row without an adapter adds an exact zero


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_on_the_no_token_case(dtype):
    a, b = _stacks(12, dtype)
    slots, scales = _binding(2)
    x = torch.randn(4, IN, device=DEVICE, dtype=dtype)
    got = lora_delta(x, a, b, slots, scales, backend="triton")
    assert got.shape == (4, OUT)
    assert_close_to(got, lora_delta_torch(x, a, b, slots, scales))


def test_kernel_reads_a_1x1_convs_nchw_view():
    """What MultiLoRA passes for a conv: (R, C, H, W) flattened to (R, H·W, C), channels strided by H·W; and
    the first R rows of the binding."""
    a, b = _stacks(12, torch.float32)
    x = torch.randn(3, IN, 4, 5, device=DEVICE).flatten(2).transpose(1, 2)  # (R, H·W, C)
    slots, scales = (t[:3] for t in _binding(3))
    assert x.stride(2) == 20
    assert_close_to(lora_delta(x, a, b, slots, scales, backend="triton"), lora_delta_torch(x, a, b, slots, scales))


def _signature(launch):
    """What a launch's binary can depend on: constexprs, each tensor's dtype, shape and strides, each scalar."""
    args = tuple((t.dtype, t.shape, t.stride()) if isinstance(t, torch.Tensor) else t for t in launch.args)
    return args, launch.constexprs


def test_rebinding_changes_no_argument_the_binary_depends_on():
    """Slots and scales are read from tensors: another binding of adapters to rows launches with the same
    arguments but for those tensors' contents, so one compiled kernel, and one CUDA graph, serves them all."""
    a, b = _stacks(12, torch.float16)
    x = torch.randn(4, L, IN, device=DEVICE, dtype=torch.float16)
    calls = [lora_launches(x, a, b, *_binding(3)),
             lora_launches(x, a, b, torch.tensor(BINDINGS[3][0][::-1], device=DEVICE), -_binding(3)[1])]
    for which in ("shrink", "expand"):
        first, second = (getattr(c, which) for c in calls)
        assert _signature(first) == _signature(second)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_public_entry_point_agrees_on_every_backend(backend):
    a, b = _stacks(12, torch.float16)
    slots, scales = _binding(2)
    x = torch.randn(4, L, IN, device=DEVICE, dtype=torch.float16)
    assert_close_to(lora_delta(x, a, b, slots, scales, backend=backend), lora_delta_torch(x, a, b, slots, scales))


def _no_kernel(*args, **kwargs):
    raise AssertionError("the Triton kernel must not run")


@pytest.mark.parametrize("k,rank,dtypes,why", [
    (3, 65, (torch.float32,) * 3, "512 padded adapter columns"),        # 4 x 128 columns
    (2, 8, (torch.float32, torch.float16, torch.float16), "dtypes differ"),
])
def test_bindings_no_kernel_takes_go_to_the_twin(monkeypatch, k, rank, dtypes, why):
    """Even with RFSERVE_KERNELS=triton: an accumulator wider than MAX_LORA_COLUMNS, or mixed dtypes."""
    monkeypatch.setenv(dispatch.ENV, "triton")
    monkeypatch.setattr(triton_lora, "lora_delta_triton", _no_kernel)
    a, b = _stacks(rank, dtypes[1])
    x = torch.randn(4, L, IN, device=DEVICE, dtype=dtypes[0])
    slots, scales = _binding(k)
    assert why in lora._unsupported(x, a, b, slots)
    if dtypes[0] == dtypes[1]:
        assert_close_to(lora_delta(x, a, b, slots, scales), lora_delta_torch(x, a, b, slots, scales))
    else:
        with pytest.raises(RuntimeError, match="dtype"):   # the twin's bmm says so; the kernel would not be asked
            lora_delta(x, a, b, slots, scales)


def test_rows_must_match_the_binding():
    a, b = _stacks(4, torch.float32)
    slots, scales = _binding(2)
    with pytest.raises(ValueError, match="rows"):
        lora_delta(torch.randn(3, IN, device=DEVICE), a, b, slots, scales)
