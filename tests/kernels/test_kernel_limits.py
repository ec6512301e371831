"""The GPU limits both the compile check and the autotune pruning judge by, and the dispatcher's rule for the
shapes no configuration fits."""
import pytest
import torch

from rfserve import kernels
from rfserve.kernels import dispatch
from rfserve.kernels.limits import KB, LIMITS, Usage, blocks_per_sm, limits_for, problems
from rfserve.kernels.triton_attention import _configs
from rfserve.kernels.triton_autotune import fitting

H100, A100 = LIMITS[90], LIMITS[80]


@pytest.mark.parametrize("registers,shared,warps,expected", [
    (128, 0, 4, 4),            # registers: 128·32 per warp → 16 warps → 4 blocks of 4
    (255, 0, 8, 1),            # 255 rounds up to 256 per thread: 8 warps per SM, one block of 8
    (64, 100 * KB, 4, 2),      # shared: 228 KB per SM holds two 100 KB blocks plus 1 KB each
    (32, 0, 1, 32),            # the 32-blocks cap
    (64, 228 * KB, 4, 0),      # over the 227 KB a block may opt in to
    (256, 0, 4, 0),            # over 255 registers per thread
])
def test_blocks_per_sm_h100(registers, shared, warps, expected):
    assert blocks_per_sm(H100, registers=registers, shared=shared, num_warps=warps) == expected


def test_a100_has_less_shared_memory_than_h100():
    usage = Usage(registers=128, spills=0, shared=196 * KB, num_warps=8)
    assert problems(H100, usage) == []
    assert problems(A100, usage) == ["shared 196 KB > 163 KB", "no block fits an SM"]
    assert problems(H100, Usage(200, 2, 0, 4)) == ["spills 2 registers"]


def test_unknown_capability_takes_the_nearest_older_limits():
    assert limits_for(89) is A100 and limits_for(100) is H100
    with pytest.raises(ValueError, match="sm_70"):
        limits_for(70)


def test_pruning_keeps_the_configs_within_limits_and_names_why_when_none_is():
    configs = _configs()
    # a tile's shared memory grows with BLOCK_N × stages; one spills, one does not load
    usage = {id(c): Usage(128, 0, c.kwargs["BLOCK_N"] * c.num_stages * 1 * KB, c.num_warps) for c in configs}
    usage[id(configs[0])] = Usage(255, 6, 8 * KB, 4)
    usage[id(configs[1])] = None
    kept = fitting(configs, lambda c: usage[id(c)], A100)
    assert configs[0] not in kept and configs[1] not in kept
    assert kept and all(problems(A100, usage[id(c)]) == [] for c in kept)
    with pytest.raises(RuntimeError, match="no configuration fits A100.*spills 6 registers"):
        fitting(configs[:1], lambda c: usage[id(c)], A100)


def _never():
    raise AssertionError("Triton must not run here")


def test_attention_head_dims_no_config_fits_go_to_the_twin(monkeypatch):
    q = torch.randn(1, 1, 16, 512)  # SD's VAE: one 512-wide head
    monkeypatch.setattr(dispatch, "can_measure", lambda device: True)  # as on a GPU: auto would time both
    torch.testing.assert_close(kernels.attention(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q))
    decision = kernels.decisions()[("attention", (1, 512, torch.float32, False, False), (1, 16, 16), "cpu")]
    assert decision.backend == "torch" and "head dim 512" in decision.reason
    monkeypatch.setenv(dispatch.ENV, "triton")  # the environment's preference does not override the rule
    assert dispatch.run("attention", (), q.device, "auto", _never, lambda: q,
                        unsupported=dispatch.triton_unsupported("attention", 512)) is q


def test_the_rule_spares_the_served_head_dims_and_an_explicit_request():
    assert [dispatch.triton_unsupported("attention", d) for d in (40, 80, 88, 160, 256)] == [""] * 5
    assert dispatch.triton_unsupported("cfg_euler") == ""
    tagged = torch.zeros(1)
    assert dispatch.run("attention", (), torch.device("cpu"), "triton", lambda: tagged, _never,
                        unsupported="head dim 512") is tagged
