"""Suggested replies: up to three follow-ups the model writes at the end of its answer, in the
same model call, shown as Teams' `suggestedActions` (`imBack` buttons) on the final message.

The model is asked to end its answer with a marked block:

    ...the answer.
    <suggested_replies>
    What about Oslo?
    And tomorrow?
    </suggested_replies>

`split` takes the block off the answer (the stored reply never holds it) and reads at most
`MAX_SUGGESTIONS` from it; a block that is missing, unclosed or empty gives none, and whatever
follows the opening marker is never shown. While the answer streams, `holding_back` wraps the text
listener so the block, and any tail that may be its start (`<sugg`), never reaches the chat. A
tap on a suggestion sends its text as an ordinary message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from .model import TextListener

__all__ = ["CLOSE", "INSTRUCTION", "MAX_SUGGESTIONS", "OPEN", "holding_back", "split",
           "suggested_actions", "visible"]

OPEN = "<suggested_replies>"
CLOSE = "</suggested_replies>"
MAX_SUGGESTIONS = 3
#: A suggestion is a short message; a longer line is not one.
MAX_SUGGESTION_CHARS = 100
INSTRUCTION = (
    "\n\nAfter your answer, suggest up to three short follow-up messages the user might send you "
    f"next (each under 60 characters, in the user's language), one per line between {OPEN} and "
    f"{CLOSE}, as the very last thing you write. Leave the block out when no follow-up fits.")
#: A list marker a model may put before a line: "-", "*", "•", "1.", "2)".
_BULLET = re.compile(r"^\s*(?:[-*•]|\d{1,2}[.)])\s+")


def split(text: str) -> tuple[str, tuple[str, ...]]:
    """The answer without its block, and the suggestions the block holds."""
    answer, found, rest = text.partition(OPEN)
    if not found:
        return text, ()
    block, closed, _ = rest.partition(CLOSE)
    return answer.rstrip(), _read(block) if closed else ()


def visible(text: str) -> str:
    """What of a streamed answer may be shown: the text before the block, less any tail that may
    be the start of its marker. It only grows as `text` grows, so the stream stays cumulative."""
    answer, found, _ = text.partition(OPEN)
    if found:
        return answer
    for length in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:length]):
            return text[:-length]
    return text


def holding_back(listener: TextListener | None) -> TextListener | None:
    """`listener`, shown only the visible part of the text (None stays None)."""
    if listener is None:
        return None

    async def on_text(text: str) -> None:
        await listener(visible(text))

    return on_text


def suggested_actions(suggestions: Sequence[str]) -> dict[str, Any]:
    """Teams' `suggestedActions` for a message: one `imBack` button per suggestion."""
    return {"actions": [{"type": "imBack", "title": text, "value": text} for text in suggestions]}


def _read(block: str) -> tuple[str, ...]:
    """The suggestions of a block: one a line (or a JSON list of strings), list markers and quotes
    taken off, blanks, over-long lines and repeats dropped, at most `MAX_SUGGESTIONS`."""
    lines: list[Any] = block.splitlines()
    if block.strip().startswith("["):
        try:
            lines = json.loads(block)
        except ValueError:
            pass
    found: dict[str, str] = {}
    for line in lines if isinstance(lines, list) else []:
        if not isinstance(line, str):
            continue
        text = _BULLET.sub("", line).strip().strip("\"'“”").strip()
        if text and len(text) <= MAX_SUGGESTION_CHARS and "<" not in text:
            found.setdefault(text.casefold(), text)
    return tuple(found.values())[:MAX_SUGGESTIONS]
