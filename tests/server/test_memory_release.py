"""Aborted and failed work gives its GPU memory back: the allocator gauges on /metrics return to their
idle level after clients leave mid-queue and mid-batch, and after an OOM split."""
import threading
import time

import httpx
import pytest

from tests.server.serving import ServerProcess

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
BASE = {"model": "instaflow-2rf", "size": "16x16"}


def _post(url: str, body: dict, timeout: float, statuses: list) -> None:
    try:
        statuses.append(httpx.post(f"{url}/v1/images/generations", json=body, timeout=timeout).status_code)
    except httpx.TimeoutException:
        pass  # the client leaves; the server must drop or finish the job and free its tensors


def test_gpu_memory_returns_to_idle_after_aborts_and_oom(tiny_sd):
    srv = ServerProcess("--model", f"instaflow-2rf={tiny_sd}", "--device", "cuda", "--max-batch", "8",
                        "--enable-fault-injection")
    try:
        # Every prompt used below is encoded now, so the text-embedding cache holds all it ever will: from
        # here on, memory above idle is a tensor that outlived its request.
        prompts = ["p", "x __rfserve_fault__:oom-batch"]          # the fault prompt runs fine alone
        for prompt in prompts:
            assert httpx.post(f"{srv.url}/v1/images/generations", json={**BASE, "prompt": prompt},
                              timeout=60).status_code == 200
        idle = srv.metric("rfserve_cuda_memory_allocated_bytes")
        assert idle > 0
        bodies = [{**BASE, "prompt": prompts[0], "seed": i, "num_inference_steps": 50} for i in range(24)]
        bodies += [{**BASE, "prompt": prompts[1], "seed": 99}]
        statuses: list[int] = []
        threads = [threading.Thread(target=_post, args=(srv.url, b, 0.05 if i % 2 else 60, statuses))
                   for i, b in enumerate(bodies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 30
        while srv.metric("rfserve_queue_depth") > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        assert statuses and set(statuses) == {200}   # those who stayed were all served, the OOM one too
        assert srv.metric("rfserve_cuda_memory_allocated_bytes") <= idle
        assert srv.metric("rfserve_jobs_dropped_total") + srv.metric("rfserve_oom_splits_total") > 0
    finally:
        srv.stop()
