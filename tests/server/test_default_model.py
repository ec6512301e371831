"""The README's first command: `rfserve serve` with no model serves the embedded rf-shapes, offline."""
import base64
import io
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests.server.serving import ServerProcess, openai_client

pytestmark = pytest.mark.slow


@pytest.mark.smoke
def test_serve_with_no_model_serves_rf_shapes_offline():
    srv = ServerProcess()
    try:
        client = openai_client(srv)
        assert [m.id for m in client.models.list().data] == ["rf-shapes"]
        resp = client.images.generate(prompt="two red circles on a blue background", n=2, extra_body={"seed": 1})
        images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in resp.data]
        assert [im.size for im in images] == [(64, 64), (64, 64)] and resp.seed == 1
    finally:
        srv.stop()


@pytest.mark.smoke
def test_generate_with_no_model_writes_a_png(tmp_path):
    out = tmp_path / "x.png"
    proc = subprocess.run([sys.executable, "-m", "rfserve.server.cli", "generate", "a red circle on a blue background",
                           "-o", str(out), "--seed", "3"], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Image.open(out).size == (64, 64)
