"""Resolve a checkpoint source to a local folder and check it before loading.

Sources are local folders, hub ids ("owner/name") or hub ids already in the HF cache;
`HF_HUB_OFFLINE=1` is honoured by huggingface_hub itself. Every failure becomes a
`CheckpointError` with one line that names the missing or broken file, so the CLI can
print it without a traceback.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]   # .jinja: chat templates
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line for the user."""


def describe(err: BaseException) -> str:
    """Any exception as one line for the user: a `CheckpointError`'s own message, or the type and the first
    line of any other's (a bare KeyError's message is only the key)."""
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    return first if isinstance(err, CheckpointError) else f"{type(err).__name__}: {first}"


def is_hub_id(source: str) -> bool:
    """Whether `resolve_source` looks `source` up on the hub (or in its cache): it names no local path."""
    return not Path(source).expanduser().exists() and bool(_HUB_ID.match(source))


def resolve_source(source: str, *, variant: str | None = None) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{source}: expected a checkpoint folder, got a file")
        return path.resolve()
    if not _HUB_ID.match(source):
        raise CheckpointError(f"{source}: no such folder, and not a hub id of the form owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, allow_patterns=WEIGHT_PATTERNS))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise CheckpointError(f"{source}: not in the local HF cache and {why}") from None
    except HfHubHTTPError as err:
        raise CheckpointError(f"{source}: hub download failed: {str(err).splitlines()[0]}") from None


def require(root: Path, *relative: str) -> None:
    """Raise naming the first missing file; JSON files must also parse."""
    for rel in relative:
        target = root / rel
        if not target.is_file():
            raise CheckpointError(f"missing file: {target}")
        if target.suffix == ".json":
            read_json(target)


def require_any(root: Path, folder: str, names: list[str]) -> Path:
    for name in names:
        if (root / folder / name).is_file():
            return root / folder / name
    raise CheckpointError(f"missing file: {root / folder / names[0]}")


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, which is always an object: diffusers and transformers, given a list, fail with
    messages that name neither the file nor the problem."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"malformed file: {path}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"malformed file: {path}: expected a JSON object, got {type(data).__name__}")
    return data


def weights_name(stem: str, variant: str | None) -> str:
    """diffusers' variant naming: diffusion_pytorch_model.fp16.safetensors."""
    return f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
