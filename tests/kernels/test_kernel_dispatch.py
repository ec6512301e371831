"""The dispatcher: override precedence, CPU policy, the cached per-bucket measurement, no measuring after ready,
and the kernel's self-check on first use."""
import pytest
import torch

from rfserve import kernels
from rfserve.kernels import dispatch, tuning

CPU = torch.device("cpu")


def _never():
    raise AssertionError("this backend must not run")


def _tagged(tag):
    return lambda: torch.tensor([tag])


def test_cpu_auto_always_runs_the_twin_and_records_it():
    out = dispatch.run("op", (4,), CPU, "auto", _never, _tagged(2))
    assert out.item() == 2
    decision = kernels.decisions()[("op", (4,), (), "cpu")]
    assert decision.backend == "torch" and decision.triton_ms is None


def test_env_override_forces_either(monkeypatch):
    monkeypatch.setenv(dispatch.ENV, "triton")
    ran = []
    kernel = lambda: ran.append(1) or torch.tensor([1])                 # noqa: E731
    assert [dispatch.run("op", (1,), CPU, "auto", kernel, _tagged(1)).item() for _ in range(2)] == [1, 1]
    assert ran == [1, 1]                                                # the twin ran once: the self-check
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


def _timed(ms):
    """A backend that 'takes' `ms` on the fake device, and returns what the other backend returns."""
    def fn():
        return torch.tensor([1.0])
    fn.ms = ms
    return fn


@pytest.fixture
def fake_device(monkeypatch):
    """Pretend the device can be timed; each callable's time is its `ms`."""
    timed = []

    def fake_time(fn):
        timed.append(fn)
        fn()
        return fn.ms

    monkeypatch.setattr(dispatch, "can_measure", lambda device: True)
    monkeypatch.setattr(dispatch, "time_ms", fake_time)
    return timed


@pytest.mark.parametrize("triton_ms,torch_ms,winner", [(1.0, 3.0, "triton"), (5.0, 2.0, "torch")])
def test_measures_once_per_key_and_keeps_the_faster(fake_device, triton_ms, torch_ms, winner):
    tri, tor = _timed(triton_ms), _timed(torch_ms)
    dispatch.run("op", "kind", CPU, "auto", tri, tor, sizes=(8, 77))
    assert len(fake_device) == 2
    dispatch.run("op", "kind", CPU, "auto", tri, tor, sizes=(7, 120))
    assert len(fake_device) == 2  # the same buckets: no second measurement
    decision = kernels.decisions()[("op", "kind", (8, 128), "cpu")]
    assert (decision.backend, decision.triton_ms, decision.torch_ms) == (winner, triton_ms, torch_ms)
    dispatch.run("op", "kind", CPU, "auto", tri, tor, sizes=(16, 120))
    assert len(fake_device) == 4  # a new bucket is a new key


def test_nothing_is_measured_after_ready(fake_device):
    """Once frozen, a new bucket takes the winner of the nearest measured bucket of its kind, and a kind never
    measured takes the twin; neither times anything."""
    dispatch.run("op", "kind", CPU, "auto", _timed(1.0), _timed(2.0), sizes=(1, 64))     # triton wins
    dispatch.run("op", "kind", CPU, "auto", _timed(3.0), _timed(2.0), sizes=(1, 8192))   # torch wins
    timed = len(fake_device)
    tuning.freeze()
    assert dispatch.run("op", "kind", CPU, "auto", _tagged(5.0), _tagged(5.0), sizes=(1, 200)).item() == 5.0
    assert dispatch.run("op", "kind", CPU, "auto", _never, _tagged(2.0), sizes=(2, 3000)).item() == 2.0
    assert dispatch.run("op", "other", CPU, "auto", _never, _tagged(2.0), sizes=(1, 64)).item() == 2.0
    assert len(fake_device) == timed
    made = kernels.decisions()
    assert made[("op", "kind", (1, 256), "cpu")].backend == "triton"            # 2 powers of two from 64
    assert made[("op", "kind", (2, 4096), "cpu")].backend == "torch"            # 2 from 8192
    assert "(1, 64)" in made[("op", "kind", (1, 256), "cpu")].reason
    assert made[("op", "other", (1, 64), "cpu")].reason == "not measured before ready"


