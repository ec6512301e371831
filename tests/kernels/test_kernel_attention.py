"""The Triton attention kernel (CPU interpreter here) against its SDPA twin."""
import pytest
import torch

from rfserve import kernels
from rfserve.kernels.attention import attention_torch
from rfserve.kernels.triton_attention import attention_triton, head_dim_chunks

from kernel_checks import DEVICE, assert_close_to

# Served head dims, plus 33 and 100 (not multiples of 8): the last chunk crosses the head dim.
HEAD_DIMS = [33, 40, 64, 72, 80, 88, 100, 128, 160]
# One head dim per chunk pair the kernel compiles (`head_dim_chunks`), for the masked paths:
# (32, 16), (64, 0), (64, 16), (64, 32), (128, 0) crossing the head dim, (128, 32).
SPLIT_HEAD_DIMS = [40, 64, 80, 88, 100, 160]
DTYPES = [torch.float16, torch.float32]


def _qkv(B, H, Lq, Lk, D, dtype):
    return (torch.randn(B, H, Lq, D, dtype=dtype, device=DEVICE), torch.randn(B, H, Lk, D, dtype=dtype, device=DEVICE),
            torch.randn(B, H, Lk, D, dtype=dtype, device=DEVICE))


def _poisoned(q):
    return torch.full_like(q, float("nan"))


def _check(q, k, v, **kw):
    out = _poisoned(q)
    got = attention_triton(q, k, v, out=out, **kw)
    assert got is out
    assert_close_to(got, attention_torch(q, k, v, **kw))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", HEAD_DIMS)
def test_head_dims_cross_attention_to_77_tokens(D, dtype):
    _check(*_qkv(1, 2, 48, 77, D, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Lq,Lk", [(64, 64), (50, 77), (77, 50), (1, 40)])
@pytest.mark.parametrize("D", SPLIT_HEAD_DIMS)
def test_causal(D, Lq, Lk, dtype):
    _check(*_qkv(1, 2, Lq, Lk, D, dtype), causal=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", SPLIT_HEAD_DIMS)
def test_key_padding_mask_with_a_fully_masked_row(D, dtype, causal):
    q, k, v = _qkv(3, 2, 40, 77, D, dtype)
    keep = torch.rand(3, 77, device=DEVICE) > 0.4
    keep[1] = False  # SDPA returns zeros for rows that see no key
    keep[2, :3] = True
    _check(q, k, v, key_padding_mask=keep, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype):
    B, L, Lk, H, D = 2, 40, 77, 2, 80
    q = torch.randn(B, L, H, D, dtype=dtype, device=DEVICE).transpose(1, 2)  # (B, H, L, D) view of a projection
    kv = torch.randn(B, Lk, 2, H, D, dtype=dtype, device=DEVICE)  # packed keys and values
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, H, Lk, D)
    q_strided_d = torch.randn(B, H, L, 2 * D, dtype=dtype, device=DEVICE)[..., ::2]  # last dim not unit-stride
    assert not (q.is_contiguous() or k.is_contiguous() or q_strided_d.is_contiguous())
    _check(q, k, v)
    _check(q_strided_d, k, v, causal=True)


def test_explicit_scale():
    q, k, v = _qkv(1, 2, 33, 77, 40, torch.float32)
    _check(q, k, v, scale=0.3)


def test_default_output_layout_makes_the_head_merge_free():
    q, k, v = _qkv(2, 2, 20, 30, 40, torch.float32)
    out = attention_triton(q, k, v)
    assert out.transpose(1, 2).is_contiguous()  # (B, L, H, D) underneath
    assert_close_to(out, attention_torch(q, k, v))


def test_the_masked_tests_cover_every_chunk_pair():
    pairs = {head_dim_chunks(d) for d in HEAD_DIMS}
    assert {head_dim_chunks(d) for d in SPLIT_HEAD_DIMS} == pairs
    assert len(pairs) == len(SPLIT_HEAD_DIMS)


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_public_entry_point_matches_twin(backend):
    q, k, v = _qkv(2, 2, 24, 77, 72, torch.float16)
    keep = torch.rand(2, 77, device=DEVICE) > 0.3
    got = kernels.attention(q, k, v, key_padding_mask=keep, causal=True, backend=backend)
    assert_close_to(got, attention_torch(q, k, v, key_padding_mask=keep, causal=True))


@pytest.mark.parametrize("bad", [
    dict(key_padding_mask=torch.ones(2, 76, dtype=torch.bool, device=DEVICE)),
    dict(key_padding_mask=torch.ones(2, 77, device=DEVICE)),
    dict(backend="cuda"),
])
def test_rejects_bad_arguments(bad):
    q, k, v = _qkv(2, 2, 8, 77, 40, torch.float32)
    with pytest.raises(ValueError):
        kernels.attention(q, k, v, **bad)


def test_rejects_mismatched_shapes():
    q, k, v = _qkv(2, 2, 8, 77, 40, torch.float32)
    with pytest.raises(ValueError):
        kernels.attention(q, k[..., :32], v[..., :32])
