"""Checks that need CUDA: bf16, the autotuned (compiled) kernels, measured dispatch, torch.compile, bandwidth."""
import pytest
import torch

from rfserve import kernels
from rfserve.kernels import dispatch
from rfserve.kernels.attention import attention_torch
from rfserve.kernels.triton_attention import attention_triton
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
