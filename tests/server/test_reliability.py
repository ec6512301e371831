"""Faults and shutdown against a real server: OOM splitting, the watchdog, SIGTERM."""
import signal
import threading
import time

import httpx
import pytest

from tests.server.serving import ServerProcess, watchdog_trips_then_recovers

pytestmark = pytest.mark.slow
BASE = {"model": "instaflow-2rf", "size": "16x16", "num_inference_steps": 1}


@pytest.fixture(scope="module")
def server(tiny_sd):
    srv = ServerProcess("--model", f"instaflow-2rf={tiny_sd}", "--max-batch", "8", "--max-wait-ms", "300",
                        "--enable-fault-injection")
    yield srv
    srv.stop()


def post(url, body, **kw):
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=60, **kw)


def concurrently(fn, args_list):
    out = [None] * len(args_list)

    def run(i, a):
        out[i] = fn(*a)

    threads = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_oom_splits_the_batch_and_everyone_is_served(server):
    """`oom-batch` fails any batch it shares; halving isolates it and it then fits alone."""
    prompts = ["a", "b", "c __rfserve_fault__:oom-batch", "d"]
    rs = concurrently(post, [(server.url, {**BASE, "prompt": p, "seed": i}) for i, p in enumerate(prompts)])
    assert [r.status_code for r in rs] == [200] * 4
    assert server.metric("rfserve_oom_splits_total", model="instaflow-2rf") >= 2   # 4 → 2+2 → 1+1


def test_image_that_never_fits_fails_alone_with_507(server):
    prompts = ["a", "b __rfserve_fault__:oom", "c"]
    rs = concurrently(post, [(server.url, {**BASE, "prompt": p, "seed": i}) for i, p in enumerate(prompts)])
    assert [r.status_code for r in rs] == [200, 507, 200]
    assert "does not fit" in rs[1].json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_watchdog_reports_a_hung_batch_then_recovers(tiny_sd):
    srv = ServerProcess("--model", f"instaflow-2rf={tiny_sd}", "--enable-fault-injection", "--watchdog-timeout", "2")
    try:
        watchdog_trips_then_recovers(srv.url, lambda: post(srv.url, {**BASE, "prompt": "__rfserve_fault__:hang=6"}),
                                     trip_after_s=4.0)
    finally:
        srv.stop()


def test_sigterm_answers_in_flight_work_then_exits_zero(tiny_sd):
    srv = ServerProcess("--model", f"instaflow-2rf={tiny_sd}", "--max-batch", "2", "--shutdown-grace", "60")
    try:
        slow = {**BASE, "size": "32x32", "num_inference_steps": 30}
        results = [None] * 6

        def call(i):
            results[i] = post(srv.url, {**slow, "prompt": f"p{i}", "seed": i}).status_code

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        try:
            late = post(srv.url, {**BASE, "prompt": "late"}).status_code
        except httpx.HTTPError:
            late = "refused"
        for t in threads:
            t.join()
        assert results == [200] * 6
        assert late in (503, "refused")
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
