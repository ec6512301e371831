"""OpenAI messages → the JanusFlow conversation (system prompt, alternating turns) and images.

- A leading `system`/`developer` message replaces the JanusFlow system prompt; none elsewhere.
- Turns must alternate user/assistant, starting and ending with user.
- In a user message, parts are joined with "\\n" and each image part becomes
  `<image_placeholder>`, so [image, text] gives the demo's "<image_placeholder>\\n{question}".
- Images: `data:` URLs always; http(s) URLs only for hosts on the configured allow-list.
  The pixel count is checked from the header before any decoding (`server.uploads.open_image`).
Every rejection is an APIError(400) naming the offending field.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import urlparse

from rfserve.model_zoo.base import ChatProcessor
from rfserve.server.chat.config import ChatConfig
from rfserve.server.chat.schemas import Message, TextPart
from rfserve.server.errors import APIError, Code


@dataclass
class Conversation:
    system: str
    turns: list[tuple[str, str]]            # (User|Assistant, text with image tags)
    image_urls: list[tuple[str, str]]       # (field path, url), in prompt order
    last_user_text: str                     # text parts only, for image generation


def _parts(msg: Message):
    return [{"type": "text", "text": msg.content}] if isinstance(msg.content, str) else \
        [p.model_dump() for p in msg.content]


def parse_conversation(messages: list[Message], proc: ChatProcessor, cfg: ChatConfig) -> Conversation:
    system, body = proc.default_system, list(enumerate(messages))
    if messages[0].role in ("system", "developer"):
        system = _text_only(messages[0], "messages[0]")
        body = body[1:]
    turns, urls, has_text, last_text = [], [], False, ""
    for k, (i, msg) in enumerate(body):
        field = f"messages[{i}]"
        want = "user" if k % 2 == 0 else "assistant"
        if msg.role != want:
            raise APIError(Code.INVALID_VALUE, f"{field}.role must be {want!r}: turns alternate user/assistant "
                                               f"after an optional first system message", param=f"{field}.role")
        if msg.role == "assistant":
            turns.append(("Assistant", _checked(_text_only(msg, field), proc, field)))
            continue
        pieces, texts = [], []
        for j, part in enumerate(_parts(msg)):
            if part["type"] == "text":
                pieces.append(_checked(part["text"], proc, f"{field}.content[{j}].text"))
                texts.append(part["text"])
            else:
                urls.append((f"{field}.content[{j}].image_url.url", part["image_url"]["url"]))
                pieces.append(proc.image_tag)
        has_text |= any(t.strip() for t in texts)
        last_text = "\n".join(texts)
        turns.append(("User", "\n".join(pieces)))
    if not body or body[-1][1].role != "user":
        raise APIError(Code.INVALID_VALUE, "messages must end with a user message", param="messages")
    if not has_text:
        raise APIError(Code.INVALID_VALUE, "messages contain no text: at least one user message needs a text part",
                       param="messages")
    if len(urls) > cfg.max_images:
        raise APIError(Code.INVALID_VALUE, f"too many images: {len(urls)} given, at most {cfg.max_images} per "
                                           "request", param=urls[cfg.max_images][0])
    return Conversation(system, turns, urls, last_text)


def _text_only(msg: Message, field: str) -> str:
    if isinstance(msg.content, str):
        return msg.content
    texts = [p.text for p in msg.content if isinstance(p, TextPart)]
    if len(texts) < len(msg.content):
        raise APIError(Code.INVALID_VALUE, f"{field}: images are allowed only in user messages",
                       param=f"{field}.content")
    return "\n".join(texts)


def _checked(text: str, proc: ChatProcessor, field: str) -> str:
    token = proc.reserved_in(text)
    if token is not None:
        raise APIError(Code.INVALID_VALUE, f"{field} contains the reserved token {token!r}", param=field)
    return text


def decode_data_url(url: str, field: str) -> bytes:
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise APIError(Code.INVALID_IMAGE_URL, f"{field} must be a data:image/...;base64, URL", param=field)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(Code.INVALID_IMAGE_URL, f"{field}: the base64 payload does not decode", param=field) from None


def check_remote(url: str, field: str, cfg: ChatConfig) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise APIError(Code.INVALID_IMAGE_URL, f"{field}: only data: URLs (and http(s) URLs of allowed hosts) "
                                               "are accepted", param=field)
    if (parsed.hostname or "").lower() not in cfg.image_hosts:
        raise APIError(Code.INVALID_IMAGE_URL, f"{field}: remote image URLs are disabled for host "
                                               f"{parsed.hostname!r}; send the image as a data: URL", param=field)
