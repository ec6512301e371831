"""The dispatcher: override precedence, CPU policy, and the cached per-shape measurement."""
import pytest
import torch

from rfserve import kernels
from rfserve.kernels import dispatch

CPU = torch.device("cpu")


def _never():
    raise AssertionError("this backend must not run")


def _tagged(tag):
    return lambda: torch.tensor([tag])


def test_cpu_auto_always_runs_the_twin_and_records_it():
    out = dispatch.run("op", (4,), CPU, "auto", _never, _tagged(2))
    assert out.item() == 2
    decision = kernels.decisions()[("op", (4,), "cpu")]
    assert decision.backend == "torch" and decision.triton_ms is None


def test_env_override_forces_either(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "triton")
    assert dispatch.run("op", (1,), CPU, "auto", _tagged(1), _never).item() == 1
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert dispatch.run("op", (1,), CPU, "auto", _never, _tagged(2)).item() == 2
    assert kernels.decisions() == {}  # forced calls measure nothing


def test_call_argument_beats_env(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "triton")
    assert dispatch.run("op", (1,), CPU, "torch", _never, _tagged(2)).item() == 2


@pytest.mark.parametrize("env", ["cuda", "Triton"])
def test_bad_env_value_is_an_error(monkeypatch, env):
    monkeypatch.setenv(dispatch.ENV, env)
    with pytest.raises(ValueError, match=dispatch.ENV):
        dispatch.run("op", (1,), CPU, "auto", _tagged(1), _tagged(2))


@pytest.fixture
def fake_device(monkeypatch):
    """Pretend the device can be timed; each callable's 'time' is the value it returns."""
    timed = []

    def fake_time(fn):
        timed.append(fn)
        return float(fn().item())

    monkeypatch.setattr(dispatch, "can_measure", lambda device: True)
    monkeypatch.setattr(dispatch, "time_ms", fake_time)
    return timed


@pytest.mark.parametrize("triton_ms,torch_ms,winner", [(1.0, 3.0, "triton"), (5.0, 2.0, "torch")])
def test_measures_once_per_key_and_keeps_the_faster(fake_device, triton_ms, torch_ms, winner):
    tri, tor = _tagged(triton_ms), _tagged(torch_ms)
    first = dispatch.run("op", (8, 8), CPU, "auto", tri, tor)
    assert len(fake_device) == 2
    assert first.item() == min(triton_ms, torch_ms)
    dispatch.run("op", (8, 8), CPU, "auto", tri, tor)
    assert len(fake_device) == 2  # cached: no second measurement
    decision = kernels.decisions()[("op", (8, 8), "cpu")]
    assert (decision.backend, decision.triton_ms, decision.torch_ms) == (winner, triton_ms, torch_ms)
    dispatch.run("op", (16, 8), CPU, "auto", tri, tor)
    assert len(fake_device) == 4  # a new shape is a new key


def test_a_triton_failure_at_warm_up_falls_back_to_torch(fake_device):
    def broken():
        raise RuntimeError("out of shared memory")

    assert dispatch.run("op", (2,), CPU, "auto", broken, _tagged(4.0)).item() == 4.0
    decision = kernels.decisions()[("op", (2,), "cpu")]
    assert decision.backend == "torch" and "shared memory" in decision.reason


def test_no_timing_inside_a_graph(fake_device, monkeypatch):
    monkeypatch.setattr(dispatch, "_inside_graph", lambda: True)
    assert dispatch.run("op", (3,), CPU, "auto", _never, _tagged(1.0)).item() == 1.0
    assert fake_device == [] and kernels.decisions() == {}


def test_public_ops_key_on_shape_and_dtype():
    q = torch.randn(1, 2, 16, 40)
    kernels.attention(q, q, q)
    kernels.attention(q.half(), q.half(), q.half())
    x = torch.randn(2, 4, 8, 8)
    kernels.cfg_euler_step(x, torch.randn(4, 4, 8, 8), 0.1, 2.0)
    made = kernels.decisions()
    assert sorted(k[0] for k in made) == ["attention", "attention", "cfg_euler"]
    assert all(d.backend == "torch" for d in made.values())


def test_dispatch_traces_into_one_graph_under_torch_compile():
    """The worker compiles the denoiser step, so dispatch must not break the graph (fullgraph=True)."""
    q = torch.randn(1, 2, 16, 40)
    x, v, g = torch.randn(2, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.rand(2) * 5

    def step(q, x, v, g):
        return kernels.attention(q, q, q), kernels.cfg_euler_step(x, v, 0.1, g)

    attn, stepped = torch.compile(step, backend="aot_eager", fullgraph=True)(q, x, v, g)
    torch.testing.assert_close(attn, torch.nn.functional.scaled_dot_product_attention(q, q, q))
    torch.testing.assert_close(stepped, kernels.velocity.cfg_euler_step_torch(x, v, 0.1, g))
