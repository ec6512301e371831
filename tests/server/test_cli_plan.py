"""`rfserve plan`: the table or one JSON object on stdout, exit 0 when the plan fits; one line on stderr and a
non-zero exit when it does not; bad sizes refused before any model library loads."""
import json
import os
import subprocess
import sys

KEYS = {"device_memory", "utilization", "budget_bytes", "fits", "problem", "models"}
MODEL_KEYS = {"name", "family", "weights_bytes", "activation_bytes", "kv_bytes", "kv_tokens", "kv_bytes_per_token",
              "held_bytes", "lora_bytes", "total_bytes"}


def rfserve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "rfserve.server.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_plan_json_is_one_object_and_fits():
    out = rfserve("plan", "--model", "janus-pro-1b", "--model", "rf-shapes", "--device-memory", "80GiB", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert set(plan) == KEYS and plan["fits"] and plan["problem"] is None
    assert [m["name"] for m in plan["models"]] == ["janus-pro-1b", "rf-shapes"]
    assert all(set(m) == MODEL_KEYS for m in plan["models"])
    assert plan["models"][0]["kv_tokens"] >= 65_536 and plan["budget_bytes"] == int(80 * 2 ** 30 * 0.9)


def test_plan_that_does_not_fit_exits_nonzero_with_one_line():
    out = rfserve("plan", "--model", "janus-pro-7b", "--device-memory", "16GiB")
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1 and "does not fit" in out.stderr
    assert "janus-pro-7b" in out.stdout                       # the table still shows where the memory goes


def test_bad_flags_are_refused_in_one_line():
    for args, flag in ((["--device-memory", "80XB"], "--device-memory"),
                       (["--device-memory", "80GiB", "--gpu-memory-utilization", "0"], "--gpu-memory-utilization"),
                       (["--device-memory", "80GiB", "--max-batch", "0"], "--max-batch")):
        out = rfserve("plan", *args)
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
        assert flag in out.stderr


def test_lora_slots_are_planned_only_when_asked_for():
    """SD1.5's UNet and CLIP pools at rank 64, 8 slots, fp16: 648 MiB (tests/model_zoo/test_memory_plan.py has
    the exact figure); JanusFlow serves no adapters, so it plans none."""
    base = ("plan", "--model", "instaflow-0.9b", "--model", "janusflow-1.3b", "--device-memory", "80GiB",
            "--dtype", "float16", "--json")
    plain, slots = rfserve(*base), rfserve(*base, "--max-loras", "8", "--max-lora-rank", "64")
    assert plain.returncode == 0 and slots.returncode == 0, slots.stderr
    lora = {m["name"]: m["lora_bytes"] for m in json.loads(slots.stdout)["models"]}
    assert {m["lora_bytes"] for m in json.loads(plain.stdout)["models"]} == {0}
    assert lora["janusflow-1.3b"] == 0 and 640 * 2**20 < lora["instaflow-0.9b"] < 660 * 2**20
    out = rfserve(*base, "--max-loras", "0")
    assert out.returncode != 0 and "--max-loras" in out.stderr
