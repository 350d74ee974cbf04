"""Suggested replies: up to three follow-ups the model writes at the end of its answer, in the
same model call, shown as Teams' `suggestedActions` (`imBack` buttons) on the final message.

The model is asked to end its answer with a marked block:

    ...the answer.
    <suggested_replies>
    What about Oslo?
    And tomorrow?
    </suggested_replies>

The model's text is data, and models are clumsy: only a well-formed block at the very end counts
(`split`). A marker elsewhere (mid-answer, unclosed, or quoted in code: after an odd number of
backticks) is text and stays in the answer; the markers are matched whatever their case. A
suggestion becomes a button's text: it is put on one line with no control or bidi characters
(`shared/lines.py`), and one the bot would read as a command of its own (`/reset`) is never
offered. While the answer streams, `holding_back` wraps the text listener so a block that may
still be the last thing written, and a tail that may be the start of its marker (`<sugg`), never
reaches the chat; what turns out not to be the block is shown once that is clear.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from .instructions import SUGGESTIONS_CLOSE as CLOSE
from .instructions import SUGGESTIONS_INSTRUCTION as INSTRUCTION
from .instructions import SUGGESTIONS_OPEN as OPEN
from .lines import one_line
from .listeners import TextListener

__all__ = ["CLOSE", "INSTRUCTION", "MAX_SUGGESTIONS", "OPEN", "holding_back", "split",
           "suggested_actions", "visible"]

MAX_SUGGESTIONS = 3
#: A suggestion is a short message; a longer line is not one.
MAX_SUGGESTION_CHARS = 100
#: A list marker a model may put before a line: "-", "*", "•", "1.", "2)".
_BULLET = re.compile(r"^\s*(?:[-*•]|\d{1,2}[.)])\s+")
_OPEN = re.compile(re.escape(OPEN), re.IGNORECASE)
_CLOSE = re.compile(re.escape(CLOSE), re.IGNORECASE)
_OPEN_FOLDED = OPEN.casefold()


def split(text: str) -> tuple[str, tuple[str, ...]]:
    """The answer without its block, and the suggestions the block holds; `text` as it is when
    it does not end with a well-formed block."""
    end = text.rstrip()
    closing = _last(_CLOSE, end)
    if closing is None or closing.end() != len(end):
        return text, ()
    opening = _last(_OPEN, end, before=closing.start())
    if opening is None or _in_code(end, opening.start()):
        return text, ()
    return end[:opening.start()].rstrip(), _read(end[opening.end():closing.start()])


def visible(text: str) -> str:
    """What of a streamed answer may be shown: the text before a block that may still be the
    last thing written, less any tail that may be the start of its marker. It only grows as
    `text` grows, so the stream stays cumulative."""
    for opening in _OPEN.finditer(text):
        if not _in_code(text, opening.start()) and _may_end(text[opening.end():]):
            return text[:opening.start()]
    tail = text[-(len(OPEN) - 1):].casefold()
    for length in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if tail.endswith(_OPEN_FOLDED[:length]):
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


def _last(pattern: re.Pattern[str], text: str, *, before: int | None = None) -> re.Match[str] | None:
    matches = list(pattern.finditer(text, 0, len(text) if before is None else before))
    return matches[-1] if matches else None


def _in_code(text: str, position: int) -> bool:
    """Inside a code span or block: an odd number of backticks before `position`."""
    return text.count("`", 0, position) % 2 == 1


def _may_end(after: str) -> bool:
    """Whether what follows an opening marker may still become a block that ends the answer:
    not closed yet, or closed with nothing but white space after it."""
    for closing in _CLOSE.finditer(after):
        if after[closing.end():].strip():
            return False
    return True


def _lines(block: str) -> Iterator[Any]:
    """A block's entries: a JSON list's items, or its lines."""
    if block.strip().startswith("["):
        try:
            items = json.loads(block)
        except ValueError:
            pass
        else:
            yield from items if isinstance(items, list) else ()
            return
    yield from block.splitlines()


def _read(block: str) -> tuple[str, ...]:
    """The suggestions of a block: one a line (or a JSON list of strings), on one line with no
    control or bidi characters, list markers and quotes taken off; blanks, over-long lines,
    commands of ours and repeats dropped; at most `MAX_SUGGESTIONS`."""
    found: dict[str, str] = {}
    for line in _lines(block):
        if not isinstance(line, str):
            continue
        text = _BULLET.sub("", one_line(line)).strip().strip("\"'“”").strip()
        if text and len(text) <= MAX_SUGGESTION_CHARS and "<" not in text and \
                not text.startswith("/"):
            found.setdefault(text.casefold(), text)
    return tuple(found.values())[:MAX_SUGGESTIONS]
