"""Queue limits, client disconnects and deadlines against a real server process."""
import threading
import time

import httpx
import pytest

from tests.server.serving import ServerProcess

pytestmark = pytest.mark.slow
SLOW = {"model": "instaflow-2rf", "prompt": "slow", "size": "32x32", "num_inference_steps": 60}


@pytest.fixture(scope="module")
def server(tiny_sd):
    srv = ServerProcess("--model", f"instaflow-2rf={tiny_sd}", "--max-batch", "1", "--max-queue", "2",
                        "--max-wait-ms", "0", "--request-timeout", "30", "--enable-fault-injection")
    yield srv
    srv.stop()


def post(server, body, timeout=60):
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=timeout)


def test_full_queue_answers_429_with_retry_after(server):
    responses = []

    def call(i):
        responses.append(post(server, {**SLOW, "seed": i}))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429}, codes
    refused = [r for r in responses if r.status_code == 429]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert refused[0].json()["error"]["code"] == "queue_full"


def test_disconnected_client_is_dropped_before_it_runs(server):
    images_before = server.metric("rfserve_images_total", model="instaflow-2rf")
    dropped_before = server.metric("rfserve_jobs_dropped_total", reason="client_gone")
    hold = {**SLOW, "prompt": "__rfserve_fault__:hang=2", "num_inference_steps": 1, "seed": 1}
    running = threading.Thread(target=post, args=(server, hold))
    running.start()
    time.sleep(0.3)                       # the first job now holds the worker for 2 s
    with pytest.raises(httpx.TimeoutException):
        post(server, {**SLOW, "seed": 2}, timeout=0.5)   # queued behind it, then the client leaves
    running.join()
    time.sleep(0.5)
    assert server.metric("rfserve_jobs_dropped_total", reason="client_gone") == dropped_before + 1
    assert server.metric("rfserve_images_total", model="instaflow-2rf") == images_before + 1
    assert post(server, {**SLOW, "num_inference_steps": 1, "seed": 3}).status_code == 200


def test_request_past_its_deadline_gets_504(tiny_sd):
    srv = ServerProcess("--model", f"instaflow-2rf={tiny_sd}", "--max-batch", "1", "--request-timeout", "0.3")
    try:
        r = post(srv, {**SLOW, "num_inference_steps": 100})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert httpx.get(f"{srv.url}/health").status_code == 200
    finally:
        srv.stop()
