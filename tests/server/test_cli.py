"""The CLI: a model that cannot load, whatever the cause, and a port that cannot be bound each end it with one
line naming the model, file or address; `generate` runs the engine."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

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


def _list_config(root):
    (root / "unet" / "config.json").write_text("[1, 2]")


def _string_for_an_int(root):
    config = json.loads((root / "unet" / "config.json").read_text())
    (root / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": "wide"}))


def _wrong_shapes(root):
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.bias"] = tensors["conv_in.bias"].new_zeros(3, 3)
    save_file(tensors, weights)


def _emptied(root):
    shutil.rmtree(root)
    root.mkdir()


# How each malformed folder was met before every load failure ended `serve`: a JSON list got diffusers' "could
# not connect to the hub"; a string config field raised a TypeError the loader thread did not catch, leaving a
# server alive, never ready and silent; the others' one line named the file but not the model.
MALFORMED = {"config.json is a list": (_list_config, "unet/config.json: expected a JSON object, got list"),
             "a string where an int belongs": (_string_for_an_int, "unet: TypeError: "),
             "weights of the wrong shapes": (_wrong_shapes, "unet: ValueError: ", "conv_in.bias expected shape"),
             "an empty folder": (_emptied, "missing file", "model_index.json"),
             "a folder of another family": (None, "missing file")}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_model_that_fails_to_load_ends_serve_with_one_line(case, broken):
    spoil, *cause = MALFORMED[case]
    preset = "janusflow-1.3b" if spoil is None else "instaflow-2rf"   # an SD folder is not JanusFlow's layout
    if spoil is not None:
        spoil(broken)
    start = time.monotonic()
    proc = rfserve("serve", "--model", f"{preset}={broken}", "--port", "0", "--device", "cpu", timeout=120)
    assert_one_line_error(proc, f"model {preset!r} ({broken})", *cause)
    assert time.monotonic() - start < 60


def test_debug_adds_the_traceback(broken):
    _string_for_an_int(broken)
    proc = rfserve("serve", "--model", f"instaflow-2rf={broken}", "--port", "0", "--device", "cpu", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "TypeError" in proc.stderr


def test_a_busy_or_foreign_address_fails_before_any_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = rfserve("serve", "--port", str(port), timeout=60)
    assert_one_line_error(proc, f"cannot listen on 127.0.0.1:{port}", "in use")
    assert "loading models" not in proc.stderr
    # TEST-NET-1 is never this machine's: the bind is refused, and nothing is sent anywhere.
    proc = rfserve("serve", "--host", "192.0.2.1", "--port", "8000", timeout=60)
    assert_one_line_error(proc, "cannot listen on 192.0.2.1:8000")
    assert "loading models" not in proc.stderr


def test_generate_refuses_a_format_it_cannot_write_before_loading(tmp_path):
    proc = rfserve("generate", "a red circle", "-o", str(tmp_path / "x.gif"))
    assert_one_line_error(proc, "-o: cannot write .gif", ".png, .jpg, .jpeg, .webp")
    assert "loading models" not in proc.stderr and not (tmp_path / "x.gif").exists()


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
