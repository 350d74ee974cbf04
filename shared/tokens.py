"""Token counting for the history window: tiktoken when its encoding is at hand, else an estimate.

tiktoken downloads its encoding files on first use. Where that fails (no internet, as in the tests),
we count `ceil(UTF-8 bytes / 3)` per text. That over-counts English (about 4 characters a token)
and matches CJK text (3 bytes a character, about a token each), so the window errs on the small
side, never the large. Every message also costs `MESSAGE_OVERHEAD` tokens for its role and framing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import lru_cache

from .messages import ChatMessage

__all__ = [
    "MESSAGE_OVERHEAD",
    "count_message_tokens",
    "count_text_tokens",
    "estimate_text_tokens",
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
