"""A short soak in CI: overload with disconnects; nothing lost, no unexpected status.
The recorded 10,000-request run is in benchmarks/RESULTS.md."""
import pytest

from rfserve.benchmarks.soak import main as soak

pytestmark = pytest.mark.slow


def test_short_soak_loses_nothing(tiny_sd, tmp_path):
    report = soak(["--spawn", f"--model instaflow-0.9b={tiny_sd}", "--requests", "250", "--overload", "4",
                   "--disconnect", "0.1", "--port", "8791", "--out", str(tmp_path)])
    assert report["lost"] == 0 and report["other_status"] == {}
    assert report["answered"] + report["aborted"] == 250
    assert report["statuses"].get("200", 0) > 0
    assert report["server_exit_code"] == 0
    assert (tmp_path / "soak.json").is_file()
