"""Prompts, tokens and pixels the way the official `VLChatProcessor` makes them.

- DeepSeek template: `"{system}\\n\\n" + "User: {text}\\n\\n" + "Assistant: {text}<｜end▁of▁sentence｜>" ...
  + "Assistant:"`, every message stripped, the whole prompt stripped; the roles are the
  strings `User`/`Assistant`, as the JanusFlow README and demo pass them.
- Token ids: BOS (when tokenizer_config says `add_bos_token`, as DeepSeek's does) + the
  tokenizer's encoding; each `<image_placeholder>` becomes `<begin_of_image>`, N placeholders,
  `<end_of_image>`, and the image features overwrite the begin tag and the N placeholders.
- Pixels (`VLMImageProcessor`): bicubic resize of the longer side to image_size (each side at
  least min_size), centred pad to a square with the mean colour, rescale, normalise.
- Text-to-image prefix: `User: {p}\\n\\nAssistant:<begin_of_image>` with no system prompt,
  minus its last token, whose slot the time embedding takes.
- Special tokens: `processor_config.json` (when present) names the four image tags and the
  image-token count. A tag the tokenizer lacks is added as an extra special token, in the official
  order (image, generation, begin, end), so it takes the next free id, as `VLChatProcessor` does;
  the published `special_tokens_map.json` lists none of them. A tokenizer without the pad token
  pads with EOS. BOS and EOS themselves must be there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast

from rfserve.model_zoo.base import ChatPrompt
from rfserve.model_zoo.loading import CheckpointError, read_json

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
IMAGE_TAG, IMAGE_START, IMAGE_END = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
GEN_TAG = "<｜begin▁of▁generation｜>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IMAGE_TAG, IMAGE_START, IMAGE_END, GEN_TAG)


@dataclass(frozen=True)
class Tags:
    """The image tags, as `processor_config.json` names them (VLChatProcessor's defaults otherwise)."""
    image: str = IMAGE_TAG
    generation: str = GEN_TAG
    start: str = IMAGE_START
    end: str = IMAGE_END

    def official_order(self) -> tuple[str, ...]:
        """The order in which VLChatProcessor adds the missing ones, which fixes their ids."""
        return self.image, self.generation, self.start, self.end
SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual "
                 "content that the user provides, and assist the user with a variety of tasks using natural "
                 "language.")
USER, ASSISTANT = "User", "Assistant"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def sft_prompt(turns: list[tuple[str, str]], system: str) -> str:
    """turns alternate (User, text), (Assistant, text), ..., ending with a User turn."""
    seps = ("\n\n", EOS)
    out = f"{system}{seps[0]}" if system else ""
    for i, (role, text) in enumerate([*turns, (ASSISTANT, "")]):
        text = text.strip()
        out += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
    return out.strip()


@dataclass(frozen=True)
class ImageProcessorConfig:
    image_size: int
    min_size: int = 14
    image_mean: tuple[float, float, float] | None = CLIP_MEAN
    image_std: tuple[float, float, float] | None = CLIP_STD
    rescale_factor: float = 1.0 / 255.0
    do_normalize: bool = True

    @classmethod
    def load(cls, path: Path) -> "ImageProcessorConfig":
        d = read_json(path)
        if "image_size" not in d:
            raise CheckpointError(f"malformed file: {path}: no image_size")
        keep = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()
                if k in cls.__dataclass_fields__}
        return cls(**keep)


