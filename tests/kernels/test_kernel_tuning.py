"""Kernel tuning by size bucket, and none after ready: the buckets, the nearest-bucket rule, and the autotuner's
prune and timer once frozen (the timing itself needs a GPU: tests/kernels/test_kernel_gpu.py)."""
import torch

from rfserve.kernels import tuning
from rfserve.kernels.triton_attention import _TUNER, attention_launch


def test_buckets_are_powers_of_two_at_or_above():
    assert [tuning.bucket(n) for n in (0, 1, 2, 3, 16, 17, 77, 4096, 4097)] == [1, 1, 2, 4, 16, 32, 128, 4096, 8192]


def test_nearest_counts_powers_of_two_and_prefers_the_larger():
    known = [(1, 64), (1, 8192), (4, 1024)]
    assert tuning.nearest((1, 256), known) == (1, 64)
    assert tuning.nearest((1, 2048), known) == (1, 8192)
    assert tuning.nearest((2, 1024), known) == (4, 1024)
    assert tuning.nearest((1, 32), []) is None
    assert tuning.nearest((1, 512), [(1, 64), (1, 4096)]) == (1, 4096)      # 3 powers either way


def test_after_ready_the_autotuner_keeps_the_nearest_tuned_config_and_times_nothing():
    """The prune leaves one config, the one tuned in the nearest bucket of the same kind, so Triton's autotuner
    has nothing to compare; its timer returns without running the kernel."""
    q = torch.randn(1, 2, 200, 40)
    launch = attention_launch(q, q, q)
    named = dict(zip(_TUNER.kernel.arg_names, launch.args))
    assert (named["N_Q_BUCKET"], named["N_KV_BUCKET"]) == (256, 256)
    configs = _TUNER.configs
    kind = _TUNER._kind(named, launch.constexprs)
    _TUNER.tuned[kind] = {(64, 64): configs[2], (4096, 4096): configs[5]}
    try:
        tuning.freeze()
        assert _TUNER._prune(configs, named, **launch.constexprs) == [configs[2]]
        assert _TUNER._time(lambda: 1 / 0, (0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    finally:
        del _TUNER.tuned[kind]
        tuning.thaw()
