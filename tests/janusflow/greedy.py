"""Greedy chat decoding straight on a slot decoder, for the tests that compare its tokens across paths."""


def greedy(decoder, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Prefill each prompt into its own slot, then decode greedily for `steps` tokens, every row at once."""
    tokens, lengths = [], []
    for row, ids in enumerate(prompts):
        logits = decoder.prefill(row, decoder.embed(ids, None, []))
        tokens.append(int(logits.argmax()))
        lengths.append(len(ids))
    out = [[t] for t in tokens]
    for _ in range(steps):
        logits = decoder.decode(tokens, lengths)
        tokens = [int(t) for t in logits.argmax(-1)]
        lengths = [n + 1 for n in lengths]
        for row, t in enumerate(tokens):
            out[row].append(t)
    return out
