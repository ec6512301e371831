"""The benchmark's --tiny mode runs end to end on CPU and reports both sides. Eager only: compiling takes half a
minute here, and CI's dry run (benchmarks/gpu/run.sh dry) runs the compiled column."""
import json

from rfserve.benchmarks import bench_hunyuan


def test_tiny_benchmark_reports_ours_and_diffusers(tmp_path):
    bench_hunyuan.main(["--tiny", "--steps", "2", "--repeat", "1", "--compile-mode", "off",
                        "--out", str(tmp_path)])
    report = json.loads((tmp_path / "bench_hunyuan.json").read_text())
    assert report["size"] == "128x128" and report["steps"] == 2
    for side in ("ours", "diffusers"):
        assert set(report[side]) == {"encode_ms", "sample_ms", "decode_ms", "end_to_end_ms"}
        assert all(v > 0 for v in report[side].values())
    assert report["ours_compiled"] is None and report["capture"] is None
    assert "| one CFG step |" in (tmp_path / "bench_hunyuan.md").read_text()
