"""Chat under the engine's one lifecycle, against server processes: out of memory in a prefill, the
watchdog on a hung decode step, and SIGTERM while a stream is open."""
import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.serving import ServerProcess, watchdog_trips_then_recovers

pytestmark = pytest.mark.slow
MODEL = "janusflow-1.3b"
FAULT = "__rfserve_fault__"


def chat(url, text, **fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 8,
            **fields}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def stream_events(url, text, events, **fields):
    """Collect the SSE `data:` payloads of one streamed chat into `events`."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0, "stream": True,
            **fields}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))


def open_stream(url, text, **fields):
    events: list[str] = []
    thread = threading.Thread(target=stream_events, args=(url, text, events), kwargs=fields)
    thread.start()
    deadline = time.monotonic() + 20
    while len(events) < 2 and time.monotonic() < deadline:     # the role chunk and a first token
        time.sleep(0.02)
    assert len(events) >= 2, events
    return thread, events


@pytest.fixture(scope="module")
def server(tiny_janus):
    srv = ServerProcess("--model", f"{MODEL}={tiny_janus}", "--enable-fault-injection", "--watchdog-timeout", "2")
    yield srv
    srv.stop()


def test_a_prefill_out_of_memory_fails_only_its_request_with_507(server):
    results = {}

    def call(key, text):
        results[key] = chat(server.url, text)

    threads = [threading.Thread(target=call, args=(k, t)) for k, t in
               (("a", "hello"), ("oom", f"hello {FAULT}:oom"), ("b", "a story"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["oom"].status_code == 507
    assert results["oom"].json()["error"]["code"] == "out_of_memory"
    assert results["a"].status_code == results["b"].status_code == 200
    assert results["a"].json()["usage"]["completion_tokens"] == 8


def test_the_watchdog_sees_a_hung_decode_step_then_recovers(server):
    watchdog_trips_then_recovers(server.url, lambda: chat(server.url, f"hello {FAULT}:hang=3", max_tokens=2),
                                 trip_after_s=2.6)


def test_sigterm_lets_an_open_stream_finish_and_refuses_new_chat(tiny_janus):
    srv = ServerProcess("--model", f"{MODEL}={tiny_janus}", "--enable-fault-injection", "--shutdown-grace", "30")
    try:
        thread, events = open_stream(srv.url, f"a story {FAULT}:hang=0.2", max_tokens=20)   # about 4 s
        srv.proc.send_signal(signal.SIGTERM)
        before = len(events)
        time.sleep(0.3)
        late = chat(srv.url, "hello")
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        assert late.json()["error"]["code"] == "shutting_down"
        thread.join()
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        assert len(events) - before >= 3, events       # tokens kept coming while the server drained
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()


def test_a_stream_longer_than_the_grace_ends_with_an_error_chunk(tiny_janus):
    srv = ServerProcess("--model", f"{MODEL}={tiny_janus}", "--enable-fault-injection", "--shutdown-grace", "1")
    try:
        thread, events = open_stream(srv.url, f"a story {FAULT}:hang=0.5", max_tokens=40)   # about 20 s
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        thread.join()
        assert time.monotonic() - started < 10
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "shutting down" in error["message"]
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()


def test_chat_metrics_count_tokens_and_gaps_and_reach_the_status_strip(server):
    def read(name):
        return server.metric(name, model=MODEL)

    before = {n: read(n) for n in ("rfserve_chat_tokens_total", "rfserve_chat_time_to_first_token_seconds_count",
                                   "rfserve_chat_inter_token_seconds_count")}
    reply = chat(server.url, "count the stars")
    assert reply.status_code == 200
    tokens = reply.json()["usage"]["completion_tokens"]
    assert tokens >= 2
    assert read("rfserve_chat_tokens_total") - before["rfserve_chat_tokens_total"] == tokens
    assert read("rfserve_chat_time_to_first_token_seconds_count") - \
        before["rfserve_chat_time_to_first_token_seconds_count"] == 1
    assert read("rfserve_chat_inter_token_seconds_count") - \
        before["rfserve_chat_inter_token_seconds_count"] == tokens - 1
    assert server.metric("rfserve_chat_sequences", model=MODEL, state="running") == 0
    assert read("rfserve_chat_kv_slots") == 4                      # the CPU default
    free, used = (server.metric("rfserve_chat_kv_blocks", model=MODEL, state=s) for s in ("free", "used"))
    assert used == 0 and free > 0                                   # the finished stream gave its blocks back
    assert server.metric("rfserve_chat_preemptions_total", model=MODEL) == 0
    status = httpx.get(f"{server.url}/v1/status").json()["models"][MODEL]["chat"]
    assert status["running"] == 0 and status["slots"] == 4
    assert status["kv_tokens"] == free * 16 and status["kv_tokens_used"] == 0
    assert status["first_token_p50_ms"] > 0 and status["token_gap_p50_ms"] > 0
