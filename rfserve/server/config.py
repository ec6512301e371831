"""Server settings, shared by `rfserve serve`, `rfserve generate` and the tests."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rfserve.server.chat.config import ChatConfig

if TYPE_CHECKING:
    from rfserve.model_zoo.lora.pool import PoolConfig


@dataclass
class LoraConfig:
    """Per-request LoRA adapters (server.adapters): off unless enabled or adapters are named at start."""
    enabled: bool = False
    adapters: list[str] = field(default_factory=list)   # NAME=PATH_OR_HUB_ID[?model=MODEL], loaded at start
    slots: int = 8                    # adapters resident on the device per model, swapped LRU from the host
    max_rank: int = 64                # the largest rank served; lower ranks are zero-padded to it
    per_request: int = 2              # adapters one request may combine

    def __post_init__(self) -> None:
        """A ValueError naming the flag: here, so that the CLI, Ray Serve and an embedding all refuse a pool in
        which one request's adapters could not fit together (the worker would split such a row to no end)."""
        for flag, value in (("--max-loras", self.slots), ("--max-lora-rank", self.max_rank),
                            ("--max-loras-per-request", self.per_request)):
            if value < 1:
                raise ValueError(f"{flag}: must be at least 1, got {value}")
        if self.per_request > self.slots:
            raise ValueError(f"--max-loras-per-request ({self.per_request}) cannot exceed --max-loras ({self.slots}): "
                             f"one request's adapters must fit on the device together")

    @property
    def on(self) -> bool:
        return self.enabled or bool(self.adapters)

    def pool(self, max_batch: int, buckets: tuple[int, ...] = ()) -> PoolConfig:
        """Each LoRA-serving model's slots, for the largest forward a batch runs: every row guided (an
        unconditional copy each), padded up to the largest captured bucket."""
        from rfserve.model_zoo.lora.pool import PoolConfig, lora_rows

        return PoolConfig(slots=self.slots, max_rank=self.max_rank, per_row=self.per_request,
                          max_rows=lora_rows(max_batch, cfg=True, buckets=buckets))


@dataclass
class ServerConfig:
    models: list[str] = field(default_factory=lambda: ["rf-shapes"])
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"              # auto | cpu | cuda
    dtype: str = "auto"               # auto | float32 | float16 | bfloat16
    max_batch: int = 8                # images per forward pass
    max_wait_ms: float = 10.0         # how long the batcher holds the oldest job for company
    continuous: bool = True           # requests join a running batch of their model and size between steps
    max_queue: int = 64               # queued jobs per model before 429
    max_images_per_request: int = 10  # `n`, as in the OpenAI Images API
    max_steps: int | None = None      # caps every model's num_inference_steps (a cost guard)
    request_timeout_s: float = 120.0  # deadline from arrival to answer (504 past it)
    max_request_timeout_s: float = 600.0  # cap on a request's own `timeout`
    shutdown_grace_s: float = 30.0    # after SIGTERM, how long in-flight work may finish
    watchdog_s: float = 300.0         # a batch running longer marks /health unhealthy
    max_body_bytes: int = 8 << 20     # a request body (413 past it): an edit's upload, chat's data: URLs
    max_input_pixels: int = 4096 * 4096   # an edit's image and mask, checked from the header before decoding
    image_store_items: int = 256      # `url` results kept for GET /v1/images/{id}
    image_store_ttl_s: float = 3600.0
    cpu_threads: int | None = None    # fixed torch threads on CPU; default: cores - 1, all cores for the
                                      # batch sizes warm-up measures faster on them
    warmup: bool = True
    compile: str = "auto"             # auto | on | off: the compiled fast path (auto: before ready on
                                      # CUDA; on the CPU after ready, for the families it pays for)
    compile_mode: str = "reduce-overhead"   # torch.compile mode; reduce-overhead adds CUDA graphs
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16)   # batch sizes captured (≤ max_batch)
    fault_injection: bool = False     # test hook: prompts with a fault marker misbehave in the worker
    log_prompts: bool = False
    api_keys: list[str] = field(default_factory=list)
    protect_metrics: bool = False
    model_root: str | None = None     # local model paths must resolve inside it
    cors_origins: list[str] = field(default_factory=list)
    gpu_memory_utilization: float = 0.9   # the share of device memory the memory plan budgets, as vLLM's flag
    device_memory: int | None = None  # bytes the plan may use instead of the device's total (None: the total)
    chat: ChatConfig = field(default_factory=ChatConfig)   # the CLI and Ray Serve resolve flags and environment
    lora: LoraConfig = field(default_factory=LoraConfig)
