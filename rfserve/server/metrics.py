"""Prometheus metrics, named by the Prometheus conventions (`_total`, `_seconds`)."""
from __future__ import annotations

from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# A decode step is milliseconds on a GPU; the slow end shows a stream stalled behind other work.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rfserve_requests_total", "Finished requests by model and HTTP status.",
                                ["model", "status"], registry=r)
        self.images = Counter("rfserve_images_total", "Images generated.", ["model"], registry=r)
        self.queue_depth = Gauge("rfserve_queue_depth", "Jobs waiting in the model's queue.", ["model"],
                                 registry=r)
        self.batch_size = Histogram("rfserve_batch_size",
                                    "Images per denoising step (one forward) run by the worker.", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.stage_seconds = Histogram("rfserve_stage_seconds", "Time per pipeline stage per batch.",
                                       ["model", "stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("rfserve_request_seconds", "End-to-end request latency.",
                                         ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.dropped = Counter("rfserve_jobs_dropped_total",
                               "Queued jobs dropped before running, by reason (client_gone, deadline).",
                               ["model", "reason"], registry=r)
        self.oom_splits = Counter("rfserve_oom_splits_total", "Batches split in half after running out of memory.",
                                  ["model"], registry=r)
        self.ready = Gauge("rfserve_ready", "1 once every model is loaded and warmed.", registry=r)
        self.chat_first_token = Histogram("rfserve_chat_time_to_first_token_seconds",
                                          "From a chat request's arrival at its batcher to its first token.",
                                          ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.chat_token_gap = Histogram("rfserve_chat_inter_token_seconds",
                                        "Gap between consecutive tokens of one chat stream.",
                                        ["model"], buckets=TOKEN_BUCKETS, registry=r)
        self.chat_tokens = Counter("rfserve_chat_tokens_total", "Chat tokens generated.", ["model"], registry=r)
        self.chat_sequences = Gauge("rfserve_chat_sequences", "Chat sequences by state (running, waiting).",
                                    ["model", "state"], registry=r)
        self.chat_slots = Gauge("rfserve_chat_kv_slots", "Chat sequences one decode step runs at most.",
                                ["model"], registry=r)
        self.chat_kv_blocks = Gauge("rfserve_chat_kv_blocks", "Chat KV cache blocks (16 tokens each) by state "
                                    "(used, free).", ["model", "state"], registry=r)
        self.chat_preemptions = Counter("rfserve_chat_preemptions_total", "Chat sequences preempted because the KV "
                                        "pool was full (recomputed when blocks come back).", ["model"], registry=r)

    def track_cuda(self, device) -> None:
        """Allocator gauges for the serving device, so a leak (memory not returning to its idle level after
        aborted or failed batches) shows on the dashboard; DCGM sees only the whole card."""
        import torch

        for kind, read in (("allocated", torch.cuda.memory_allocated), ("reserved", torch.cuda.memory_reserved)):
            Gauge(f"rfserve_cuda_memory_{kind}_bytes", f"Bytes the CUDA caching allocator has {kind}.",
                  registry=self.registry).set_function(partial(read, device))

    def render(self) -> bytes:
        return generate_latest(self.registry)
