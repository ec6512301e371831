"""The fused velocity kernels (CPU interpreter here) against their torch twins."""
import pytest
import torch

from rfserve import kernels
from rfserve.kernels import velocity
from rfserve.kernels.triton_velocity import cfg_euler_triton, perflow_triton

from kernel_checks import DEVICE, assert_close_to

DTYPES = [torch.float16, torch.float32]
SHAPE = (3, 4, 12, 20)  # B=3: per-row guidance must not be confused with a scalar


def _guidance(kind):
    return float(torch.empty(()).uniform_(1.5, 9.0)) if kind == "float" else torch.rand(SHAPE[0], device=DEVICE) * 8 + 1


def _inputs(dtype):
    x = torch.randn(SHAPE, dtype=dtype, device=DEVICE)
    v = torch.randn(2 * SHAPE[0], *SHAPE[1:], dtype=dtype, device=DEVICE)  # (2B, C, H, W) model output
    return x, v, float(torch.empty(()).uniform_(-0.3, -0.05))


def _poisoned(x):
    return torch.full_like(x, float("nan"))


@pytest.mark.parametrize("kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cfg_euler(dtype, kind):
    x, v, dt = _inputs(dtype)
    g = _guidance(kind)
    out = _poisoned(x)
    assert cfg_euler_triton(x, v, dt, g, out=out) is out
    assert_close_to(out, velocity.cfg_euler_step_torch(x, v, dt, g))


@pytest.mark.parametrize("kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_janus_cfg_euler(dtype, kind):
    x, v, dt = _inputs(dtype)
    w = _guidance(kind)
    out = _poisoned(x)
    cfg_euler_triton(x, v, dt, w, cond_first=True, out=out)
    assert_close_to(out, velocity.janus_cfg_euler_step_torch(x, v, dt, w))


@pytest.mark.parametrize("kind", ["none", "float", "tensor"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_perflow_step(dtype, kind):
    x, v, dt = _inputs(dtype)
    guidance = None if kind == "none" else _guidance(kind)
    eps = v[: SHAPE[0]] if guidance is None else v
    coeffs = dict(lam=float(torch.rand(())) + 0.5, eta=float(torch.randn(())), inv_span=4.0 / 3.0, dt=dt)
    out = _poisoned(x)
    perflow_triton(x, eps, guidance=guidance, out=out, **coeffs)
    assert_close_to(out, velocity.perflow_step_torch(x, eps, guidance=guidance, **coeffs))


def test_twins_follow_the_written_formulas():
    """Pin the half order of each form on fp64 maths, so twin and kernel cannot agree on a wrong formula."""
    x, v, dt = _inputs(torch.float32)
    g = torch.rand(SHAPE[0], device=DEVICE) * 5 + 1
    gb = g.view(-1, 1, 1, 1).double()
    xd, first, second = x.double(), v[: SHAPE[0]].double(), v[SHAPE[0]:].double()
    assert_close_to(kernels.cfg_euler_step(x, v, dt, g, backend="triton"),
                    (xd + dt * (first + gb * (second - first))).float())
    assert_close_to(kernels.janus_cfg_euler_step(x, v, dt, g, backend="triton"),
                    (xd + dt * (gb * first - (gb - 1) * second)).float())
    lam, eta, inv_span = 0.8, 0.6, 2.5
    e = first + gb * (second - first)
    expected = xd + dt * ((lam * xd + eta * e) - xd) * inv_span
    got = kernels.perflow_step(x, v, lam=lam, eta=eta, inv_span=inv_span, dt=dt, guidance=g, backend="triton")
    assert_close_to(got, expected.float())


def test_mixed_dtypes_compute_in_fp32_and_return_x_dtype():
    x = torch.randn(SHAPE, dtype=torch.float32, device=DEVICE)
    v = torch.randn(2 * SHAPE[0], *SHAPE[1:], dtype=torch.float16, device=DEVICE)  # fp16 model, fp32 latents
    got = kernels.cfg_euler_step(x, v, 0.25, 7.5, backend="triton")
    assert got.dtype == torch.float32
    assert_close_to(got, velocity.cfg_euler_step_torch(x, v, 0.25, 7.5))


def test_channels_last_latents():
    x, v, dt = _inputs(torch.float32)
    x, v = x.to(memory_format=torch.channels_last), v.to(memory_format=torch.channels_last)
    assert_close_to(kernels.cfg_euler_step(x, v, dt, 3.0, backend="triton"),
                    velocity.cfg_euler_step_torch(x, v, dt, 3.0))


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_public_entry_points_agree_on_every_backend(backend):
    x, v, dt = _inputs(torch.float16)
    g = _guidance("tensor")
    assert_close_to(kernels.cfg_euler_step(x, v, dt, g, backend=backend), velocity.cfg_euler_step_torch(x, v, dt, g))
    assert_close_to(kernels.janus_cfg_euler_step(x, v, dt, g, backend=backend),
                    velocity.janus_cfg_euler_step_torch(x, v, dt, g))
    got = kernels.perflow_step(x, v[: SHAPE[0]], lam=0.9, eta=0.4, inv_span=2.0, dt=dt, backend=backend)
    assert_close_to(got, velocity.perflow_step_torch(x, v[: SHAPE[0]], lam=0.9, eta=0.4, inv_span=2.0, dt=dt))


@pytest.mark.parametrize("call", [
    lambda x, v: kernels.cfg_euler_step(x, v[:-1], 0.1, 2.0),
    lambda x, v: kernels.cfg_euler_step(x, v, 0.1, torch.ones(SHAPE[0] + 1, device=DEVICE)),
    lambda x, v: kernels.janus_cfg_euler_step(x, v[:, :2], 0.1, 2.0),
    lambda x, v: kernels.perflow_step(x, v, lam=1.0, eta=0.1, inv_span=1.0, dt=0.1),
])
def test_rejects_mismatched_shapes(call):
    x, v, _ = _inputs(torch.float32)
    with pytest.raises(ValueError):
        call(x, v)
