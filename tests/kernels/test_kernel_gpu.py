"""Checks that need CUDA: bf16, the autotuned (compiled) kernels, measured dispatch, torch.compile, CUDA graphs,
bandwidth."""
import pytest
import torch

from rfserve import kernels
from rfserve.kernels import dispatch
from rfserve.kernels.attention import attention_torch
from rfserve.kernels.lora import lora_delta, lora_delta_torch
from rfserve.kernels.triton_attention import attention_triton
from rfserve.kernels.triton_lora import lora_delta_triton
from rfserve.kernels.triton_velocity import cfg_euler_triton
from rfserve.kernels.velocity import cfg_euler_step_torch

from kernel_checks import assert_close_to

pytestmark = pytest.mark.gpu
CUDA = "cuda"


@pytest.mark.parametrize("D,dtype", [(d, torch.bfloat16) for d in [40, 64, 72, 80, 88, 128, 160]]
                         + [(d, torch.float16) for d in [40, 88]])
@pytest.mark.parametrize("Lq,Lk,causal", [(1024, 1024, False), (1024, 77, False), (577, 577, True), (300, 650, True)])
def test_autotuned_attention(D, dtype, Lq, Lk, causal):
    q = torch.randn(2, 4, Lq, D, device=CUDA, dtype=dtype)
    k, v = torch.randn(2, 4, Lk, D, device=CUDA, dtype=dtype), torch.randn(2, 4, Lk, D, device=CUDA, dtype=dtype)
    keep = torch.rand(2, Lk, device=CUDA) > 0.2
    out = torch.full_like(q, float("nan"))
    attention_triton(q, k, v, causal=causal, key_padding_mask=keep, out=out)
    assert_close_to(out, attention_torch(q, k, v, causal=causal, key_padding_mask=keep))


@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_bf16_velocity(kind):
    x = torch.randn(4, 4, 64, 64, device=CUDA, dtype=torch.bfloat16)
    v = torch.randn(8, 4, 64, 64, device=CUDA, dtype=torch.bfloat16)
    g = 5.0 if kind == "float" else torch.rand(4, device=CUDA) * 8
    out = torch.full_like(x, float("nan"))
    cfg_euler_triton(x, v, -0.05, g, out=out)
    assert_close_to(out, cfg_euler_step_torch(x, v, -0.05, g))


def test_auto_measures_on_cuda_and_keeps_the_faster():
    q = torch.randn(4, 8, 1024, 80, device=CUDA, dtype=torch.float16)
    got = kernels.attention(q, q, q)
    assert_close_to(got, attention_torch(q, q, q))
    (decision,) = kernels.decisions().values()
    assert decision.reason == "measured"
    assert decision.backend == ("triton" if decision.triton_ms < decision.torch_ms else "torch")


def test_triton_attention_under_torch_compile():
    q = torch.randn(2, 8, 256, 88, device=CUDA, dtype=torch.bfloat16)
    compiled = torch.compile(lambda a: kernels.attention(a, a, a, backend="triton"), fullgraph=True)
    assert_close_to(compiled(q), attention_torch(q, q, q))


def test_velocity_reaches_80_percent_of_copy_bandwidth():
    x = torch.randn(16, 4, 128, 128, device=CUDA, dtype=torch.bfloat16)
    v = torch.randn(32, 4, 128, 128, device=CUDA, dtype=torch.bfloat16)
    src = torch.empty(2 * x.numel(), device=CUDA, dtype=x.dtype)  # same traffic: reads 2N, writes 2N elements
    dst = torch.empty_like(src)
    kernel_ms = dispatch.time_ms(lambda: cfg_euler_triton(x, v, 0.1, 7.5))
    copy_ms = dispatch.time_ms(lambda: dst.copy_(src))
    assert copy_ms / kernel_ms >= 0.8, f"kernel {kernel_ms:.3f} ms vs copy {copy_ms:.3f} ms"


def _lora(rows, tokens, n_in, n_out, k, dtype=torch.bfloat16, rank=64, slots=8):
    """A pool's stacks (slot 0 zero) and a binding using every slot, slot 0 and negative scales included."""
    a = (torch.randn(slots + 1, rank, n_in, device=CUDA) / n_in ** 0.5).to(dtype)
    b = (torch.randn(slots + 1, n_out, rank, device=CUDA) / rank ** 0.5).to(dtype)
    a[0], b[0] = 0, 0
    x = torch.randn(rows, *tokens, n_in, device=CUDA, dtype=dtype)
    binding = torch.randint(0, slots + 1, (rows, k), device=CUDA), torch.randn(rows, k, device=CUDA)
    return x, a, b, *binding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,tokens,n_in,n_out,k", [
    (16, (4096,), 320, 320, 2), (8, (77,), 768, 640, 4), (4, (256,), 1280, 10240, 3), (64, (), 1280, 1280, 1),
])
def test_autotuned_lora(dtype, rows, tokens, n_in, n_out, k):
    x, a, b, slots, scales = _lora(rows, tokens, n_in, n_out, k, dtype)
    out = torch.full((rows, max(tokens, default=1), n_out), float("nan"), device=CUDA, dtype=dtype)
    lora_delta_triton(x.view(rows, -1, n_in), a, b, slots, scales, out=out)
    assert_close_to(out.view(rows, *tokens, n_out), lora_delta_torch(x, a, b, slots, scales))


def test_one_lora_cuda_graph_serves_every_binding():
    """Captured once; the pool rebinds rows by writing the binding in place, and the replay follows."""
    x, a, b, slots, scales = _lora(8, (1024,), 640, 640, 2)
    lora_delta_triton(x, a, b, slots, scales)  # tunes and compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lora_delta_triton(x, a, b, slots, scales)
    for _ in range(3):
        slots.copy_(torch.randint(0, a.shape[0], slots.shape, device=CUDA))
        scales.copy_(torch.randn(scales.shape, device=CUDA))
        graph.replay()
        assert_close_to(out, lora_delta_torch(x, a, b, slots, scales))


def test_auto_lora_measures_on_cuda():
    x, a, b, slots, scales = _lora(16, (4096,), 320, 320, 2)
    assert_close_to(lora_delta(x, a, b, slots, scales), lora_delta_torch(x, a, b, slots, scales))
    (decision,) = kernels.decisions().values()
    assert decision.reason == "measured"
