"""The host benchmark's measurement against a real server on the synthetic model: images are counted, the
server's CPU is read, a `url` answer's image is fetched, and the pace bounds what is delivered."""
import asyncio

import pytest

from rfserve.benchmarks.bench_host import headline, load, markdown
from rfserve.benchmarks.loadgen import environment
from rfserve.benchmarks.plots import plot_host
from tests.server.serving import ServerProcess

pytestmark = pytest.mark.slow
MS_PER_IMAGE = 4.0                     # the pace: at most 250 images a second


@pytest.fixture(scope="module")
def synthetic():
    srv = ServerProcess("--model", f"synthetic?ms_per_image={MS_PER_IMAGE:g}&sizes=64x64", "--max-batch", "8")
    yield srv
    srv.stop()


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_load_counts_images_and_server_cpu(synthetic, response_format, tmp_path):
    body = {"prompt": "p", "n": 2, "size": "64x64", "output_format": "png", "output_compression": 90,
            "response_format": response_format}
    row = asyncio.run(load(synthetic.url, body, 4, 1.0, 0.3, synthetic.proc.pid))
    assert row["errors"] == 0 and row["images"] > 0 and row["images"] == 2 * row["requests"]
    assert 0 < row["images_per_s"] <= 1.1 * 1000 / MS_PER_IMAGE         # the window can catch a few early answers
    assert row["server_cpu_ms_per_image"] > 0 and row["server_cores_busy"] > 0
    cost = [{"format": "png", "size": 512, "response_format": "b64_json", "n": 4, **row}]
    pace = [{"pace": 180, "clients": 16, "format": "png", **row, "share_of_pace": 0.5}]
    result = {"cost": cost, "pace": pace, "profile": [{"function": "f (m.py)", "share": 1.0}]}
    result["headline"] = headline(result)
    assert result["headline"]["png_cpu_ms"] == row["server_cpu_ms_per_image"]
    assert result["headline"]["jpeg_cpu_ms"] is None and result["headline"]["png_share"] == 0.5
    report = {"env": environment(), "versions": {"this checkout": result}}
    text = markdown(report)
    assert "| share of a 180 img/s pace, PNG | ≥ 95% | 50% |" in text and "`f (m.py)`" in text
    plot_host(report, tmp_path / "host.png")
    assert (tmp_path / "host.png").read_bytes()[:4] == b"\x89PNG"
