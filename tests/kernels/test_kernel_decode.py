"""Decode attention over a paged KV cache: the Triton kernel (CPU interpreter here) against its SDPA twin, and
the twin against a plain per-sequence SDPA over each sequence's first `length` keys."""
import pytest
import torch
import torch.nn.functional as F

from rfserve import kernels
from rfserve.kernels.decode import decode_attention_torch
from rfserve.kernels.triton_decode import INTERPRETER_CONFIG, decode_attention_triton, decode_launches, num_splits

from kernel_checks import DEVICE, assert_close_to


def _cache(blocks, kv_heads, page, D, dtype=torch.float32):
    return (torch.randn(blocks, kv_heads, page, D, dtype=dtype, device=DEVICE),
            torch.randn(blocks, kv_heads, page, D, dtype=dtype, device=DEVICE))


def _shuffled_table(B, max_blocks, blocks):
    """Each sequence's blocks at distinct, non-identity physical blocks."""
    return torch.randperm(blocks, device=DEVICE)[:B * max_blocks].view(B, max_blocks).int()


def _int32(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def reference(q, k_cache, v_cache, block_table, lengths, scale=None):
    """Per sequence: its blocks in order, cut at its length, plain SDPA with the kv heads repeated."""
    B, H, D = q.shape
    kv_heads, page = k_cache.shape[1], k_cache.shape[2]
    rows = []
    for b in range(B):
        n = int(lengths[b])
        blocks = block_table[b, :-(-n // page)].long()
        k = k_cache[blocks].transpose(0, 1).reshape(kv_heads, -1, D)[:, :n].repeat_interleave(H // kv_heads, 0)
        v = v_cache[blocks].transpose(0, 1).reshape(kv_heads, -1, D)[:, :n].repeat_interleave(H // kv_heads, 0)
        rows.append(F.scaled_dot_product_attention(q[b][:, None], k, v, scale=scale)[:, 0])  # (H, D)
    return torch.stack(rows)


def _check(q, k_cache, v_cache, block_table, lengths, **kw):
    twin = decode_attention_torch(q, k_cache, v_cache, block_table, lengths, **kw)
    assert_close_to(twin, reference(q, k_cache, v_cache, block_table, lengths, **kw))
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    got = decode_attention_triton(q, k_cache, v_cache, block_table, lengths, out=out, **kw)
    assert got is out
    assert_close_to(got, twin)


@pytest.mark.parametrize("H,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("D", [64, 80])
def test_paged_random_lengths_gqa_and_head_dims(H, kv_heads, D):
    B, page, max_blocks = 4, 8, 6  # 48 keys per sequence at most; the interpreter's tile is 16 keys, two pages
    k, v = _cache(B * max_blocks + 3, kv_heads, page, D)
    table = _shuffled_table(B, max_blocks, B * max_blocks + 3)
    lengths = _int32([1, 48, 13, 30])  # one key, a full table, and neither a multiple of the tile nor the page
    _check(torch.randn(B, H, D, device=DEVICE), k, v, table, lengths)


def test_pages_holding_several_tiles_and_an_explicit_scale():
    B, H, D, page = 3, 2, 64, 40  # 40 = 2.5 interpreter tiles per page
    k, v = _cache(7, H, page, D)
    table = _shuffled_table(B, 2, 7)
    _check(torch.randn(B, H, D, device=DEVICE), k, v, table, _int32([80, 41, 17]), scale=0.3)


def test_half_precision_gqa():
    """fp16 I/O with fp32 accumulation (bf16 needs a GPU: the interpreter's bf16 tl.dot is wrong)."""
    B, H, kv_heads, D, page = 3, 4, 2, 64, 8
    k, v = _cache(10, kv_heads, page, D, torch.float16)
    q = torch.randn(B, H, D, dtype=torch.float16, device=DEVICE)
    _check(q, k, v, _shuffled_table(B, 3, 10), _int32([24, 5, 17]))


def test_slot_cache_is_one_block_per_sequence():
    """The chat decoder's (slots, Hkv, max_len, D) cache with PAGE = max_len: rows 0..b−1 run, lengths =
    positions + 1. Rows past b are other slots and are never read."""
    slots, b, H, kv_heads, max_len, D = 5, 3, 4, 2, 64, 64
    k, v = _cache(slots, kv_heads, max_len, D)
    table = torch.arange(b, dtype=torch.int32, device=DEVICE)[:, None]  # (b, 1)
    positions = _int32([0, 63, 20])
    _check(torch.randn(b, H, D, device=DEVICE), k, v, table, positions + 1)


def test_strided_operands():
    B, H, D, page, blocks = 2, 4, 64, 16, 6
    q = torch.randn(B, 2 * H, D, device=DEVICE)[:, ::2]  # every other head of a wider projection
    packed = torch.randn(blocks, page, 2, H, D, device=DEVICE)  # (blocks, PAGE, k/v, Hkv, D): heads inside tokens
    k, v = packed[:, :, 0].transpose(1, 2), packed[:, :, 1].transpose(1, 2)  # (blocks, Hkv, PAGE, D)
    table = torch.randint(0, blocks, (B, 6), dtype=torch.int32, device=DEVICE)[:, ::2]  # (B, 3), strided
    lengths = torch.tensor([[37, 0], [9, 0]], dtype=torch.int32, device=DEVICE)[:, 0]
    assert not any(t.is_contiguous() for t in (q, k, v, table, lengths))
    _check(q, k, v, table, lengths)


def test_keys_past_a_length_are_never_read():
    """Stale or uninitialised blocks (NaN here) and table entries past the length (-1) change nothing."""
    B, H, D, page = 2, 2, 64, 8
    k, v = _cache(6, H, page, D)
    table = _int32([[0, 1, 2], [3, 4, -1]])
    lengths = _int32([9, 10])
    k[1, :, 1:], v[1, :, 1:], k[4, :, 2:], v[4, :, 2:], k[2], v[2], k[5], v[5] = (float("nan"),) * 8
    _check(torch.randn(B, H, D, device=DEVICE), k, v, table, lengths)


def test_a_sequence_of_no_keys_gets_zeros():
    """Length 0: a free slot padding a batch up to its bucket."""
    k, v = _cache(4, 2, 8, 64)
    q = torch.randn(2, 2, 64, device=DEVICE)
    table, lengths = _int32([[0, 1], [2, 3]]), _int32([0, 5])
    for out in (decode_attention_torch(q, k, v, table, lengths), decode_attention_triton(q, k, v, table, lengths)):
        assert out[0].eq(0).all() and out[1].abs().sum() > 0
    _check(q, k, v, table, lengths)


def test_every_split_shares_the_keys():
    """Enough tiles that several splits each take some (the interpreter's grid has them run one by one)."""
    B, H, D, page, max_blocks = 1, 2, 64, 16, 16
    assert num_splits(B, H, page * max_blocks) == 4
    k, v = _cache(max_blocks, H, page, D)
    table = _shuffled_table(B, max_blocks, max_blocks)
    for length in (256, 129, 70):  # 4 splits of 4 tiles; 9 tiles as 3+3+3; 5 tiles as 2+2+1
        _check(torch.randn(B, H, D, device=DEVICE), k, v, table, _int32([length]))


def test_one_launch_serves_every_lengths_tensor():
    """Lengths are data: the grid, the scalars and the constexprs are the same whatever they hold, and the same
    tensors rewritten in place give the right answers (as a replayed CUDA graph would)."""
    B, H, D, page = 3, 4, 64, 8
    k, v = _cache(12, 2, page, D)
    q, table = torch.randn(B, H, D, device=DEVICE), _shuffled_table(B, 4, 12)
    lengths = _int32([1, 2, 3])
    first = decode_launches(q, k, v, table, lengths)
    scalars = [a for a in first.split.args if not isinstance(a, torch.Tensor)]
    for values in ([32, 7, 16], [0, 31, 1]):
        lengths.copy_(_int32(values))
        again = decode_launches(q, k, v, table, lengths)
        assert again.grid == first.grid and again.split.constexprs == first.split.constexprs
        assert [a for a in again.split.args if not isinstance(a, torch.Tensor)] == scalars
        _check(q, k, v, table, lengths)


def test_the_twin_compiles_once_for_every_lengths_tensor():
    B, H, D, page = 2, 4, 64, 8
    k, v = _cache(8, 2, page, D)
    q, table = torch.randn(B, H, D, device=DEVICE), _shuffled_table(B, 4, 8)
    torch._dynamo.reset()
    compiled = torch.compile(decode_attention_torch, fullgraph=True, dynamic=False, backend="eager")
    compiled(q, k, v, table, _int32([3, 20]))
    with torch.compiler.set_stance("fail_on_recompile"):
        for values in ([32, 1], [9, 17]):
            lengths = _int32(values)
            assert_close_to(compiled(q, k, v, table, lengths), reference(q, k, v, table, lengths))


def test_interpreter_tile_is_one_of_the_tuned_tiles():
    tuned = {c.kwargs["BLOCK_N"] for c in decode_launches(*_small_args()).split.configs}
    assert INTERPRETER_CONFIG["BLOCK_N"] in tuned


def _small_args():
    k, v = _cache(4, 2, 8, 64)
    return torch.randn(2, 4, 64, device=DEVICE), k, v, _int32([[0, 1], [2, 3]]), _int32([3, 16])


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_public_entry_point_matches_reference(backend):
    args = _small_args()
    assert_close_to(kernels.decode_attention(*args, backend=backend), reference(*args))


@pytest.mark.parametrize("name,bad", [
    ("q", lambda a: {**a, "q": a["q"][:, :, None]}),
    ("v_cache", lambda a: {**a, "v_cache": a["v_cache"][:, :, :4]}),
    ("k_cache", lambda a: {**a, "k_cache": a["k_cache"][..., :32], "v_cache": a["v_cache"][..., :32]}),
    ("k_cache", lambda a: {**a, "k_cache": a["k_cache"].repeat(1, 3, 1, 1),  # 6 kv heads for 4 query heads
                           "v_cache": a["v_cache"].repeat(1, 3, 1, 1)}),
    ("v_cache", lambda a: {**a, "v_cache": a["v_cache"].half()}),
    ("block_table", lambda a: {**a, "block_table": a["block_table"].long()}),
    ("block_table", lambda a: {**a, "block_table": a["block_table"][:1]}),
    ("lengths", lambda a: {**a, "lengths": a["lengths"].long()}),
    ("lengths", lambda a: {**a, "lengths": a["lengths"][:, None]}),
    ("backend", lambda a: {**a, "backend": "cuda"}),
])
def test_rejects_bad_arguments_naming_them(name, bad):
    q, k, v, table, lengths = _small_args()
    args = bad(dict(q=q, k_cache=k, v_cache=v, block_table=table, lengths=lengths))
    with pytest.raises(ValueError, match=name):
        kernels.decode_attention(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("block_table"),
                                 args.pop("lengths"), **args)
