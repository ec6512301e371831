"""The LoRA benchmark's dry run on the tiny SD: every contender is timed in the same run against the no-LoRA batch,
the per-adapter contenders run one batch per adapter, and the contenders compare like with like: the mixed batch's
rows equal each adapter's own batch (ours and diffusers'), the fused weights equal diffusers' adapter, and the
adapters do change the images."""
import json

import pytest

from rfserve.benchmarks.bench_lora import CONTENDERS, TARGETS, by_adapter, main, row_specs

pytestmark = pytest.mark.slow


def test_rows_cycle_through_the_adapters_and_group_by_them():
    class Pipe:
        default_size = (16, 16)

    specs = row_specs(Pipe(), 5, ["a0", "a1"], steps=2, guidance=1.5)
    assert [s.lora for s in specs] == [(("a0", 1.0),), (("a1", 1.0),)] * 2 + [(("a0", 1.0),)]
    assert len({s.prompt for s in specs}) == len({s.seed for s in specs}) == 5
    assert {name: [s.seed for s in g] for name, g in by_adapter(specs).items()} == {"a0": [0, 2, 4], "a1": [1, 3]}


def test_dry_run_reports_every_contender_against_no_lora_and_compares_like_with_like(tmp_path):
    report = main(["--dry", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_lora.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["targets"] == TARGETS and saved["env"]["diffusers"] and saved["env"]["peft"]
    (size,) = saved["sizes"]
    (rank,) = size["ranks"]
    assert (size["size"], rank["rank"], rank["max_rank"], rank["per_row"]) == ("tiny", 4, 4, 2)
    parity = rank["parity"]
    for gap in ("mixed_vs_per_adapter_ours", "mixed_vs_per_adapter_diffusers", "fused_vs_diffusers"):
        assert parity[gap] < 1e-4, gap
    assert parity["adapter_effect"] > 1e-2
    (point,) = rank["points"]
    assert (point["rows"], point["adapters"]) == (2, 2)
    timed = point["contenders"]
    assert list(timed) == list(CONTENDERS)
    assert {n: t["batches"] for n, t in timed.items()} == {
        "none": 1, "mixed": 1, "per_adapter_ours": 2, "per_adapter_diffusers": 2, "fused": 1}
    for t in timed.values():
        assert 0 < t["sample_ms"] < t["ms"]
        assert t["ratio"] == pytest.approx(t["ms"] / timed["none"]["ms"])
    assert point["per_adapter_over_mixed"] == pytest.approx(timed["per_adapter_ours"]["ms"] / timed["mixed"]["ms"])
    assert point["mixed_over_none"] == timed["mixed"]["ratio"]
    text = (tmp_path / "bench_lora.md").read_text()
    assert "**tiny**" in text and "| 4 (4, 2) | 2 | 2 |" in text and "2 batches" in text
