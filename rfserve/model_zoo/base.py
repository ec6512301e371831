"""What every image pipeline offers the server: a card describing its limits and defaults, and the
`Pipeline` protocol, which the engine drives one denoising step at a time, so that requests join and leave a
running batch between steps. `server/` calls only this."""
from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

    from rfserve.model_zoo.lora.files import LoraFile
    from rfserve.model_zoo.lora.pool import PoolConfig
    from rfserve.model_zoo.paged_kv import BlockAllocator, PromptChunk
    from rfserve.model_zoo.running import Running


@dataclass(frozen=True)
class ImageDefaults:
    steps: int
    guidance: float
    negative_prompt: str = ""
    size: str = "512x512"


@dataclass(frozen=True)
class Vocabulary:
    """The words of a model trained on a closed caption grammar (the embedded rf-shapes). Clients are told them,
    since nothing else says what such a model can draw, and a prompt's other words are named back: the model reads
    each as one unknown token, and the picture then follows nothing in particular."""
    colours: tuple[str, ...]
    shapes: tuple[str, ...]                   # singular; the captions add "s" for more than one
    counts: tuple[str, ...]
    backgrounds: tuple[str, ...]
    examples: tuple[str, ...]                 # whole captions in the grammar, for hints
    known: frozenset[str]                     # every word that draws no warning: the grammar's and its fillers

    def unknown(self, prompt: str) -> list[str]:
        """The words of `prompt` (runs of letters and digits, lowercased, as the model's tokenizer splits them;
        punctuation is no word) outside `known`, each once, in order."""
        return list(dict.fromkeys(w for w in re.findall(r"\w+", prompt.lower()) if w not in self.known))


@dataclass(frozen=True)
class ModelCard:
    """Limits the gateway validates against before anything is queued."""
    name: str
    family: str
    defaults: ImageDefaults
    sizes: tuple[str, ...]
    max_steps: int = 100
    max_guidance: float = 30.0
    max_prompt_tokens: int = 77
    supports_negative_prompt: bool = True
    supports_edits: bool = False              # /v1/images/edits: the image-to-image flow (`ImageSpec.image`)
    vocabulary: Vocabulary | None = None      # None: the model takes free text


@dataclass(frozen=True)
class ImageSpec:
    """One image to make. Specs running together share `join_key()`; with joining off, `batch_key()`.

    An edit also carries the input `image`, resized to width × height, and `strength`: how much of the flow
    is run, from the input mixed with the seed's noise (1 = all of it, which is text-to-image). With a `mask`,
    only where it is 1 may change; elsewhere the input is kept."""
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    strength: float = 1.0
    image: np.ndarray | None = field(default=None, compare=False, repr=False)   # (H, W, 3) uint8
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)    # (H, W) float32, 1 = change
    # LoRA adapters this row uses, (name, scale) each, combined as diffusers' `set_adapters` does (issue #34).
    lora: tuple[tuple[str, float], ...] = ()

    @property
    def uses_cfg(self) -> bool:
        return self.guidance > 1.0

    def join_key(self) -> tuple:
        """What rows of one running batch share: the latent's shape, and whether they edit (an edit's rows carry
        their input's latents). Step counts, guidance, strengths, masks and LoRA adapters are per row."""
        return (self.width, self.height, self.image is not None)

    def batch_key(self) -> tuple:
        """The whole-batch grouping of `--continuous off`: specs that would run the same loop. LoRA adapters are
        per row in both modes: rows with different adapters share one forward."""
        return (*self.join_key(), self.steps, self.uses_cfg, self.strength)


@dataclass
class BatchOutput:
    images: np.ndarray                      # (B, H, W, 3) uint8: the rows still kept at the end
    prompt_truncated: list[bool]            # one per input spec
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    # The same pixels still on the GPU, when decoded there: JPEG rows are then encoded there as a batch.
    device_images: torch.Tensor | None = None


class FastPath(Protocol):
    """A family's compiled path: prepared, then captured per batch bucket during warm-up, or on the CPU after
    ready where `background` says it may be (model_zoo.fast_path)."""
    background: bool

    def prepare(self, compile_mode: str | None, *, record: bool = False) -> None: ...

    def record_calls(self, run: Callable[[], object]) -> None: ...

    def finish_capture(self) -> None: ...

    def capture_examples(self) -> None: ...

    def drop(self, reason: str) -> None: ...


