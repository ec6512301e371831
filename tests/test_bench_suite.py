"""The latency suite runs end to end on CPU and writes the documented JSON, markdown and plots."""
import json

import pytest

from rfserve.benchmarks.suite import main as suite

pytestmark = pytest.mark.slow


def test_suite_json_schema_and_outputs(tmp_path):
    report = suite(["--arch", "tiny", "--batches", "1,2", "--concurrency", "1,2", "--requests", "4",
                    "--open-requests", "6", "--repeats", "1", "--port", "8793", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert saved["model"] == report["model"]
    assert {"date", "torch", "device", "python"} <= set(saved["env"])
    rows = saved["model_level"]
    assert [(r["batch"], r["size"]) for r in rows] == [(1, "16x16"), (2, "16x16")]
    for r in rows:
        for stage in ("encode", "sample", "decode", "e2e"):
            assert r[stage]["ours_ms"] > 0 and r[stage]["baseline_ms"] > 0
            assert r[stage]["speedup"] == pytest.approx(r[stage]["baseline_ms"] / r[stage]["ours_ms"])
    http = saved["http"]
    assert http["time_to_first_image_s"] > 0
    assert [r["concurrency"] for r in http["closed_loop"]] == [1, 2]
    assert all(r["errors"] == 0 and r["p50_ms"] <= r["p99_ms"] for r in http["closed_loop"])
    assert http["open_loop"]["lost"] == 0 and "p99_ms" in http["open_loop"]
    assert "| 16x16 | 1 |" in (tmp_path / "suite.md").read_text()
    for png in ("throughput_vs_batch.png", "latency_vs_concurrency.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
