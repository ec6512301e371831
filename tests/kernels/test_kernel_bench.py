"""The kernel benchmark runs end to end on CPU and writes its JSON and markdown."""
import json

import pytest
import torch

from rfserve.benchmarks import bench_kernels


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run needs the Triton interpreter from process start")
def test_cpu_run_writes_json_and_markdown(tmp_path):
    bench_kernels.main(["--out", str(tmp_path), "--device", "cpu"])
    report = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert report["environment"]["interpreter"] is True
    assert len(report["attention"]) == len(bench_kernels.CPU_ATTENTION)
    for row in report["attention"]:
        assert row["ms"]["ours (triton)"] > 0 and row["dispatch"] == "torch"
    assert all(row["gbps"]["copy"] > 0 for row in report["velocity"])
    assert [row["name"] for row in report["lora"]] == [name for name, *_ in bench_kernels.CPU_LORA]
    assert all(t > 0 for row in report["lora"] for t in row["ms"].values())
    table = (tmp_path / "bench_kernels.md").read_text()
    assert "Not a performance figure" in table and "tiny cross d80 Lk77" in table and "tiny to_q" in table
