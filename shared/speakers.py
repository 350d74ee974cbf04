"""Speakers by name: how a user message of a group chat tells the model who said it.

OpenAI and Azure OpenAI take a `name` on a user message (`^[a-zA-Z0-9_-]{1,64}$`); other
OpenAI-compatible servers may drop or refuse it, so for them the name leads the text: `Ada: ...`.
A display name that does not survive as a `name` (nothing left after folding to ASCII) is sent as
a prefix too. The rendering depends only on the stored message, so a prompt's prefix repeats.

A display name is text from outside: `clean_name` keeps it on one line (no control, format or
separator characters: no newline can start a forged "assistant:" line) and bounded, wherever it
reaches the model or a transcript.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Literal

from .lines import one_line
from .messages import ChatMessage

__all__ = ["MAX_NAME_CHARS", "SpeakerStyle", "clean_name", "name_field", "wire_message"]

SpeakerStyle = Literal["name", "prefix"]
_NOT_ALLOWED = re.compile(r"[^a-zA-Z0-9_-]+")
#: A display name is cut to this many characters.
MAX_NAME_CHARS = 64
_PREFIX_CHARS = MAX_NAME_CHARS


def clean_name(display_name: str | None) -> str | None:
    """`display_name` on one line and bounded: control, format (bidi overrides, zero-width) and
    line or paragraph separator characters become spaces, runs of spaces one, and a colon
    (which would make it read as a speaker's label) a similar-looking sign; None if nothing is
    left."""
    if not display_name:
        return None
    name = one_line(display_name[:4 * MAX_NAME_CHARS]).replace(":", "\ua789")
    name = name[:MAX_NAME_CHARS].strip()
    return name or None


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
    if style == "name" and (name := name_field(clean_name(message.name) or "")) is not None:
        wire["name"] = name
        return wire
    speaker = clean_name(message.name) or "someone"
    wire["content"] = f"{speaker}: {message.content or ''}"
    return wire
