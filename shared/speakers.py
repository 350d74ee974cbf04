"""Speakers by name: how a user message of a group chat tells the model who said it.

OpenAI and Azure OpenAI take a `name` on a user message (`^[a-zA-Z0-9_-]{1,64}$`); other
OpenAI-compatible servers may drop or refuse it, so for them the name leads the text: `Ada: ...`.
A display name that does not survive as a `name` (nothing left after folding to ASCII) is sent as
a prefix too. The rendering depends only on the stored message, so a prompt's prefix repeats.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Literal

from .messages import ChatMessage

__all__ = ["SpeakerStyle", "name_field", "wire_message"]

SpeakerStyle = Literal["name", "prefix"]
_NOT_ALLOWED = re.compile(r"[^a-zA-Z0-9_-]+")
_PREFIX_CHARS = 64


def name_field(display_name: str) -> str | None:
    """`display_name` as OpenAI's `name` allows it (José Núñez → Jose_Nunez), or None."""
    folded = unicodedata.normalize("NFKD", display_name).encode("ascii", "ignore").decode()
    name = _NOT_ALLOWED.sub("_", folded).strip("_")[:64]
    return name or None


def wire_message(message: ChatMessage, *, style: SpeakerStyle) -> dict[str, Any]:
    """The Chat Completions form of `message`, with its speaker when it has one."""
    wire = message.to_openai()
    if message.role != "user" or not message.name:
        return wire
    if style == "name" and (name := name_field(message.name)) is not None:
        wire["name"] = name
        return wire
    speaker = " ".join(message.name.split())[:_PREFIX_CHARS]
    wire["content"] = f"{speaker}: {message.content or ''}"
    return wire
