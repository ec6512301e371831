"""The CLI: checkpoint errors are one line naming the file; `generate` runs the engine."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rfserve.model_zoo.instaflow.pipeline import InstaFlowPipeline
from tests.server.serving import ServerProcess

pytestmark = pytest.mark.slow


def rfserve(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "rfserve.server.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rfserve: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture
def broken(tiny_sd, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(tiny_sd, root)
    return root


def test_missing_weights_file_is_named(broken):
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    proc = rfserve("serve", "--model", f"instaflow-0.9b={broken}", "--port", "0")
    assert_one_line_error(proc, "missing file", "unet/diffusion_pytorch_model.safetensors")


def test_malformed_config_is_named(broken):
    (broken / "vae" / "config.json").write_text("{not json")
    proc = rfserve("generate", "x", "-o", str(broken / "x.png"), "--model", f"instaflow-0.9b={broken}")
    assert_one_line_error(proc, "malformed file", "vae/config.json")


def test_missing_folder_and_uncached_hub_id(tmp_path):
    proc = rfserve("generate", "x", "-o", str(tmp_path / "x.png"), "--model", f"instaflow-0.9b={tmp_path}/nope")
    assert_one_line_error(proc, f"{tmp_path}/nope")
    proc = rfserve("generate", "x", "-o", str(tmp_path / "x.png"), "--model", "instaflow-0.9b",
                   env={"HF_HUB_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(proc, "XCLiu/instaflow_0_9B_from_sd_1_5", "HF_HUB_OFFLINE")


def test_unknown_preset_and_option(tmp_path):
    assert_one_line_error(rfserve("generate", "x", "-o", "x.png", "--model", "sdxl=foo/bar"), "unknown model preset")
    assert_one_line_error(rfserve("generate", "x", "-o", "x.png", "--model", "perflow-sd15=a/b?colour=red"),
                          "unknown option")


def test_hub_id_loads_from_the_hf_cache_offline(tiny_sd, tmp_path):
    """A snapshot in the standard cache layout is found with HF_HUB_OFFLINE=1."""
    repo = tmp_path / "cache" / "models--acme--tiny-flow"
    commit = "0" * 40
    shutil.copytree(tiny_sd, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "out.png"
    proc = rfserve("generate", "a cat", "-o", str(out), "--model", "instaflow-0.9b=acme/tiny-flow", "--seed", "5",
                   env={"HF_HUB_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Image.open(out).size == (16, 16)


def test_generate_writes_the_engine_image(tiny_sd, tmp_path):
    out = tmp_path / "cat.png"
    proc = rfserve("generate", "a cat", "-o", str(out), "--model", f"instaflow-2rf={tiny_sd}", "--seed", "9",
                   "--steps", "3", "--n", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = [tmp_path / "cat-0.png", tmp_path / "cat-1.png"]
    got = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    want = InstaFlowPipeline.from_pretrained(tiny_sd).generate(
        ["a cat"] * 2, [9, 10], steps=3, guidance=1.5, negative_prompts=["painting, unreal, twisted"] * 2)
    for g, w in zip(got, want):
        assert np.abs(g.astype(int) - w.astype(int)).max() <= 1
    assert "seed 9" in proc.stdout


def test_sigterm_during_the_background_compile_exits_0(tiny_sd, tmp_path, monkeypatch):
    """The CPU's default compiles after ready on a thread that cannot be interrupted: SIGTERM then still ends
    the server at once with exit 0, where the interpreter's teardown under the compile would abort it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cold"))     # nothing cached: it compiles
    srv = ServerProcess("--model", f"instaflow-0.9b={tiny_sd}", "--compile", "auto", "--device", "cpu")
    srv.proc.terminate()
    assert srv.proc.wait(30) == 0
    assert "exiting during the background compile" in srv.proc.stdout.read()
