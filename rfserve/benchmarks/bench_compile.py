"""Each family's fast path on the CPU: eager against compiled (inductor, `fullgraph=True`, `dynamic=False`), in one
run, with what the compiled graphs hold.

    python -m rfserve.benchmarks.bench_compile [--batches 1,8] [--out DIR]

For rf-shapes and tiny InstaFlow, Hunyuan-DiT and JanusFlow (text to image, and the chat decode step): seconds
per batch eager and compiled at each batch, the seconds capture took, graph breaks, graphs compiled, and the
operations inside the graphs (`recorded_graphs`), so that a kernel dispatch falling out of a graph shows.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch._dynamo.utils import counters

from rfserve.benchmarks.loadgen import environment
from rfserve.benchmarks.timing import median_ms
from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.paged_kv import blocks_for
from rfserve.model_zoo.registry import load_model, parse_spec

CPU = torch.device("cpu")


@dataclass
class RecordedGraph:
    """One compiled graph: its sorted operation names, and why CUDA graphs would not capture it (None: they would)."""
    ops: list[str]
    cudagraph_blocker: str | None = "not checked: inductor's inner compile did not run"


def cudagraph_blocker(gm, compiled, static_input_idxs) -> str | None:
    """Inductor's own reasons to skip CUDA graphs for a compiled graph, those that do not depend on the device, so
    that the CPU can check them: an op CUDA graphs cannot hold, a lowering that rules them out (an index_put with a
    boolean mask, control flow), and an input written in place that is not a static input. The last is what a
    cache handed in fresh each call does; a buffer at a fixed address marked static (parameters, buffers, and
    `torch._dynamo.mark_static_address`) may be written in place."""
    from torch._inductor.cudagraph_utils import check_for_mutation_ignore_cuda_graph_managed_tensor
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    node = get_first_incompatible_cudagraph_node(gm)
    return (compiled.disabled_cudagraphs_reason or (f"incompatible op {node.target}" if node is not None else None)
            or check_for_mutation_ignore_cuda_graph_managed_tensor(gm, compiled.mutated_inputs,
                                                                   compiled.mutated_input_idxs, static_input_idxs))


@contextlib.contextmanager
def recorded_graphs() -> Iterator[list[RecordedGraph]]:
    """While open, torch.compile records each graph before inductor compiles it, and inductor's verdict on CUDA
    graphs after. Counters and compiled code start from scratch; the AOT autograd cache is off, since a hit there
    would skip the inner compile that the verdict reads (inductor's own graph cache still serves)."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    real = torch.compile
    graphs: list[RecordedGraph] = []

    def backend(gm, inputs):
        graph = RecordedGraph(sorted({getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
                                      if n.op in ("call_function", "call_method")}))
        graphs.append(graph)

        def inner(lowered, example_inputs, **kwargs):
            compiled = compile_fx_inner(lowered, example_inputs, **kwargs)
            graph.cudagraph_blocker = cudagraph_blocker(lowered, compiled, kwargs.get("static_input_idxs", ()))
            return compiled
        with torch._functorch.config.patch(enable_autograd_cache=False):    # thread-local: set where it compiles
            return compile_fx(gm, inputs, inner_compile=inner)

    def compile_recording(fn, mode=None, fullgraph=False, dynamic=None):
        return real(fn, backend=backend, fullgraph=fullgraph, dynamic=dynamic)

    torch._dynamo.reset()
    counters.clear()
    torch.compile = compile_recording                       # type: ignore[assignment]
    try:
        yield graphs
    finally:
        torch.compile = real


def graph_stats() -> dict:
    return {"graph_breaks": sum(counters["graph_break"].values()),
            "graphs": counters["stats"]["unique_graphs"]}


def image_case(spec: str, steps: int | None = None) -> tuple[object, Callable[[int], Callable[[], object]]]:
    """The pipeline's fast path, and for each batch a call that makes that many images."""
    model = load_model(parse_spec(spec), CPU, torch.float32)
    d = model.card.defaults
    w, h = (int(x) for x in d.size.split("x"))

    def run(batch: int) -> Callable[[], object]:
        specs = [ImageSpec("a red circle", "", s, w, h, steps or d.steps, d.guidance) for s in range(batch)]
        return lambda: model.pipeline.run(specs)
    return model.pipeline.fast_path(), run


def chat_case(spec: str, slots: int) -> tuple[object, Callable[[int], Callable[[], object]]]:
    """The paged decoder's fast path, and for each batch a decode step over that many running sequences."""
    model = load_model(parse_spec(spec), CPU, torch.float32)
    assert model.chat is not None
    decoder = model.chat.decoder(slots, 256)

    lengths = [40 + i for i in range(slots)]
    tables = [decoder.blocks.allocate(blocks_for(n + 1)) or [] for n in lengths]   # the pool holds slots × 256

    def run(batch: int) -> Callable[[], object]:
        return lambda: decoder.decode([5] * batch, lengths[:batch], tables[:batch])
    fast = decoder.fast_path(tuple(range(1, slots + 1)))
    return _ChatCapture(fast, decoder), run


class _ChatCapture:
    """The decoder's fast path with capture driven by the decoder itself (it knows its buckets)."""

    def __init__(self, fast, decoder):
        self.fast, self.decoder = fast, decoder

    def prepare(self, mode):
        self.fast.prepare(mode)
        self.decoder.capture()

    def finish_capture(self):
        self.fast.finish_capture()


def measure(name: str, case, batches: list[int], repeat: int) -> dict:
    fast, run = case
    eager = {b: median_ms(run(b), CPU, warmup=1, repeat=repeat) for b in batches}
    with recorded_graphs() as graphs:
        start = time.perf_counter()
        fast.prepare("default")
        for b in batches:
            for _ in range(2):
                run(b)()
        fast.finish_capture()
        capture_s = time.perf_counter() - start
        stats = graph_stats()
        compiled = {b: median_ms(run(b), CPU, warmup=1, repeat=repeat) for b in batches}
        stats["recompiles_after_capture"] = graph_stats()["graphs"] - stats["graphs"]
    ops = sorted({op for g in graphs for op in g.ops})
    blockers = sorted({g.cudagraph_blocker for g in graphs if g.cudagraph_blocker})
    row = {"model": name, "capture_s": round(capture_s, 1), **stats, "cudagraph_blockers": blockers, "ops": ops}
    for b in batches:
        row[f"eager_ms_b{b}"] = round(eager[b], 2)
        row[f"compiled_ms_b{b}"] = round(compiled[b], 2)
        row[f"speedup_b{b}"] = round(eager[b] / compiled[b], 2)
    print(json.dumps({k: v for k, v in row.items() if k != "ops"}), flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    from rfserve.model_zoo.hunyuan_dit.arch import save_random_hunyuan
    from rfserve.model_zoo.janus.random_checkpoint import save_random_checkpoint as save_random_janus
    from rfserve.model_zoo.janusflow.random_checkpoint import save_random_checkpoint
    from rfserve.model_zoo.sd_config import save_random_sd

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        sd = save_random_sd(tmp / "sd", "tiny", seed=0)
        hunyuan = save_random_hunyuan(tmp / "hunyuan", "tiny", seed=0)
        janus = save_random_checkpoint(tmp / "janus", "tiny", seed=0)
        janus_pro = save_random_janus(tmp / "janus-pro", "tiny", seed=0)
        cases = [("rf-shapes", lambda: image_case("rf-shapes")),
                 ("instaflow tiny", lambda: image_case(f"instaflow-0.9b={sd}")),
                 ("hunyuan-dit tiny (2 steps)", lambda: image_case(f"hunyuan-dit-v1.2={hunyuan}", steps=2)),
                 ("janusflow tiny t2i (2 steps)", lambda: image_case(f"janusflow-1.3b={janus}", steps=2)),
                 ("janusflow tiny chat decode step", lambda: chat_case(f"janusflow-1.3b={janus}", max(batches))),
                 ("janus-pro tiny t2i", lambda: image_case(f"janus-pro-1b={janus_pro}")),
                 ("janus-pro tiny chat decode step", lambda: chat_case(f"janus-pro-1b={janus_pro}", max(batches)))]
        for name, case in cases:
            rows.append(measure(name, case(), batches, args.repeat))
    report = {"env": environment(), "threads": torch.get_num_threads(), "batches": batches, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile.json").write_text(json.dumps(report, indent=2))
    (args.out / "compile.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    """The timings table, then every operation each model's graphs hold (the kernel dispatches in them), then
    why CUDA graphs would skip any of them."""
    batches, rows = report["batches"], report["rows"]
    lines = ["| model | " + " | ".join(f"eager ms b{b} | compiled ms b{b} | speedup b{b}" for b in batches) +
             " | capture s | graph breaks | graphs | CUDA-graph safe |",
             "|---|" + "---|---|---|" * len(batches) + "---|---|---|---|"]
    for r in rows:
        cells = " | ".join(f"{r[f'eager_ms_b{b}']} | {r[f'compiled_ms_b{b}']} | {r[f'speedup_b{b}']}×" for b in batches)
        safe = "no" if r["cudagraph_blockers"] else "yes"
        lines.append(f"| {r['model']} | {cells} | {r['capture_s']} | {r['graph_breaks']} | {r['graphs']} | {safe} |")
    lines += ["", "Operations inside the compiled graphs:", ""]
    lines += [f"- {r['model']}: " + ", ".join(f"`{op}`" for op in r["ops"]) for r in rows]
    blocked = [f"- {r['model']}: {b.splitlines()[0]}" for r in rows for b in r["cudagraph_blockers"]]
    if blocked:
        lines += ["", "Why CUDA graphs would skip a graph (inductor's checks that do not depend on the device):", "",
                  *blocked]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
