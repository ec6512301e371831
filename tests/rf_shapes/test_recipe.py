"""The training recipe runs end to end (tiny preset), is deterministic, and its output serves."""
import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from rfserve.model_zoo.instaflow.pipeline import InstaFlowPipeline
from rfserve.model_zoo.rf_shapes.config import preset

pytestmark = pytest.mark.slow
STAGES = ("vae", "teacher", "counter", "reflow_pairs", "rf2", "distill_pairs", "one_step", "tune")


def _command(out, *extra):
    return [sys.executable, "-m", "rfserve.model_zoo.rf_shapes.train", "--out", str(out), "--preset", "tiny", *extra]


def _train(out, *extra):
    subprocess.run(_command(out, *extra), check=True, capture_output=True)
    return json.loads((out / "train_log.json").read_text())


def _train_side_by_side(*outs):
    """Runs at one thread each, at the same time: the determinism check needs two, not twice the wait."""
    runs = [subprocess.Popen(_command(out, "--threads", "1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for out in outs]
    for run in runs:
        output, _ = run.communicate()
        assert run.returncode == 0, output.decode()[-3000:]
    return [json.loads((out / "train_log.json").read_text()) for out in outs]


def _assert_serves(folder, prompt):
    image = InstaFlowPipeline.from_pretrained(folder).generate([prompt], [0], steps=1, guidance=0.0)
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    """Two tiny runs, in folders a and b of the returned root, and their logs."""
    root = tmp_path_factory.mktemp("recipe")
    return root, *_train_side_by_side(root / "a", root / "b")


def test_tiny_recipe_is_deterministic_and_serves(side_by_side):
    tmp_path, first, second = side_by_side
    for stage in STAGES:
        assert first[stage]["seconds"] > 0, stage
    for stage in ("vae", "teacher", "counter", "rf2", "one_step", "tune"):
        assert first[stage]["loss"] and first[stage]["loss"] == second[stage]["loss"], stage
    assert set(first["counter"]["held_out_accuracy_by_t"]) == {"0.2", "0.4", "1.0"}
    for stage in ("reflow_pairs", "distill_pairs"):  # the guided targets are the same in both runs
        assert first[stage]["checker_on_targets"] == second[stage]["checker_on_targets"], stage
    weights = [load_file(d / "rf-shapes" / "unet" / "diffusion_pytorch_model.safetensors") for d in
               (tmp_path / "a", tmp_path / "b")]
    assert all(np.array_equal(weights[0][k].numpy(), weights[1][k].numpy()) for k in weights[0])
    assert {"adherence", "fd_to_real"} <= set(first["eval"]["rf-shapes"])
    assert set(first["teacher"]["eval"]) == {"4", "25"} and not list((tmp_path / "a" / "stages").glob("*.partial.pt"))
    example = first["eval"]["rf-shapes"]["first_example"]
    assert example["seeds"] == "0-99" and all(0 <= example[k] <= 1 for k in ("checker", "no_fragment_dropped"))
    _assert_serves(tmp_path / "a" / "rf-shapes", "two red circles on a blue background")
    guided = InstaFlowPipeline.from_pretrained(tmp_path / "a" / "rf-shapes-2rf")      # the counter ships with it
    assert guided.count_guide.scale == preset("tiny").served_count_guidance > 0


def test_a_run_from_a_served_2rf_trains_only_the_one_step_stages(side_by_side, tmp_path):
    """--from-2rf: the one-step stages start from a served folder, which the output's 2-RF folder copies."""
    served = side_by_side[0] / "a" / "rf-shapes-2rf"
    log = _train(tmp_path, "--from-2rf", str(served))
    assert [s for s in STAGES if log.get(s, {}).get("seconds")] == ["distill_pairs", "one_step", "tune"]
    assert log["environment"]["from_2rf"] == str(served) and len(log["environment"]["from_2rf_sha256"]) == 64
    for part in ("unet/diffusion_pytorch_model.safetensors", "count_guide/model.safetensors"):
        a, b = (load_file(d / part) for d in (served, tmp_path / "rf-shapes-2rf"))
        assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), part
    _assert_serves(tmp_path / "rf-shapes", "three blue squares on a white background")


@pytest.mark.gpu
def test_tiny_recipe_trains_on_cuda_and_serves_on_cpu(tmp_path):
    """The random numbers come from CPU generators on either device, so a CUDA run follows the CPU run's
    losses, apart from floating-point order (and TF32): each stage's last loss within 10% of the CPU's."""
    log = _train(tmp_path / "cuda", "--device", "cuda")
    cpu = _train(tmp_path / "cpu")
    assert log["environment"]["device"] == "cuda"
    for stage in ("vae", "teacher", "rf2", "one_step"):
        got, want = log[stage]["loss"][-1]["loss"], cpu[stage]["loss"][-1]["loss"]
        assert np.isfinite(got) and abs(got - want) <= 0.1 * abs(want) + 1e-4, (stage, got, want)
    _assert_serves(tmp_path / "cuda" / "rf-shapes", "a green square on a white background")
