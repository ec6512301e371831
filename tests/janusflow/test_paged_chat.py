"""The paged KV cache under chat: decode over scattered blocks equals `generate()`, batched and chunked prefill
equal one prompt at a time, a pool too small for every stream preempts and recomputes without changing a
token, and a prompt larger than the pool fails alone as out of memory."""
import time

import numpy as np
import pytest
import torch

from rfserve.model_zoo.janusflow.decoder import JanusFlowChat
from rfserve.model_zoo.paged_kv import PAGE, BlockAllocator, PromptChunk, blocks_for
from rfserve.server.chat import batcher as batcher_module
from rfserve.server.chat.batcher import ChatSequence, ContinuousBatcher
from tests.janusflow.greedy import greedy
from tests.janusflow.test_chat_batcher import Collector


@pytest.fixture(scope="module")
def chat(janus_pipe):
    return JanusFlowChat(janus_pipe.parts)


def random_prompts(chat, lengths, seed=0):
    rng = np.random.default_rng(seed)
    vocab = chat.parts.model.language_model.config.vocab_size
    return [[int(t) for t in rng.integers(10, vocab, n)] for n in lengths]


def hf_greedy(chat, ids: list[int], new: int) -> list[int]:
    """transformers' greedy `generate()`, EOS ignored: exactly `new` tokens."""
    lm = chat.parts.model.language_model
    out = lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)), max_new_tokens=new,
                      min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_paged_decode_equals_generate_over_scattered_blocks(chat):
    decoder = chat.decoder(slots=3, max_len=128)
    prompts = random_prompts(chat, (5, 21, 40))
    steps = 20
    # Hand out the blocks interleaved and backwards, so no sequence's blocks are contiguous or in order.
    pool = decoder.blocks.allocate(3 * max(blocks_for(len(p) + steps + 1) for p in prompts))
    tables = [pool[::-1][i::3] for i in range(3)]
    for ids, table in zip(prompts, tables):
        assert len(table) >= blocks_for(len(ids) + steps + 1)
    assert any(b - a != 1 for a, b in zip(tables[2], tables[2][1:]))
    out = greedy(decoder, prompts, steps, tables)
    for ids, tokens in zip(prompts, out):
        assert tokens == hf_greedy(chat, ids, steps + 1)


def test_batched_ragged_and_chunked_prefill_equal_one_at_a_time(chat):
    decoder = chat.decoder(slots=4, max_len=256)
    prompts = random_prompts(chat, (3, 17, 50, 33), seed=1)
    embeds = decoder.embed_many([(ids, None, []) for ids in prompts])
    tables = [decoder.blocks.allocate(blocks_for(len(ids))) for ids in prompts]
    alone = torch.cat([decoder.prefill([PromptChunk(e, 0, t)]) for e, t in zip(embeds, tables)])
    together = decoder.prefill([PromptChunk(e, 0, t) for e, t in zip(embeds, tables)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    # Chunked: 7 tokens a turn (not a multiple of PAGE), every prompt at once, fresh and continuing chunks mixed.
    for table in tables:
        decoder.blocks.free(table)
    tables = [decoder.blocks.allocate(blocks_for(len(ids))) for ids in prompts]
    done: dict[int, torch.Tensor] = {}
    start = 0
    while len(done) < len(prompts):
        live = [i for i, ids in enumerate(prompts) if i not in done]
        logits = decoder.prefill([PromptChunk(embeds[i][start:start + 7], start, tables[i]) for i in live])
        start += 7
        done.update({i: row for i, row in zip(live, logits) if start >= len(prompts[i])})
    chunked = torch.stack([done[i] for i in range(len(prompts))])
    torch.testing.assert_close(chunked, alone, rtol=1e-4, atol=1e-4)
    # and the decode after a chunked prefill reads what the chunks wrote
    tokens = [int(t) for t in chunked.argmax(-1)]
    step = decoder.decode(tokens, [len(p) for p in prompts], tables)
    for ids, t, row in zip(prompts, tokens, step):
        assert [t, int(row.argmax())] == hf_greedy(chat, ids, 2)


def test_the_null_block_and_the_allocator():
    pool = BlockAllocator(5)
    assert (pool.capacity, pool.free_blocks) == (4, 4)
    a = pool.allocate(3)
    assert a is not None and 0 not in a and len(set(a)) == 3
    assert pool.allocate(2) is None and pool.free_blocks == 1       # all or nothing
    pool.free(a)
    assert sorted(pool.allocate(4) or []) == [1, 2, 3, 4]


def run_streams(chat, prompts, max_tokens, *, slots, max_len=256, num_blocks=None, seconds=60):
    decoder = chat.decoder(slots, max_len, num_blocks)
    batcher = ContinuousBatcher(decoder, chat.tokenizer, eos_id=-1).start()
    seqs = []
    try:
        for ids, n in zip(prompts, max_tokens):
            sink = Collector()
            seq = ChatSequence(ids, None, [], n, 0.0, 1.0, [], None, sink)
            seqs.append((seq, sink))
            batcher.submit(seq)
        for _, sink in seqs:
            assert sink.done.wait(seconds)
        deadline = time.monotonic() + 5
        while batcher.load != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        batcher.close()
    assert decoder.blocks.free_blocks == decoder.blocks.capacity       # every block came back
    return batcher, seqs


def test_a_pool_too_small_preempts_and_every_stream_is_unchanged(chat, monkeypatch):
    monkeypatch.setattr(batcher_module, "PREFILL_CHUNK", 32)           # prompts over two or three turns
    prompts = random_prompts(chat, (30, 45, 20, 38), seed=2)
    max_tokens = [40, 30, 50, 35]
    # 12 usable blocks for streams that need 5, 5, 5 and 5 at their ends: at most two fit at once.
    batcher, seqs = run_streams(chat, prompts, max_tokens, slots=4, num_blocks=13)
    assert batcher.preemptions > 0
    for (seq, sink), ids, n in zip(seqs, prompts, max_tokens):
        want = hf_greedy(chat, ids, n)
        assert seq.generated == want
        assert [e.finish_reason for e in sink.events if e.finish_reason] == ["length"]   # one stream, one end
        assert sink.events[-1].completion_tokens == n and sink.events[-1].prompt_tokens == len(ids)
        assert "".join(e.delta for e in sink.events) == chat.tokenizer.decode(want, skip_special_tokens=True)


def test_a_prompt_larger_than_the_pool_fails_alone_as_out_of_memory(chat):
    prompts = random_prompts(chat, (12, 7 * PAGE, 20), seed=3)          # 7 blocks + 1 to spare > 7 usable
    batcher, seqs = run_streams(chat, prompts, [6, 6, 6], slots=3, num_blocks=8)
    (a, sink_a), (big, sink_big), (c, sink_c) = seqs
    assert sink_big.events[-1].out_of_memory and big.generated == []
    assert a.generated == hf_greedy(chat, prompts[0], 6) and c.generated == hf_greedy(chat, prompts[2], 6)
    # longer than max_len, with a pool that would hold it: the same answer
    batcher, seqs = run_streams(chat, random_prompts(chat, (70, 10)), [4, 4], slots=2, max_len=64)
    assert seqs[0][1].events[-1].out_of_memory and seqs[1][0].generated == hf_greedy(chat, seqs[1][0].ids, 4)
