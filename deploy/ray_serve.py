"""The rfserve engine as a Ray Serve deployment behind the same OpenAI routes.

    serve run deploy.ray_serve:app                                   # settings from RFSERVE_* variables
    serve run deploy.ray_serve:build_app models=instaflow-0.9b max_replicas=8

Each replica is one Engine on one GPU, with its own per-model queues, batcher and worker,
so batching happens inside a replica exactly as in `rfserve serve`. Ray routes requests to
replicas and autoscales on ongoing requests per replica. Backpressure keeps the single-node
answers: the engine's full queue gives 429 with Retry-After, and Ray's own queue limit
(`max_queued_requests`) gives 503.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field, fields

from ray import serve

from rfserve.server.app import create_app
from rfserve.server.chat.config import ChatConfig
from rfserve.server.config import LoraConfig, ServerConfig
from rfserve.server.engine import Engine

REPLICA_HEADER = "x-rfserve-replica"


@dataclass
class RaySettings:
    """Every field can be set as RFSERVE_<FIELD> in the environment or as `field=value`
    after the import path in `serve run`; the latter wins."""
    models: list[str] = field(default_factory=lambda: ["rf-shapes"])  # comma-separated SPECs
    gpus_per_replica: float = 1.0      # one replica per GPU; 0 on CPU
    cpus_per_replica: float = 1.0
    min_replicas: int = 1
    max_replicas: int = 1              # above min_replicas, Ray autoscales between the two
    target_ongoing_requests: int = 16  # per replica: 2 x max_batch keeps one batch running, one queued
    max_ongoing_requests: int = 32     # sent to one replica at once; the rest wait in Ray's queue
    max_queued_requests: int = 256     # Ray's queue; beyond it Ray answers 503
    max_batch: int = 8
    max_wait_ms: float = 10.0
    continuous: bool = True            # requests join a running batch between denoising steps
    loras: list[str] = field(default_factory=list)   # comma-separated NAME=PATH_OR_HUB_ID[?model=MODEL]
    enable_lora: bool = False          # serve adapters even with none at start (POST /v1/loras)
    max_loras: int = 8                 # adapters resident on the device per model
    max_queue: int = 64                # the engine's per-model queue; beyond it 429
    device: str = "auto"
    dtype: str = "auto"
    warmup: bool = True

    @classmethod
    def from_sources(cls, args: dict[str, str], env: dict[str, str]) -> RaySettings:
        values = {}
        for f in fields(cls):
            raw = args.get(f.name, env.get(f"RFSERVE_{f.name.upper()}"))
            if raw is not None:
                values[f.name] = _parse(str(raw), type(getattr(cls(), f.name)))
        return cls(**values)

    def engine_config(self) -> ServerConfig:
        return ServerConfig(models=self.models, device=self.device, dtype=self.dtype, max_batch=self.max_batch,
                            max_wait_ms=self.max_wait_ms, continuous=self.continuous, max_queue=self.max_queue,
                            warmup=self.warmup, chat=ChatConfig.resolve({}, []),
                            lora=LoraConfig(enabled=self.enable_lora, adapters=self.loras, slots=self.max_loras))


def _parse(raw: str, kind: type):
    if kind is list:
        return [s.strip() for s in raw.split(",") if s.strip()]
    if kind is bool:
        return raw.lower() in ("1", "true", "yes")
    return kind(raw)


class ReplicaHeader:
    """Names the replica that answered, so clients and tests can see the spread of traffic.
    Plain ASGI rather than BaseHTTPMiddleware, so disconnect detection in the routes is untouched."""

    def __init__(self, app, replica: str):
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope, receive, send):
        async def tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)]
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


@serve.ingress()
class RFServeReplica:
    async def __init__(self, settings: RaySettings):
        self.engine = Engine(settings.engine_config())
        # Ray routes no traffic until the constructor returns: loading here makes Ray's
        # readiness the engine's readiness.
        await asyncio.to_thread(self.engine.load, False)

    def __serve_build_asgi_app__(self):
        app = create_app(self.engine)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app

    def check_health(self) -> None:
        """Ray restarts a replica whose engine failed or whose batch hangs."""
        ok, why = self.engine.healthy
        if not ok:
            raise RuntimeError(why)

    def __del__(self):
        # Ray has already let ongoing requests finish (graceful_shutdown_timeout_s).
        self.engine.shutdown()


def build_app(args: dict[str, str]) -> serve.Application:
    s = RaySettings.from_sources(args, dict(os.environ))
    if s.max_replicas > s.min_replicas:
        scaling = {"autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                          "target_ongoing_requests": s.target_ongoing_requests}}
    else:
        scaling = {"num_replicas": s.min_replicas}
    deployment = serve.deployment(
        RFServeReplica, name="rfserve", **scaling,
        ray_actor_options={"num_gpus": s.gpus_per_replica, "num_cpus": s.cpus_per_replica},
        max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
        graceful_shutdown_timeout_s=60)
    return deployment.bind(s)


app = build_app({})
