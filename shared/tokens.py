"""Token counting for the history window: tiktoken when its encoding is at hand, else an estimate.

tiktoken downloads its encoding files on first use. Where that fails (no internet, as in the tests),
we count `ceil(UTF-8 bytes / 3)` per text. That over-counts English (about 4 characters a token)
and matches CJK text (3 bytes a character, about a token each), so the window errs on the small
side, never the large. Every message also costs `MESSAGE_OVERHEAD` tokens for its role and framing.

A request's prompt (`count_request_tokens`, what a budget reserves before a model call) is counted
from its wire form: each message's JSON (its framing counted high), the tool specs, and each image
the way OpenAI bills gpt-4o-family image input (`image_tokens`): scaled to fit 2048 x 2048, then
its shortest side to 768 px, 170 tokens per 512 px tile plus 85 (gpt-4o-mini bills 5,667 per
tile plus 2,833 for the same price: that count is for billing only; the model's context, and so
the history budget, sees gpt-4o's). High detail is counted: `auto`, the default, may choose it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from .messages import ChatMessage

__all__ = [
    "MESSAGE_OVERHEAD",
    "count_message_tokens",
    "count_request_tokens",
    "count_text_tokens",
    "estimate_text_tokens",
    "image_size",
    "image_tokens",
    "tokenizer_name",
]

log = logging.getLogger(__name__)
MESSAGE_OVERHEAD = 4
_ENCODING = "o200k_base"


def estimate_text_tokens(text: str) -> int:
    """The conservative offline estimate: one token per 3 bytes of UTF-8, rounded up."""
    return math.ceil(len(text.encode("utf-8", "surrogatepass")) / 3)


@lru_cache(maxsize=1)
def _counter() -> tuple[str, Callable[[str], int]]:
    try:
        import tiktoken

        encoding = tiktoken.get_encoding(_ENCODING)
    except Exception as exc:
        log.warning("tiktoken encoding %s unavailable (%s); using the bytes/3 estimate",
                    _ENCODING, type(exc).__name__)
        return "estimate-bytes/3", estimate_text_tokens
    return f"tiktoken-{_ENCODING}", lambda text: len(encoding.encode(text, disallowed_special=()))


def tokenizer_name() -> str:
    return _counter()[0]


def count_text_tokens(text: str | None) -> int:
    return _counter()[1](text) if text else 0


def count_message_tokens(message: ChatMessage) -> int:
    """Tokens `message` costs in a prompt: content, tool-call arguments and framing."""
    tokens = MESSAGE_OVERHEAD + count_text_tokens(message.content)
    if message.role == "user" and message.name:  # the speaker, as a name or a prefix
        tokens += 1 + count_text_tokens(message.name)
    for call in message.tool_calls:
        tokens += MESSAGE_OVERHEAD + count_text_tokens(call.name) + count_text_tokens(call.arguments)
    return tokens


#: (base, per 512 px tile) tokens of a high-detail image: what the model's context holds (gpt-4o's
#: rule), and what gpt-4o-mini bills (the same price as gpt-4o's count).
_IMAGE_CONTEXT = (85, 170)
_IMAGE_BILLED_MINI = (2_833, 5_667)
#: An image whose size cannot be read counts as the largest one (2048 x 768 after scaling: 8 tiles).
_LARGEST = (2_048, 768)


def image_tokens(width: int, height: int, *, model: str = "", billed: bool = True) -> int:
    """Tokens of one image of `width` x `height` px at high detail, OpenAI's tile rule: fit in
    2048 x 2048, then the shortest side to 768 px, then 512 px tiles. `billed`: as `model` bills
    it (gpt-4o-mini bills more tokens per image); else as the model's context counts it."""
    base, per_tile = _IMAGE_BILLED_MINI if billed and "4o-mini" in model.lower() else _IMAGE_CONTEXT
    width, height = max(1, width), max(1, height)
    if max(width, height) > 2_048:
        scale = 2_048 / max(width, height)
        width, height = max(1, int(width * scale)), max(1, int(height * scale))
    scale = 768 / min(width, height)
    width, height = int(width * scale), int(height * scale)
    return base + per_tile * math.ceil(width / 512) * math.ceil(height / 512)


def image_size(data: bytes) -> tuple[int, int]:
    """An image's width and height from its header (Pillow reads no more, imported on first use);
    the largest size counted when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError):
        return _LARGEST
    return int(width), int(height)


@lru_cache(maxsize=16)
def _data_url_size(url: str) -> tuple[int, int]:
    """The size of an image sent as a data URL (cached: each tool round sends it again)."""
    head, _, payload = url.partition(",")
    if not head.startswith("data:") or not head.endswith(";base64"):
        return _LARGEST  # a link: the provider fetches it, we cannot look
    try:
        return image_size(base64.b64decode(payload, validate=False))
    except (binascii.Error, ValueError):
        return _LARGEST


def count_request_tokens(messages: Sequence[Mapping[str, Any]],
                         tools: Sequence[Mapping[str, Any]] | None = None, *,
                         model: str = "") -> int:
    """The prompt tokens a Chat Completions request (its wire form) is billed at most: each
    message's JSON, framing included (more than the provider's few tokens a message), each image
    part as `model` bills it (`image_tokens`), and the tool specs."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            images = [part for part in content
                      if isinstance(part, Mapping) and part.get("type") == "image_url"]
            for part in images:
                url = str((part.get("image_url") or {}).get("url") or "")
                total += image_tokens(*_data_url_size(url), model=model)
            message = {**message, "content": [part for part in content if part not in images]}
        total += count_text_tokens(json.dumps(message, ensure_ascii=False))
    if tools:
        total += count_text_tokens(json.dumps(list(tools), ensure_ascii=False))
    return total
