"""The joining benchmark's quick mode on the paced synthetic model: every request of every run is answered, on
and off replay the same stream in equal class shares, the ratios are those of the runs, and the report, its
markdown and its plot are written."""
import json

import pytest

from rfserve.benchmarks.bench_joining import main, stream

pytestmark = pytest.mark.slow


def test_stream_is_seeded_and_scales_with_the_rate():
    slow, fast = stream(40, 2.0, [1, 4, 25, 50], seed=3), stream(40, 8.0, [1, 4, 25, 50], seed=3)
    assert [a.steps for a in slow] == [a.steps for a in fast]
    assert [a.at for a in slow] == pytest.approx([4 * a.at for a in fast])
    assert sorted(a.steps for a in slow) == sorted([1, 4, 25, 50] * 10)           # equal shares
    assert [a.steps for a in stream(40, 2.0, [1, 4, 25, 50], seed=4)] != [a.steps for a in slow]


def test_quick_run_answers_every_request_and_reports_both_modes(tmp_path):
    report = main(["--quick", "--loads", "0.5,1.0", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_joining.json").read_text())
    assert saved == json.loads(json.dumps(report))
    (model,) = saved["models"]
    assert model["model"] == "synthetic" and model["mix"] == [1, 4, 25, 50]
    assert model["capacity_req_s"] == pytest.approx(model["saturated"]["off"]["images_per_s"])
    assert [lv["load"] for lv in model["levels"]] == [0.5, 1.0]
    for lv in model["levels"]:
        assert lv["rate"] == pytest.approx(lv["load"] * model["capacity_req_s"])
        for mode in ("off", "on"):
            run = lv[mode]
            assert run["answered"] == run["requests"] == model["requests"] and run["failed"] == 0
            assert {k: c["count"] for k, c in run["classes"].items()} == {"1": 4, "4": 4, "25": 4, "50": 4}
            assert all(0 < c["p50_ms"] <= c["p99_ms"] for c in run["classes"].values())
            assert run["classes"]["50"]["p50_ms"] > 50 * 2.0      # fifty steps of at least the batch's pace
        short = lv["off"]["classes"]["1"]["p99_ms"] / lv["on"]["classes"]["1"]["p99_ms"]
        assert lv["ratios"]["short_p99"] == pytest.approx(short)
        assert lv["ratios"]["throughput"] == pytest.approx(lv["on"]["images_per_s"] / lv["off"]["images_per_s"])
    text = (tmp_path / "bench_joining.md").read_text()
    assert "| 50% |" in text and "| 100% |" in text and "synthetic?ms_per_batch=2" in text
    assert (tmp_path / "joining_synthetic.png").read_bytes()[:4] == b"\x89PNG"
