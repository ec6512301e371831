"""Schemathesis with every check against ready servers: the published OpenAPI document is the API.

`-c all` covers more than server errors: every status and content type must be documented,
documented headers (Retry-After) present, schema-valid requests accepted, schema-invalid ones
refused with a 4xx, and a 405 must list `Allow`. CI bounds the cases per operation
(RFSERVE_FUZZ_EXAMPLES, default 40); the recorded runs in benchmarks/RESULTS.md used more.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.server.serving import ServerProcess

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = os.environ.get("RFSERVE_FUZZ_EXAMPLES", "40")
ST = shutil.which("st") or shutil.which("schemathesis")


def schemathesis(url: str, folder, *extra: str) -> subprocess.CompletedProcess:
    """`st run` in `folder`, where it keeps its cache, so nothing lands in the checkout."""
    return subprocess.run([ST, "--config-file", str(CONFIG), "run", f"{url}/openapi.json", "-c", "all",
                           "-n", EXAMPLES, "--seed", "1", "--workers", "1", "--no-color",
                           "--generation-database", "none", *extra],
                          capture_output=True, text=True, timeout=600, cwd=folder)


def assert_clean(proc: subprocess.CompletedProcess) -> None:
    tail = proc.stdout[-6000:]
    assert proc.returncode == 0, tail
    assert "passed" in tail and "failure" not in tail.split("SUMMARY")[-1], tail


def test_the_default_server_speaks_its_document(tmp_path):
    srv = ServerProcess()
    try:
        assert_clean(schemathesis(srv.url, tmp_path))
    finally:
        srv.stop()


def test_two_models_behind_a_key_speak_their_document(tmp_path):
    """Each model's own sizes and limits (one schema per model), and 401 wherever a key is needed."""
    srv = ServerProcess("--model", "rf-shapes", "--model", "rf-shapes-2rf", "--max-steps", "4",
                        "--api-key", "k1", "--protect-metrics")
    try:
        assert_clean(schemathesis(srv.url, tmp_path, "-H", "Authorization: Bearer k1"))
    finally:
        srv.stop()
