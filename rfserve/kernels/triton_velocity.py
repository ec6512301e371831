"""Fused rectified-flow updates in Triton: each reads x and the model output once and writes x once.

Unfused, `x + dt*(v_u + w*(v_c - v_u))` makes four passes over latent-sized memory and leaves
temporaries behind; here every element is loaded, combined in fp32 and stored in x's dtype.
The model output is (2B, ...) in one buffer, so the two halves sit `numel` elements apart.
"""
from __future__ import annotations

import torch

from rfserve.kernels.launch import Launch, check_device
from rfserve.kernels.triton_lang import tl, triton

BLOCK = 1024
CONFIGS = [triton.Config({"BLOCK": BLOCK})]  # Triton's default warps and stages; memory-bound, nothing to tune


@triton.jit
def _guidance(G, g, offs, row_numel, mask, PER_ROW: tl.constexpr):
    """The guidance weight of each element: one scalar, or one value per batch row. One return at the end:
    the compiler rejects an early return whose type (a tensor) differs from the last one (a scalar)."""
    if PER_ROW:
        w = tl.load(G + offs // row_numel, mask=mask, other=0.0).to(tl.float32)
    else:
        w = g
    return w


@triton.jit
def _cfg_euler_kernel(X, V, G, OUT, numel, row_numel, dt, g,
                      PER_ROW: tl.constexpr, COND_FIRST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask).to(tl.float32)
    first = tl.load(V + offs, mask=mask).to(tl.float32)
    second = tl.load(V + numel + offs, mask=mask).to(tl.float32)
    w = _guidance(G, g, offs, row_numel, mask, PER_ROW)
    if COND_FIRST:  # JanusFlow: (v_c, v_u)
        vel = w * first - (w - 1.0) * second
    else:  # (v_u, v_c)
        vel = first + w * (second - first)
    tl.store(OUT + offs, (x + dt * vel).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _perflow_kernel(X, E, G, OUT, numel, row_numel, lam, eta, inv_span, dt, g,
                    HAS_CFG: tl.constexpr, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(X + offs, mask=mask).to(tl.float32)
    e = tl.load(E + offs, mask=mask).to(tl.float32)
    if HAS_CFG:
        e_c = tl.load(E + numel + offs, mask=mask).to(tl.float32)
        w = _guidance(G, g, offs, row_numel, mask, PER_ROW)
        e = e + w * (e_c - e)
    x_end = lam * x + eta * e
    vel = (x_end - x) * inv_span
    tl.store(OUT + offs, (x + dt * vel).to(OUT.dtype.element_ty), mask=mask)


def _prepare(x, v, guidance, out):
    """Dense operands (flat offsets must agree between x and v) and the guidance as (pointer, scalar)."""
    x, v = x.contiguous(), v.contiguous()
    out = torch.empty_like(x) if out is None else out
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if isinstance(guidance, torch.Tensor):
        return x, v, out, guidance.to(device=x.device, dtype=torch.float32).contiguous(), 0.0, True
    return x, v, out, x, float(guidance), False  # G is never read when PER_ROW is False


def _run(launch: Launch):
    """Both kernels take (..., OUT, numel, ...) at positions 3 and 4."""
    out, numel = launch.args[3], launch.args[4]
    check_device(out, "velocity kernels")
    launch.kernel[(triton.cdiv(numel, BLOCK),)](*launch.args, **launch.constexprs, **launch.configs[0].all_kwargs())
    return out


def cfg_euler_launch(x, v, dt, guidance, *, cond_first=False, out=None) -> Launch:
    x, v, out, G, g, per_row = _prepare(x, v, guidance, out)
    numel = x.numel()
    return Launch(_cfg_euler_kernel, (x, v, G, out, numel, numel // x.shape[0], float(dt), g),
                  dict(PER_ROW=per_row, COND_FIRST=cond_first), CONFIGS)


def cfg_euler_triton(x, v, dt, guidance, *, cond_first=False, out=None):
    return _run(cfg_euler_launch(x, v, dt, guidance, cond_first=cond_first, out=out))


def perflow_launch(x, eps, *, lam, eta, inv_span, dt, guidance=None, out=None) -> Launch:
    x, eps, out, G, g, per_row = _prepare(x, eps, 0.0 if guidance is None else guidance, out)
    numel = x.numel()
    return Launch(_perflow_kernel, (x, eps, G, out, numel, numel // x.shape[0], float(lam), float(eta),
                                    float(inv_span), float(dt), g),
                  dict(HAS_CFG=guidance is not None, PER_ROW=per_row), CONFIGS)


def perflow_triton(x, eps, *, lam, eta, inv_span, dt, guidance=None, out=None):
    return _run(perflow_launch(x, eps, lam=lam, eta=eta, inv_span=inv_span, dt=dt, guidance=guidance, out=out))
