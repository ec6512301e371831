"""A step-level pipeline's side of per-row LoRA adapters (issue #34), written once for every family that serves them
(the SD families, Hunyuan-DiT): enabling the pools, adapters registered by name, and a running batch's rows
checked, pinned and bound.

A family names the modules its adapters touch (`lora_modules`) and, in its stages, calls
    self.check_lora(specs)          # first in `begin`: a batch naming an unknown adapter costs no encoding
    self.pin_lora(specs, rows)      # last in `begin`, so that nothing after it can fail with the pins taken
    self.bind_lora(running, cfg)    # in `step`, just before the denoiser's forward (laid out by `with_uncond`)
A row's adapters stay pinned (`lora.rows.LoraRows`, a `RowState`) from its `begin` until it leaves the running
batch, so no other batch evicts them while it still steps.
"""
from __future__ import annotations

from torch import nn

from rfserve.model_zoo.base import ImageSpec
from rfserve.model_zoo.lora.files import LoraFile
from rfserve.model_zoo.lora.pool import PoolConfig
from rfserve.model_zoo.lora.rows import PipelineAdapters
from rfserve.model_zoo.running import Running


class LoraPipeline:
    """Mixin for a pipeline whose rows run their own `ImageSpec.lora` (`base.ServesLora`); `adapters` is None
    until `enable_lora`."""

    adapters: PipelineAdapters | None = None

    def lora_modules(self) -> tuple[str, nn.Module, nn.Module | None]:
        """The denoiser's component name in LoRA files ("unet", "transformer"), the denoiser, and the text
        encoder whose layers adapters may change (None where the family serves no text-encoder LoRA)."""
        raise NotImplementedError

    def enable_lora(self, config: PoolConfig, text_config: PoolConfig | None = None) -> None:
        """Wrap the denoiser's target layers (`config.targets`, by default its component's) in place, with
        `config.slots` device slots (the text encoder's per `text_config`, else `config` at the text encoder's own
        targets). Call once the model is on its device and before the fast path is prepared: compiled graphs read
        the slots and bindings in place."""
        if self.adapters is not None:
            raise RuntimeError("LoRA is already enabled on this pipeline")
        component, denoiser, text_encoder = self.lora_modules()
        if text_config is not None and text_encoder is None:
            raise ValueError(f"{type(self).__name__} serves no text-encoder LoRA, so it takes no text_config")
        self.adapters = PipelineAdapters(denoiser, text_encoder, config, text_config, component=component)

    def register_lora(self, name: str, lora: LoraFile) -> None:
        """A ValueError (naming the file) for layers of a component this pipeline does not serve."""
        self._lora().register(name, lora)

    def unregister_lora(self, name: str) -> None:
        """A RuntimeError while a running row uses the adapter."""
        self._lora().unregister(name)

    def lora_names(self) -> list[str]:
        return [] if self.adapters is None else self.adapters.names()

    def _lora(self) -> PipelineAdapters:
        if self.adapters is None:
            raise RuntimeError("LoRA is not enabled on this pipeline (enable_lora)")
        return self.adapters

    def check_lora(self, specs: list[ImageSpec]) -> None:
        """KeyError for an unknown adapter, ValueError for a row that names one twice, combines more than the
        pool allows, or asks for any while LoRA is off."""
        if self.adapters is None:
            if any(s.lora for s in specs):
                raise ValueError("a row asks for LoRA adapters, but LoRA is not enabled on this pipeline")
            return
        self.adapters.check([tuple(s.lora) for s in specs])

    def pin_lora(self, specs: list[ImageSpec], rows: dict) -> None:
        """The rows' adapters made resident and pinned, kept in `rows["lora"]` (PoolFull: the rows must wait)."""
        if self.adapters is not None:
            rows["lora"] = self.adapters.pinned([tuple(s.lora) for s in specs])

    def bind_lora(self, running: Running, cfg: list[int]) -> None:
        """Before the denoiser's forward (laid out by `with_uncond` with these `cfg` rows): each row's adapters,
        its unconditional copy's included, as diffusers runs both branches with the adapter loaded."""
        if self.adapters is not None:
            self.adapters.bind(running.rows["lora"], cfg)
