"""Chat's next-token choice per decode step: ours (`server.chat.sampling.next_tokens`, every row in one batched
pass and one sync, top-p looking at the head of the distribution first) against the plain per-row choice
(softmax, a full sort for top-p, `torch.multinomial`, one sync a row), in the same run, on one vocabulary.

    python -m rfserve.benchmarks.bench_sampling [--device cuda] [--vocab 102400] [--out DIR]

Logits are random normals times a scale: scale 10 is peaked as a language model's next-token distribution
usually is, scale 1 is nearly flat (top-p then keeps most of the vocabulary, the worst case for the head).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rfserve.benchmarks.loadgen import environment
from rfserve.benchmarks.timing import median_ms
from rfserve.model_zoo.seeding import generators
from rfserve.server.chat.sampling import next_tokens


def per_row(logits: torch.Tensor, temperature: float, top_p: float, gens: list[torch.Generator]) -> list[int]:
    """The plain way, a row at a time."""
    out = []
    for row, g in zip(logits, gens):
        probs = torch.softmax(row / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            sorted_p = torch.where(sorted_p.cumsum(-1) - sorted_p < top_p, sorted_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        out.append(int(torch.multinomial(probs, 1, generator=g)))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=102400)              # JanusFlow's and Janus-Pro's text vocabulary
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for scale in (10.0, 1.0):
        for top_p in (1.0, 0.9):
            for n in (int(r) for r in args.rows.split(",")):
                logits = torch.randn(n, args.vocab, generator=torch.Generator().manual_seed(n)).to(device) * scale
                gens = [torch.Generator(device).manual_seed(i) for i in range(n)]
                ours_gens = generators(list(range(n)))
                plain = median_ms(lambda: per_row(logits, 1.0, top_p, gens), device, warmup=1, repeat=args.repeat)
                ours = median_ms(lambda: next_tokens(logits, [1.0] * n, [top_p] * n, ours_gens), device,
                                 warmup=1, repeat=args.repeat)
                rows.append({"scale": scale, "top_p": top_p, "rows": n, "plain_ms": round(plain, 3),
                             "ours_ms": round(ours, 3), "speedup": round(plain / ours, 2)})
                print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"env": environment(), "threads": torch.get_num_threads(), "vocab": args.vocab, "rows": rows}
    (args.out / "sampling.json").write_text(json.dumps(report, indent=2))
    lines = ["| logits scale | top_p | rows | per-row ms | ours ms | speedup |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['scale']:g} | {r['top_p']:g} | {r['rows']} | {r['plain_ms']} | {r['ours_ms']} | {r['speedup']}× |"
              for r in rows]
    (args.out / "sampling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
