"""How the attention kernel splits a head dim into power-of-two chunks (pure Python, no kernel runs)."""
import itertools

from rfserve.kernels.triton_attention import head_dim_chunks, head_dim_pad

# Served head dims (benchmarks/served_launches.py): SD1.5's UNet, Hunyuan-DiT, SigLIP, the chat LLMs.
SERVED = {40: (32, 16), 80: (64, 16), 160: (128, 32), 88: (64, 32), 64: (64, 0), 128: (128, 0)}
WIDTHS = [16, 32, 64, 128, 256]  # what tl.dot and tl.arange accept, up to the largest head dim served in Triton


def _least_padding(d):
    """Brute force: of every one- or two-chunk cover of d, the narrowest, and of equals the one with fewer chunks."""
    covers = [(a, 0) for a in WIDTHS] + [(a, b) for a, b in itertools.product(WIDTHS, WIDTHS) if b <= a]
    return min((c for c in covers if sum(c) >= d), key=lambda c: (sum(c), c[1] > 0))


def test_served_head_dims_get_the_least_padding_pair():
    assert {d: head_dim_chunks(d) for d in SERVED} == SERVED
    assert all(head_dim_chunks(d) == _least_padding(d) for d in SERVED)


def test_every_head_dim_gets_the_least_padding_pair():
    dims = range(1, 257)
    assert [d for d in dims if head_dim_chunks(d) != _least_padding(d)] == []
    # a second chunk only where the first ends inside the head dim
    assert [d for d in dims if head_dim_chunks(d)[1] and head_dim_chunks(d)[0] >= d] == []


def test_head_dim_padding_is_a_power_of_two_of_at_least_16():
    assert [head_dim_pad(d) for d in [8, 40, 64, 88, 160]] == [16, 64, 64, 128, 256]
