"""Greedy chat decoding straight on a paged decoder, for the tests that compare its tokens across paths."""
from rfserve.model_zoo.paged_kv import PromptChunk, blocks_for


def greedy(decoder, prompts: list[list[int]], steps: int, tables: list[list[int]] | None = None) -> list[list[int]]:
    """Prefill every prompt in one batch, then decode greedily for `steps` tokens, every sequence at once.
    Each sequence's blocks come from the decoder's allocator (or `tables`), enough for all its tokens, and go
    back at the end."""
    if tables is None:
        tables = [decoder.blocks.allocate(blocks_for(len(ids) + steps + 1)) for ids in prompts]
    try:
        embeds = decoder.embed_many([(ids, None, []) for ids in prompts])
        logits = decoder.prefill([PromptChunk(e, 0, t) for e, t in zip(embeds, tables)])
        tokens = [int(t) for t in logits.argmax(-1)]
        lengths = [len(ids) for ids in prompts]
        out = [[t] for t in tokens]
        for _ in range(steps):
            logits = decoder.decode(tokens, lengths, tables)
            tokens = [int(t) for t in logits.argmax(-1)]
            lengths = [n + 1 for n in lengths]
            for row, t in enumerate(tokens):
                out[row].append(t)
        return out
    finally:
        for t in tables:
            decoder.blocks.free(t)