def test_a_kernel_that_disagrees_with_its_twin_is_disabled_for_that_key(monkeypatch, caplog):
    """The first launch per key is compared with the twin: a wrong result or a launch error sends that key to
    the twin for good (the environment cannot override it), logs one line, and serves the twin's result; other
    keys and an explicit `backend="triton"` still run the kernel."""
    monkeypatch.setenv(dispatch.ENV, "triton")

    def broken():
        raise RuntimeError("misaligned address")

    with caplog.at_level("WARNING", logger=dispatch.log.name):
        assert dispatch.run("op", "kind", CPU, "auto", _tagged(9.0), _tagged(2.0), sizes=(4,)).item() == 2.0
        assert dispatch.run("op", "kind", CPU, "auto", _never, _tagged(2.0), sizes=(3,)).item() == 2.0
        assert dispatch.run("op", "kind", CPU, "auto", broken, _tagged(2.0), sizes=(64,)).item() == 2.0
        assert dispatch.run("op", "kind", CPU, "auto", _never, _tagged(2.0), sizes=(64,)).item() == 2.0
    assert len(caplog.records) == 2 and "misaligned address" in caplog.records[1].getMessage()
    made = kernels.decisions()
    assert made[("op", "kind", (4,), "cpu")].reason.startswith("self-check failed: max abs difference 7")
    assert made[("op", "kind", (64,), "cpu")].backend == "torch"
    assert dispatch.run("op", "kind", CPU, "triton", _tagged(9.0), _never, sizes=(4,)).item() == 9.0
    assert dispatch.run("op", "kind", CPU, "auto", _tagged(2.0), _tagged(2.0), sizes=(16,)).item() == 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_self_check_tolerance_follows_the_dtype(dtype):
    want = torch.linspace(-4, 4, 64).to(dtype)
    atol, _ = dispatch.TOLERANCE[dtype]
    assert dispatch.mismatch((want.float() + atol / 2).to(dtype), want) == ""
    assert dispatch.mismatch(want + 2, want).startswith("max abs difference 2")
    assert dispatch.mismatch(torch.full_like(want, float("nan")), want).startswith("max abs difference inf")
    assert dispatch.mismatch(want[:32], want).startswith(f"got {dtype} (32,)")


def test_a_triton_failure_at_warm_up_falls_back_to_torch(fake_device):
    def broken():
        raise RuntimeError("out of shared memory")

    assert dispatch.run("op", (2,), CPU, "auto", broken, _timed(4.0)).item() == 1.0
    decision = kernels.decisions()[("op", (2,), (), "cpu")]
    assert decision.backend == "torch" and "shared memory" in decision.reason


def test_no_timing_inside_a_graph(fake_device, monkeypatch):
    monkeypatch.setattr(dispatch, "_inside_graph", lambda: True)
    assert dispatch.run("op", (3,), CPU, "auto", _never, _tagged(1.0)).item() == 1.0
    assert fake_device == [] and kernels.decisions() == {}


def test_public_ops_key_on_kind_and_size_buckets():
    q = torch.randn(1, 2, 16, 40)
    kernels.attention(q, q, q)
    kernels.attention(q.half(), q[:, :, :9].half(), q[:, :, :9].half())     # 9 keys: the bucket of 16
    x = torch.randn(2, 4, 8, 8)
    kernels.cfg_euler_step(x, torch.randn(4, 4, 8, 8), 0.1, 2.0)
    made = kernels.decisions()
    assert {k[:3] for k in made} == {
        ("attention", (2, 40, torch.float16, False, False), (1, 16, 16)),
        ("attention", (2, 40, torch.float32, False, False), (1, 16, 16)),
        ("cfg_euler", (torch.float32, torch.float32, False), (512,))}
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
