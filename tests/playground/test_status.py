"""`/v1/status` and the static routes, in-process: the latency window, the p50 interpolation,
and which routes need a key."""
import pytest
from fastapi.testclient import TestClient

from rfserve.server import playground
from rfserve.server.app import create_app
from rfserve.server.config import ServerConfig
from rfserve.server.engine import Engine
from rfserve.server.metrics import Metrics
from rfserve.server.playground import RecentLatency, quantile

INF = float("inf")


def test_quantile_interpolates_inside_the_bucket_like_prometheus():
    assert quantile(0.5, [(0.1, 2), (0.2, 6), (INF, 6)]) == pytest.approx(0.125)
    assert quantile(0.5, [(0.1, 0), (INF, 0)]) is None
    assert quantile(0.5, [(0.1, 0), (0.2, 0), (INF, 4)]) == 0.2     # all past the last finite bound


def test_recent_latency_forgets_requests_older_than_the_window(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(playground.time, "monotonic", lambda: clock[0])
    metrics = Metrics()
    recent = RecentLatency(metrics.request_seconds, window_s=60)
    for _ in range(10):
        metrics.request_seconds.labels("m").observe(0.015)
    clock[0] += 30
    covered, buckets = recent.window()
    assert covered == 30 and buckets["m"][-1][1] == 10
    assert 0.01 < quantile(0.5, buckets["m"]) <= 0.02
    clock[0] += 60                      # the snapshot taken at +30 is now the newest one a window old
    for _ in range(3):
        metrics.request_seconds.labels("m").observe(1.5)
    covered, buckets = recent.window()
    assert covered == 60 and buckets["m"][-1][1] == 3
    assert 1 < quantile(0.5, buckets["m"]) <= 2


@pytest.fixture(scope="module")
def client():
    # Nothing is loaded: the routes only need the engine's metrics, batcher and flags.
    engine = Engine(ServerConfig(models=["instaflow-0.9b=/nowhere"], device="cpu", api_keys=["k1"]))
    return TestClient(create_app(engine))


def test_status_reports_loading_and_needs_the_key(client):
    assert client.get("/v1/status").status_code == 401
    body = client.get("/v1/status", headers={"authorization": "Bearer k1"}).json()
    assert body["status"] == "loading" and body["healthy"] is True
    assert body["models"] == {"instaflow-0.9b": {"queue_depth": 0, "requests": 0, "p50_ms": None, "chat": None}}


def test_page_and_static_files_are_open_and_confined(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>rfserve playground</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/playground").text == page.text
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert client.get("/static/..%2Fplayground.py").status_code == 404
    assert client.get("/static/nope.js").json()["error"]["param"] == "name"