def preprocess_image(img: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """PIL image → float32 (3, S, S)."""
    img = img.convert("RGB")
    w, h = img.size
    longest = max(w, h)
    size_hw = (max(int(h / longest * cfg.image_size), cfg.min_size),
               max(int(w / longest * cfg.image_size), cfg.min_size))
    img = img.resize((size_hw[1], size_hw[0]), Image.BICUBIC)   # what torchvision's resize does for PIL input
    background = (127, 127, 127) if cfg.image_mean is None else tuple(int(m * 255) for m in cfg.image_mean)
    side = max(img.size)
    if img.size[0] != img.size[1]:
        square = Image.new(img.mode, (side, side), background)
        square.paste(img, ((side - img.size[0]) // 2, (side - img.size[1]) // 2))
        img = square
    x = (np.asarray(img).astype(np.float64) * cfg.rescale_factor).astype(np.float32).transpose(2, 0, 1)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return x                                                      # (3, S, S)


class JanusFlowProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerFast, image_cfg: ImageProcessorConfig,
                 num_image_tokens: int, add_bos: bool = True, tags: Tags = Tags()):
        self.tokenizer, self.image_cfg, self.num_image_tokens = tokenizer, image_cfg, num_image_tokens
        self.tags = tags
        missing = [t for t in (BOS, EOS) if t not in tokenizer.get_vocab()]
        if missing:
            raise CheckpointError(f"tokenizer.json lacks the special token(s) {missing}")
        for tag in tags.official_order():
            if tag not in tokenizer.get_vocab():
                tokenizer.add_special_tokens({"additional_special_tokens": [tag]})
        vocab = tokenizer.get_vocab()
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self.pad_id = vocab.get(PAD, self.eos_id)
        self.image_id, self.image_start_id, self.image_end_id = vocab[tags.image], vocab[tags.start], vocab[tags.end]
        self.add_bos = add_bos

    @classmethod
    def load(cls, root: Path, num_image_tokens: int) -> "JanusFlowProcessor":
        for name in ("tokenizer.json", "preprocessor_config.json"):
            if not (root / name).is_file():
                raise CheckpointError(f"missing file: {root / name}")
        try:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"))
        except Exception as err:  # noqa: BLE001 — any parse failure is a broken file
            raise CheckpointError(f"malformed file: {root / 'tokenizer.json'}: {err}") from None
        tok_cfg = read_json(root / "tokenizer_config.json") if (root / "tokenizer_config.json").is_file() else {}
        tok.bos_token, tok.eos_token = BOS, EOS
        tok.pad_token = PAD if PAD in tok.get_vocab() else EOS
        return cls(tok, ImageProcessorConfig.load(root / "preprocessor_config.json"), num_image_tokens,
                   add_bos=tok_cfg.get("add_bos_token", True), tags=_processor_tags(root, num_image_tokens))

    def encode(self, text: str) -> list[int]:
        """`tokenizer.encode(text)` as the official code calls it: BOS, then the text."""
        return ([self.bos_id] if self.add_bos else []) + self.tokenizer.encode(text, add_special_tokens=False)

    default_system = SYSTEM_PROMPT

    @property
    def image_tag(self) -> str:
        return self.tags.image

    def prompt(self, turns: list[tuple[str, str]], system: str, images: list[Image.Image]) -> ChatPrompt:
        """The official SFT format (`sft_prompt`), its image tags expanded (`chat_ids`)."""
        ids, positions = self.chat_ids(sft_prompt(turns, system))
        return ChatPrompt(ids, positions, self.pixels(images) if images else None)

    def reserved_in(self, text: str) -> str | None:
        """The first special-token string inside user text (which would inject image slots or turns)."""
        return next((t for t in (BOS, EOS, PAD, *self.tags.official_order()) if t in text), None)

    def text_tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    # -- text-to-image -----------------------------------------------------------
    def t2i_prefix(self, prompt: str) -> list[int]:
        ids = self.encode(sft_prompt([(USER, prompt)], system="") + self.tags.start)
        return ids[:-1]                                           # the last slot becomes t_emb

    # -- chat --------------------------------------------------------------------
    def chat_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """Expand each image tag; returns (ids, positions the image features overwrite)."""
        ids, positions = [], []
        for tok in self.encode(prompt):
            if tok != self.image_id:
                ids.append(tok)
                continue
            start = len(ids)
            ids += [self.image_start_id] + [self.image_id] * self.num_image_tokens + [self.image_end_id]
            positions += range(start, start + 1 + self.num_image_tokens)
        return ids, positions

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.stack([preprocess_image(i, self.image_cfg) for i in images])) \
            if images else torch.zeros(0, 3, self.image_cfg.image_size, self.image_cfg.image_size)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _processor_tags(root: Path, num_image_tokens: int) -> Tags:
    """The tags `processor_config.json` names, checked against what this loader and the model can do."""
    path = root / "processor_config.json"
    if not path.is_file():
        return Tags()
    cfg = read_json(path)
    count = cfg.get("num_image_tokens", num_image_tokens)
    if count != num_image_tokens:
        raise CheckpointError(f"{path}: num_image_tokens is {count}, but the vision tower gives {num_image_tokens}")
    if cfg.get("add_special_token", False):
        # With it, the official processor keeps the tag before <begin_of_image>, and its image mask then
        # covers one position more than the features it writes: no published checkpoint sets it.
        raise CheckpointError(f"{path}: add_special_token true is not supported (the published checkpoints use false)")
    d = Tags()
    return Tags(image=cfg.get("image_tag", d.image), generation=cfg.get("image_gen_tag", d.generation),
                start=cfg.get("image_start_tag", d.start), end=cfg.get("image_end_tag", d.end))
