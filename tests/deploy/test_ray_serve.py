"""deploy/ray_serve.py on a local CPU Ray instance: two replicas share concurrent traffic
and give the single-node server's images for the same seeds."""
import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from tests.server.serving import free_fixed_port

ray = pytest.importorskip("ray", reason="ray[serve] is not installed: pip install -e '.[ray]'")
pytestmark = pytest.mark.slow

SEEDS = range(8)


@pytest.fixture(scope="module")
def ray_url(served_model):
    from ray import serve

    from deploy.ray_serve import build_app

    spec, _, _ = served_model
    port = free_fixed_port()   # Ray's own processes bind ephemeral ports while it starts
    # address="local" always starts a private instance, never joins a cluster found on the machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # max_ongoing_requests=2 keeps one replica from taking all eight requests at once.
        serve.run(build_app({"models": spec, "min_replicas": "2", "max_replicas": "2", "gpus_per_replica": "0",
                             "max_ongoing_requests": "2", "device": "cpu", "warmup": "false"}),
                  name="rfserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def images(url: str, name: str, size: str) -> tuple[dict[int, np.ndarray], set[str]]:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

    def one(seed: int):
        raw = client.images.with_raw_response.generate(model=name, prompt="two blue squares", size=size,
                                                       extra_body={"seed": seed})
        png = base64.b64decode(raw.parse().data[0].b64_json)
        return seed, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), raw.headers.get("x-rfserve-replica")

    with ThreadPoolExecutor(len(SEEDS)) as pool:
        results = list(pool.map(one, SEEDS))
    return {seed: img for seed, img, _ in results}, {replica for _, _, replica in results}


def test_two_replicas_serve_concurrent_traffic_with_single_node_images(ray_url, single_node, served_model):
    _, name, size = served_model
    on_ray, replicas = images(ray_url, name, size)
    assert len(replicas) == 2 and None not in replicas
    reference, _ = images(single_node.url, name, size)
    for seed in SEEDS:
        assert np.abs(on_ray[seed].astype(int) - reference[seed].astype(int)).max() <= 1, seed
    assert np.abs(on_ray[0].astype(int) - on_ray[1].astype(int)).max() > 0


def test_settings_take_arguments_over_environment():
    from deploy.ray_serve import RaySettings

    s = RaySettings.from_sources({"max_replicas": "4", "warmup": "false"},
                                 {"RFSERVE_MAX_REPLICAS": "2", "RFSERVE_MODELS": "a, b=/m?variant=fp16",
                                  "RFSERVE_GPUS_PER_REPLICA": "0.5"})
    assert (s.max_replicas, s.warmup, s.gpus_per_replica) == (4, False, 0.5)
    assert s.models == ["a", "b=/m?variant=fp16"] and s.engine_config().models == s.models
    assert s.engine_config().continuous
    assert not RaySettings.from_sources({"continuous": "false"}, {}).engine_config().continuous
