"""Rectified-flow updates with classifier-free guidance, read straight from the model's (2B, ...) output.

Guidance is a float, or a (B,) tensor when the batcher mixes requests with different scales in one batch.
Maths is fp32 and the result has x's dtype, in the Triton kernels and in their twins alike.
"""
from __future__ import annotations

import torch

from rfserve.kernels import dispatch


def _rows(w, x: torch.Tensor):
    """A float stays a float; a (B,) tensor becomes fp32 (B, 1, ..., 1) to broadcast over x."""
    if not isinstance(w, torch.Tensor):
        return float(w)
    return w.to(device=x.device, dtype=torch.float32).view(-1, *([1] * (x.ndim - 1)))


def _check(x, v, w, name):
    if v.shape[0] != 2 * x.shape[0] or v.shape[1:] != x.shape[1:]:
        raise ValueError(f"{name} must be (2B, ...) for x (B, ...) = {tuple(x.shape)}, got {tuple(v.shape)}")
    if isinstance(w, torch.Tensor) and tuple(w.shape) != (x.shape[0],):
        raise ValueError(f"a guidance tensor must be (B,) = ({x.shape[0]},), got {tuple(w.shape)}")


def _key(x, v, w):
    """Elementwise: what matters besides the element count (`dispatch.run`'s sizes) is dtypes and per-row guidance."""
    return (x.dtype, v.dtype, isinstance(w, torch.Tensor))


def cfg_euler_step_torch(x, v, dt, guidance):
    v_u, v_c = v.float().chunk(2)  # unconditional half first
    g = _rows(guidance, x)
    return (x.float() + dt * (v_u + g * (v_c - v_u))).to(x.dtype)


def janus_cfg_euler_step_torch(x, v, dt, w):
    v_c, v_u = v.float().chunk(2)  # conditional half first
    w = _rows(w, x)
    return (x.float() + dt * (w * v_c - (w - 1.0) * v_u)).to(x.dtype)


def perflow_step_torch(x, eps, *, lam, eta, inv_span, dt, guidance=None):
    e = eps.float()
    if guidance is not None:
        e_u, e_c = e.chunk(2)  # unconditional half first
        e = e_u + _rows(guidance, x) * (e_c - e_u)
    xf = x.float()
    x_end = lam * xf + eta * e  # the window's end point
    vel = (x_end - xf) * inv_span
    return (xf + dt * vel).to(x.dtype)


def cfg_euler_step(x, v, dt, guidance, *, backend="auto"):
    """x + dt·(v_u + guidance·(v_c − v_u)), with v = model output (2B, ...) as [unconditional; conditional]."""
    _check(x, v, guidance, "v")

    def run_triton():
        from rfserve.kernels.triton_velocity import cfg_euler_triton

        return cfg_euler_triton(x, v, dt, guidance)

    return dispatch.run("cfg_euler", _key(x, v, guidance), x.device, backend,
                        run_triton, lambda: cfg_euler_step_torch(x, v, dt, guidance), sizes=(x.numel(),))


def janus_cfg_euler_step(x, v, dt, w, *, backend="auto"):
    """JanusFlow's x + dt·(w·v_c − (w−1)·v_u), with v = (2B, ...) model output as [conditional; unconditional]."""
    _check(x, v, w, "v")

    def run_triton():
        from rfserve.kernels.triton_velocity import cfg_euler_triton

        return cfg_euler_triton(x, v, dt, w, cond_first=True)

    return dispatch.run("janus_cfg_euler", _key(x, v, w), x.device, backend,
                        run_triton, lambda: janus_cfg_euler_step_torch(x, v, dt, w),
                        sizes=(x.numel(),))


def perflow_step(x, eps, *, lam, eta, inv_span, dt, guidance=None, backend="auto"):
    """One Euler step inside a PeRFlow window: eps → window end (lam·x + eta·e) → velocity → x + dt·v.

    With guidance, eps is (2B, ...) [unconditional; conditional]; without, eps is (B, ...).
    lam, eta and inv_span = 1/(t_end − t_current) come from the caller's window schedule.
    """
    if guidance is None:
        if eps.shape != x.shape:
            raise ValueError(f"eps must match x {tuple(x.shape)} without guidance, got {tuple(eps.shape)}")
    else:
        _check(x, eps, guidance, "eps")
    coeffs = dict(lam=lam, eta=eta, inv_span=inv_span, dt=dt)

    def run_triton():
        from rfserve.kernels.triton_velocity import perflow_triton

        return perflow_triton(x, eps, guidance=guidance, **coeffs)

    key = (*_key(x, eps, guidance), guidance is None)
    return dispatch.run("perflow", key, x.device, backend,
                        run_triton, lambda: perflow_step_torch(x, eps, guidance=guidance, **coeffs), sizes=(x.numel(),))
