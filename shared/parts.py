"""A long answer in parts a channel can hold: where to cut it, and the message each part goes in.

Teams refuses a message over about 28 KB (the activity's JSON) and ends a stream after two
minutes, so a long answer goes out in several messages. `cut` chooses where a part ends: at the
end of a paragraph, else a line, else a sentence, else a word, in the last stretch of what fits
(from `floor` of it), outside a fenced code block when such a place exists; only when none does is
a code block cut, at a line, and the fence closed at the end of the part and opened again (same
language) at the start of the next. `split_text` cuts a whole text that way; `split_activity`
puts each part in a copy of the reply's activity, the buttons and the feedback on the last.
Sizes are bytes on the wire: the text as a JSON string in UTF-8 (`wire_size`). Pure functions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_ACTIVITY_BYTES", "Cut", "close", "cut", "split_activity", "split_text", "wire_size"]

#: Teams refuses an activity over about 28 KB; we keep 2 KB of margin.
MAX_ACTIVITY_BYTES = 26_000
#: Room a streamed final adds to a part's activity (its streaminfo entity and channel data).
STREAM_FINAL_BYTES = 300
#: However large the rest of an activity, a part holds at least this much text.
MIN_TEXT_BYTES = 1_000
_FENCE = re.compile(r"^[ ]{0,3}(`{3,}|~{3,})([^\n`]*)$", re.MULTILINE)
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_LINE = re.compile(r"\n\s*")
#: A sentence's end: a stop (and a closing quote or bracket) before white space, or a full-width
#: stop, which needs none.
_SENTENCE = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+|(?<=[。！？])[」』）]*\s*")
_WORD = re.compile(r"\s+")
_CITED = re.compile(r"\[(\d{1,3})\]")


def wire_size(text: str) -> int:
    """Bytes of `text` as a JSON string, quotes included (as the connector sends it)."""
    return len(json.dumps(text, ensure_ascii=False).encode())


@dataclass(frozen=True, kw_only=True)
class Cut:
    """A part ends at `end`; the next starts at `start` (the white space between is dropped).
    `fence`: the opening line of a code block the cut falls in (close it, open it again)."""

    end: int
    start: int
    fence: str | None = None
    #: At a paragraph, line, sentence or word (False: mid-word, nothing better fitted).
    clean: bool = True


def _fits(text: str, limit: int) -> int:
    """The length of the longest prefix of `text` whose `wire_size` is at most `limit`."""
    if wire_size(text) <= limit:
        return len(text)
    low, high = 0, len(text)
    while low < high:  # wire_size grows with the prefix: a binary search
        middle = (low + high + 1) // 2
        if wire_size(text[:middle]) <= limit:
            low = middle
        else:
            high = middle - 1
    return low


def _fences(text: str) -> list[tuple[int, int, str]]:
    """The fenced code blocks of `text`: (start, end, opening line); an unclosed one runs to the
    end of the text."""
    blocks: list[tuple[int, int, str]] = []
    opened: re.Match[str] | None = None
    for line in _FENCE.finditer(text):
        if opened is None:
            opened = line
        elif line.group(1)[0] == opened.group(1)[0] and len(line.group(1)) >= len(opened.group(1)) \
                and not line.group(2).strip():
            blocks.append((opened.start(), line.end(), opened.group().strip()))
            opened = None
    if opened is not None:
        blocks.append((opened.start(), len(text) + 1, opened.group().strip()))
    return blocks


def _inside(position: int, blocks: list[tuple[int, int, str]]) -> str | None:
    for start, end, opening in blocks:
        if start < position < end:
            return opening
    return None


def cut(text: str, *, limit: int, floor: float = 0.5) -> Cut:
    """Where the first part of `text` ends when it may hold `limit` bytes (`wire_size`), four of
    them kept to close a code block if it has one. `floor`: a cut is looked for in the last part of what fits,
    from this share of it on, so parts are not small."""
    fit = _fits(text, limit)
    if fit == len(text):
        return Cut(end=len(text), start=len(text))
    blocks = _fences(text)
    if blocks:
        fit = _fits(text[:fit], limit - 4)  # room for a closing fence
    lowest = int(fit * floor)
    inside_code: Cut | None = None
    for pattern in (_PARAGRAPH, _LINE, _SENTENCE, _WORD):
        places = [m for m in pattern.finditer(text, lowest, fit + 1) if lowest < m.start() <= fit]
        for place in reversed(places):
            fence = _inside(place.start(), blocks)
            if fence is None:
                return Cut(end=place.start(), start=place.end())
            if inside_code is None and pattern is _LINE:
                inside_code = Cut(end=place.start(), start=place.start() + 1, fence=fence)
    if inside_code is not None:  # no place outside code: a line inside it
        return inside_code
    return Cut(end=fit, start=fit, fence=_inside(fit, blocks), clean=False)


def split_text(text: str, *, limit: int) -> list[str]:
    """`text` in parts of at most `limit` bytes each, cut by `cut`."""
    parts: list[str] = []
    reopen = ""
    rest = text
    while True:
        current = reopen + rest
        place = cut(current, limit=limit)
        if place.end == len(current):
            parts.append(current)
            return parts
        if place.end <= len(reopen):  # nothing of the text fits after the fence: drop the fence
            current, reopen = rest, ""
            place = cut(current, limit=limit)
        part, reopen = close(current, place)
        parts.append(part)
        rest = current[place.start:]


def close(text: str, place: Cut) -> tuple[str, str]:
    """The part of `text` that `place` ends, its code block closed if it cuts one; and what the
    next part starts with to open that block again."""
    part = text[:place.end].rstrip()
    if place.fence is None:
        return part, ""
    marks = place.fence.lstrip()
    return f"{part}\n{marks[:len(marks) - len(marks.lstrip(marks[0]))]}", f"{place.fence}\n"


def split_activity(activity: dict[str, Any], *, limit: int = MAX_ACTIVITY_BYTES,
                   claims: str = "each") -> list[dict[str, Any]]:
    """The message `activity` as one activity per part of its text, each within `limit` bytes
    with room for a stream's final. Each part keeps the AI label; `suggestedActions` and the
    feedback buttons go on the last. `claims`: "each" part carries the citations its text cites,
    or "last": the last carries them all (the earlier parts went out before they were known)."""
    text = str(activity.get("text") or "")
    empty = {**activity, "text": ""}
    budget = max(MIN_TEXT_BYTES, limit - STREAM_FINAL_BYTES - len(
        json.dumps(empty, ensure_ascii=False).encode()))
    texts = split_text(text, limit=budget)
    if len(texts) == 1:
        return [activity]
    parts = []
    for index, part in enumerate(texts):
        last = index == len(texts) - 1
        shaped = {**activity, "text": part}
        if not last:
            shaped.pop("suggestedActions", None)
            channel_data = {k: v for k, v in (activity.get("channelData") or {}).items()
                            if k != "feedbackLoop"}
            if channel_data:
                shaped["channelData"] = channel_data
            else:
                shaped.pop("channelData", None)
        if activity.get("entities"):
            shaped["entities"] = [_cited_in(entity, part, keep=last if claims == "last" else None)
                                  for entity in activity["entities"]]
        parts.append(shaped)
    return parts


def _cited_in(entity: Any, text: str, *, keep: bool | None) -> Any:
    """`entity` with only the citation claims `text` cites (`keep`: all of them, or none)."""
    if not isinstance(entity, dict) or not isinstance(entity.get("citation"), list):
        return entity
    if keep is None:
        cited = {int(n) for n in _CITED.findall(text)}
        claims = [c for c in entity["citation"] if isinstance(c, dict) and c.get("position") in cited]
    else:
        claims = list(entity["citation"]) if keep else []
    trimmed = {k: v for k, v in entity.items() if k != "citation"}
    return {**trimmed, "citation": claims} if claims else trimmed
