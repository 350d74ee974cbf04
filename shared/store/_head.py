"""The head row of a conversation: its typed fields and every rule of its copy of the newest turns.

The head (row key `h`) is what a turn reads and what its commit replaces, under the head's ETag:

    conversation_id   the channel's ID, as given (the partition key may be a hash of it)
    last_seq          the sequence number of the newest message
    cleared_seq       messages up to this one are hidden by a clear (being deleted)
    recent            the newest activities committed: [{"a": id, "f": first seq, "l": last seq}]
    cache, cache_from a JSON copy of the newest whole turns (message rows as stored, oldest first),
                      covering sequence numbers `cache_from` to `last_seq`

The copy is what makes a turn's read one point read. It is written in the same transaction as the
rows it copies, so it never disagrees with them. It keeps the newest whole turns until they hold
twice the window's token budget (the next message may reserve less of it) or its message cap,
and at most `COPY_MAX_CHARS` of JSON; a window it cannot settle is read from the rows instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from ..messages import utc_now
from ..window import WindowBuilder
from ._codec import HEAD, Entity, entity_message, get_text, put_text

__all__ = ["COPY_MAX_CHARS", "RECENT_ACTIVITIES", "RECENT_MAX_CHARS", "Basis", "Head", "Recent"]

#: How many committed activities the head remembers (a channel retries within minutes), and in at
#: most how many characters of ASCII JSON: a string property holds 32,768 UTF-16 code units, and
#: activity IDs are the channel's to choose (up to 1,024 characters each).
RECENT_ACTIVITIES = 32
RECENT_MAX_CHARS = 30_000
#: At most this many characters of (ASCII) JSON: the head stays far below an entity's 1 MiB, and
#: a transaction's body below 4 MiB with a turn of MAX_TURN_BYTES.
COPY_MAX_CHARS = 200_000
#: Properties of a read message row that the copy has no use for.
_NOT_COPIED = frozenset({"PartitionKey", "RowKey", "Timestamp"})


@dataclass(frozen=True, slots=True)
class Recent:
    """A committed activity and the sequence numbers of its messages."""

    activity_id: str
    first: int
    last: int


@dataclass(frozen=True, kw_only=True)
class Head:
    conversation_id: str
    last_seq: int = 0
    cleared_seq: int = 0
    recent: tuple[Recent, ...] = ()
    #: The newest whole turns as message rows, oldest first; None: no copy (an older version's head).
    copy: tuple[Entity, ...] | None = None
    copy_from: int = 1
    #: The ETag of the stored head; None for a head not stored yet.
    etag: str | None = None

    @classmethod
    def read(cls, entity: Entity, *, etag: str) -> Head:
        text = get_text(entity, "cache")
        copy = None
        if text is not None and "cache_from" in entity:
            copy = tuple(_from_copy(row) for row in json.loads(text))
        return cls(
            conversation_id=str(entity["conversation_id"]),
            last_seq=int(entity["last_seq"]),
            cleared_seq=int(entity.get("cleared_seq", 0)),
            recent=tuple(Recent(str(item["a"]), int(item["f"]), int(item["l"]))
                         for item in json.loads(entity.get("recent", "[]"))),
            copy=copy,
            copy_from=int(entity.get("cache_from", 1)),
            etag=etag,
        )

    def entity(self, pk: str) -> Entity:
        """The head as the row to write (keys included)."""
        entity: Entity = {
            "PartitionKey": pk,
            "RowKey": HEAD,
            "conversation_id": self.conversation_id,
            "last_seq": self.last_seq,
            "cleared_seq": self.cleared_seq,
            "recent": _recent_text(self.recent),
            "updated_at": utc_now(),
        }
        if self.copy is not None:
            entity["cache_from"] = self.copy_from
            put_text(entity, "cache", _copy_text(self.copy))
        return entity

    def committed(self, activity_id: str | None) -> bool:
        return activity_id is not None and any(r.activity_id == activity_id for r in self.recent)

    def fill(self, builder: WindowBuilder) -> bool:
        """Offer the copied messages to `builder`, newest first: True if they settle the window."""
        if self.copy is None:
            return False
        for row in reversed(self.copy):
            if row["seq"] <= self.cleared_seq or not builder.offer(entity_message(row), row["tokens"]):
                return True
        # Every copied message fitted: the window is settled if nothing visible is older.
        return self.copy_from <= self.cleared_seq + 1

    def cleared(self) -> Head:
        """The head after a clear: every stored message hidden, nothing remembered."""
        return replace(self, cleared_seq=self.last_seq, recent=(), copy=(),
                       copy_from=self.last_seq + 1)

    def after(self, basis: Basis, rows: Sequence[Entity], *, activity_id: str, token_budget: int,
              max_messages: int) -> Head:
        """The head once the turn `rows` (message rows, oldest first) is committed on `basis`."""
        first, last = int(rows[0]["seq"]), int(rows[-1]["seq"])
        recent = (*self.recent, Recent(activity_id, first, last))[-RECENT_ACTIVITIES:]
        while len(recent) > 1 and len(_recent_text(recent)) > RECENT_MAX_CHARS:
            recent = recent[1:]  # the marker rows still catch older duplicates
        copy, copy_from = _next_copy(self, basis, list(rows), token_budget=token_budget,
                                     max_messages=max_messages)
        return replace(self, last_seq=last, recent=recent, copy=copy, copy_from=copy_from)


@dataclass(frozen=True, kw_only=True)
class Basis:
    """What a window was loaded from, handed back to the store when its turn commits."""

    head: Head
    #: The message rows read when the copy could not answer (newest whole turns, oldest first).
    rows: tuple[Entity, ...] | None = None
    #: Those rows reach back to the first visible message.
    rows_reach_start: bool = False
    token_budget: int = 0
    max_messages: int = 0


def _next_copy(head: Head, basis: Basis, rows: list[Entity], *, token_budget: int,
               max_messages: int) -> tuple[tuple[Entity, ...], int]:
    """The copy after this turn: the newest whole turns, enough for the next load of the window."""
    if basis.rows is not None:  # loaded from the rows: they are the newest whole turns
        old = list(basis.rows)
        covered_from = (head.cleared_seq + 1 if basis.rows_reach_start
                        else int(old[0]["seq"]) if old else int(rows[0]["seq"]))
    elif head.copy is None:  # a head from before the copy: it starts with this turn
        old, covered_from = [], int(rows[0]["seq"])
    else:
        old, covered_from = [row for row in head.copy if row["seq"] > head.cleared_seq], \
            head.copy_from
    turns: list[list[Entity]] = []  # as the window builder sees them: a user message and what follows
    for row in [*old, *rows]:
        if row["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(row)
    kept: list[list[Entity]] = []
    tokens = count = 0
    chars = 2
    for turn in reversed(turns):
        size = len(_copy_text(turn))
        if chars + size > COPY_MAX_CHARS:
            break
        kept.append(turn)
        tokens += sum(int(row["tokens"]) for row in turn)
        count += len(turn)
        chars += size
        if tokens > 2 * token_budget or count >= max_messages:
            break
    copy = tuple(row for turn in reversed(kept) for row in turn)
    if not copy:
        return (), int(rows[-1]["seq"]) + 1  # the newest turn alone is too large: covers nothing
    if len(copy) < len(old) + len(rows):
        return copy, int(copy[0]["seq"])  # older turns were let go
    return copy, covered_from


def _recent_text(recent: Sequence[Recent]) -> str:
    return json.dumps([{"a": r.activity_id, "f": r.first, "l": r.last} for r in recent])


def _copy_text(rows: Sequence[Entity]) -> str:
    return json.dumps([{name: value.isoformat() if isinstance(value, datetime) else value
                        for name, value in row.items() if name not in _NOT_COPIED}
                       for row in rows])


def _from_copy(row: dict[str, Any]) -> Entity:
    if isinstance(row.get("timestamp"), str):
        row["timestamp"] = datetime.fromisoformat(row["timestamp"])
    return row
