"""API keys, CORS and model-root confinement."""
import httpx
import pytest

from rfserve.model_zoo.loading import CheckpointError
from rfserve.server.security import confine
from tests.server.serving import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_sd, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("# team keys\nsecond-key\n")
    srv = ServerProcess("--model", f"instaflow-0.9b={tiny_sd}", "--api-key", "first-key",
                        "--api-key-file", str(keys), "--protect-metrics")
    yield srv
    srv.stop()


BODY = {"prompt": "a cat", "size": "16x16"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "first-key"}])
def test_missing_or_wrong_key_is_401_before_queueing(server, headers):
    r = httpx.post(f"{server.url}/v1/images/generations", json=BODY, headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["type"] == "authentication_error"


def test_401_comes_before_reading_an_oversize_body(server):
    r = httpx.post(f"{server.url}/v1/images/generations", content=b"x" * (4 << 20),
                   headers={"content-type": "application/json"})
    assert r.status_code == 401


@pytest.mark.parametrize("key", ["first-key", "second-key"])
def test_keys_from_flag_and_file_work(server, key):
    auth = {"Authorization": f"Bearer {key}"}
    assert httpx.post(f"{server.url}/v1/images/generations", json=BODY, headers=auth).status_code == 200
    assert httpx.get(f"{server.url}/metrics", headers=auth).status_code == 200


def test_health_and_ready_stay_open_metrics_protected(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_cors_is_off_by_default(server):
    r = httpx.options(f"{server.url}/v1/images/generations",
                      headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


def test_model_root_confines_local_paths(tmp_path):
    root = tmp_path / "models"
    (root / "good").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert confine("good", str(root)) == str(root / "good")
    assert confine(str(root / "good"), str(root)) == str(root / "good")
    assert confine("owner/hub-model", str(root)) == "owner/hub-model"
    for escape in ["../outside", str(tmp_path / "outside"), "link", "good/../../outside"]:
        with pytest.raises(CheckpointError, match="outside the model root"):
            confine(escape, str(root))
    with pytest.raises(CheckpointError, match="no such folder"):
        confine("./missing", str(root))
    assert confine(str(tmp_path / "outside"), None) == str(tmp_path / "outside")