class Pipeline(Protocol):
    """One family's pipeline, as the server drives it (each family's pipeline.py implements it), a denoising step
    at a time: `begin` the first rows, then `step` them all, one forward for every row still stepping; between
    two steps new rows may join (`admit`), rows may leave (`Running.keep`), streaming rows take a `preview`, and
    rows that have taken all their steps are decoded and leave (`finish`). Every row follows its own spec alone
    (its seed, steps, guidance and strength), whichever rows share its forwards."""
    family: str

    def begin(self, specs: list[ImageSpec]) -> Running:
        """Rows for specs that share `join_key()`: text encoded, noise drawn, edits encoded; no step taken."""
        ...

    def admit(self, running: Running, specs: list[ImageSpec]) -> None:
        """`specs` (sharing `running`'s join key) join: they take their first step with the others' next."""
        ...

    def step(self, running: Running) -> None:
        """One step of every row that has steps left, in one forward."""
        ...

    def preview(self, running: Running, rows: list[int]) -> np.ndarray:
        """The pictures of `rows` as their flow stands, (len(rows), H, W, 3) uint8: the clean image their last
        step points at, decoded. Only streaming rows are ever asked for, so a preview costs nobody else."""
        ...

    def finish(self, running: Running, rows: list[int]) -> BatchOutput:
        """`rows` (finished) decoded, in that order; they leave `running`."""
        ...

    def run(self, specs: list[ImageSpec]) -> BatchOutput:
        """Images for specs that share `join_key()`, begun together and stepped to the end (`running.Stepped`)."""
        ...

    def kept_prompt(self, prompt: str) -> str:
        """The part of an over-long prompt the model actually reads (the response's `revised_prompt`)."""
        ...

    def prompt_tokens(self, prompt: str) -> int:
        """How many tokens of `prompt` the model reads (a streamed image's `usage`)."""
        ...

    def fast_path(self) -> FastPath | None:
        """The compiled path to capture during warm-up, or None where the family has none yet."""
        ...


@runtime_checkable
class ServesLora(Protocol):
    """A pipeline whose rows run their own LoRA adapters (`ImageSpec.lora`, issue #34): the engine enables it at
    load, before warm-up and the fast path, and registers adapters by name."""

    def enable_lora(self, config: "PoolConfig") -> None: ...

    def register_lora(self, name: str, lora: "LoraFile") -> None: ...

    def unregister_lora(self, name: str) -> None: ...

    def lora_names(self) -> list[str]: ...


@runtime_checkable
class ReservesMemory(Protocol):
    """A pipeline that holds memory beyond the forward's own between batches (the chat families' text-to-image KV
    pool): the engine reserves it at load for `--max-batch` images, before warm-up measures what is used."""

    def reserve_memory(self, max_batch: int) -> None: ...


class ChatDecoder(Protocol):
    """Token-level decoding over a paged KV cache, which the continuous batcher steps. A sequence holds a list of
    blocks of `page` tokens from `blocks`; its token at position p lives in block blocks[p // page]."""
    slots: int                                # the most sequences one decode step runs
    max_len: int                              # the most positions one sequence holds
    page: int
    blocks: BlockAllocator                    # the pool's free list (block 0, the null block, never handed out)

    def embed_many(self, prompts: list[tuple[list[int], Any, list[int]]]) -> list[Any]:
        """(ids, pixel_values or None, image_positions) prompts' embeddings (L, D), images in one forward."""
        ...

    def prefill(self, chunks: list[PromptChunk]) -> Any:
        """Several sequences' prompt chunks in one forward, their KV written into their blocks; each chunk's
        last-token logits (n, V)."""
        ...

    def decode(self, tokens: list[int], lengths: list[int], tables: list[list[int]]) -> Any:
        """One step: token i at position lengths[i] of the sequence whose blocks are tables[i]; logits (n, V)."""
        ...

    def fast_path(self, buckets: tuple[int, ...]) -> FastPath:
        """The decode step compiled per bucket of running sequences (and of table width)."""
        ...

    def capture(self) -> None:
        """Run the step at every bucket, so that each is compiled and recorded (padding rows touch only the
        null block)."""
        ...


@dataclass
class ChatPrompt:
    """A conversation as the model reads it: token ids, the positions image features overwrite, the pixels."""
    ids: list[int]
    image_positions: list[int]
    pixel_values: Any                         # (n, 3, S, S), or None without images


class ChatProcessor(Protocol):
    """A chat model's own prompt format: the chat route builds every prompt through it."""
    eos_id: int
    image_tag: str                            # what an image part becomes in a turn's text
    default_system: str                       # the system prompt when the request gives none

    def reserved_in(self, text: str) -> str | None:
        """The first special-token string inside `text` (client text may not forge turns or image slots)."""
        ...

    def prompt(self, turns: list[tuple[str, str]], system: str, images: list[Any]) -> ChatPrompt:
        """(role "User"/"Assistant", text with `image_tag`s) turns, ending with the user's, ready to answer."""
        ...


class ChatParts(Protocol):
    """What the chat route and its batcher use of a model that also chats."""

    @property
    def processor(self) -> ChatProcessor: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def context_length(self) -> int: ...

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes one token takes in the decoder's paged cache, at the model's dtype: what the budget divides."""
        ...

    def decoder(self, slots: int, max_len: int, num_blocks: int | None = None) -> ChatDecoder:
        """A decoder stepping up to `slots` sequences of up to `max_len` positions each, over a pool of
        `num_blocks` blocks (None: enough for every slot at `max_len`)."""
        ...


@dataclass
class LoadedModel:
    card: ModelCard
    pipeline: Pipeline
    chat: ChatParts | None = None             # set for the models that also chat


class StageTimer:
    """Wall-clock per stage; the device is synchronised at stage ends so GPU work
    is attributed to the stage that queued it."""

    def __init__(self, sync: Callable[[], None] | None = None, timings: dict[str, float] | None = None):
        """`timings`: where to add the seconds (a running batch's own), else a fresh dict."""
        self.timings: dict[str, float] = {} if timings is None else timings
        self._sync = sync or (lambda: None)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        self._sync()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def parse_size(size: str) -> tuple[int, int]:
    """'WxH' -> (width, height)."""
    w, h = size.lower().split("x")
    return int(w), int(h)
