"""The `--model` SPECs checked before the model libraries are imported: parsed, confined to `--model-root`, and
each checkpoint found where that reads only the disk. Importing diffusers and transformers takes seconds (most
of a small model's start on a CPU), so a typo in a preset, an option or a folder, or a hub id that is not cached
offline, is refused in about a second instead of after them. Nothing here imports torch or a model library; the
engine takes the folders found here and does not look for them again."""
from __future__ import annotations

from pathlib import Path

from rfserve.model_zoo.loading import describe, is_hub_id, resolve_source
from rfserve.model_zoo.presets import ModelSpec, parse_spec
from rfserve.server.security import confine


class LoadError(RuntimeError):
    """A model that could not be loaded or warmed, whatever raised: one line naming the model, where it came
    from and the cause (a `CheckpointError` already names its file). Anything less specific left a server
    alive, never ready and silent. The original exception stays the cause, for --debug's traceback."""

    def __init__(self, spec: ModelSpec, stage: str, err: BaseException):
        super().__init__(f"model {spec.name!r} ({spec.source or 'built in'}) failed while {stage}: {describe(err)}")


def confine_spec(spec: ModelSpec, model_root: str | None) -> ModelSpec:
    options = dict(spec.options)
    for key in ("base", "tiny_vae"):
        if key in options:
            options[key] = confine(options[key], model_root)
    return ModelSpec(spec.name, confine(spec.source, model_root), options)


def model_specs(models: list[str], model_root: str | None) -> list[ModelSpec]:
    """Each SPEC parsed and confined; a `CheckpointError` names the first one that is not valid."""
    return [confine_spec(parse_spec(text), model_root) for text in models]


def find_sources(specs: list[ModelSpec]) -> dict[str, Path]:
    """The checkpoint folders that can be found on the disk alone, by model name: local folders, and hub ids
    with HF_HUB_OFFLINE set. A hub id online is left to the engine, which may download it, after it has
    logged the memory plan, as before; so is a family that needs no checkpoint. A source that cannot be
    found raises the `LoadError` that loading it would have raised."""
    from huggingface_hub import constants

    roots = {}
    for spec in specs:
        if not spec.source or (is_hub_id(spec.source) and not constants.HF_HUB_OFFLINE):
            continue
        try:
            roots[spec.name] = resolve_source(spec.source)
        except Exception as err:
            raise LoadError(spec, "loading", err) from err
    return roots
