"""The head row of a conversation: its typed fields and every rule of its copy of the newest turns.

The head (row key `h`) is what a turn reads and what its commit replaces, under the head's ETag:

    conversation_id   the channel's ID, as given (the partition key may be a hash of it)
    last_seq          the sequence number of the newest message
    cleared_seq       messages up to this one are hidden by a clear (being deleted)
    recent            the newest activities committed: [{"a": id, "f": first seq, "l": last seq}]
    cache, cache_from a JSON copy of the newest whole turns (message rows as stored, oldest first),
                      covering sequence numbers `cache_from` to `last_seq`
    epoch             made when the head is created: a conversation cleared and begun again has
                      a new one (its sequence numbers start again), so a summary prepared
                      before cannot land in it
    start             the window's start: every visible message before it is covered by `summary`
    summary           the rolling summary of the messages before `start` (none: nothing before it)
    pending, pending_from, pending_to
                      a summary prepared after an earlier reply (of the messages before
                      `pending_to` + 1), ready for the step that moves `start` from `pending_from`
                      to `pending_to` + 1; a turn's commit makes that step (`after`), atomically
    day               the UTC day of the newest turn whose day-index row was written (retention)
    speakers          user IDs whose user-index row names this conversation (bounded)
    spend_*           the spend counters (`shared/limits.py`): turns this minute, tokens today

`day` and `speakers` change only in a commit made after their index rows were written, so a head
never names a day or a speaker whose index row is missing.

The summary never lags the start: `start` moves only in a commit that makes the pending summary
current, so no message falls between the summary and the window (`shared/window.py` chooses the
window; a window that cannot start at `start` is marked `behind`, and `start` stays put).

The copy is what makes a turn's read one point read. It is written in the same transaction as the
rows it copies, so it never disagrees with them. It keeps the newest whole turns until they hold
twice the window's token budget (the next message may reserve less of it) or its message cap,
and at most `COPY_MAX_CHARS` of JSON; a window it cannot settle is read from the rows instead.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from ..limits import Spend
from ..messages import utc_now
from ..window import WindowPlanner
from ._codec import HEAD, Entity, entity_message, get_text, group_turns, put_text

__all__ = ["COPY_MAX_CHARS", "RECENT_ACTIVITIES", "RECENT_MAX_CHARS", "SUMMARY_MAX_CHARS", "Basis",
           "Head", "Recent"]

#: How many committed activities the head remembers (a channel retries within minutes), and in at
#: most how many characters of ASCII JSON: a string property holds 32,768 UTF-16 code units, and
#: activity IDs are the channel's to choose (up to 1,024 characters each).
RECENT_ACTIVITIES = 32
RECENT_MAX_CHARS = 30_000
#: At most this many characters of (ASCII) JSON: the head stays far below an entity's 1 MiB, and
#: a transaction's body below 4 MiB with a turn of MAX_TURN_BYTES.
COPY_MAX_CHARS = 200_000
#: A summary (current or pending) holds at most this many characters: with the copy, a head stays
#: below 1 MiB and a turn's transaction below 4 MiB even if every character is escaped as \uXXXX.
SUMMARY_MAX_CHARS = 20_000
#: The head remembers at most this many indexed speakers, in at most this many characters of JSON;
#: one forgotten is indexed again when they next speak (an upsert of the same row).
SPEAKERS_MAX = 64
SPEAKERS_MAX_CHARS = 8_000
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
    epoch: str = ""
    #: The window's start; 0: not recorded yet (a new conversation, or an older version's head).
    start: int = 0
    summary: str | None = None
    pending: str | None = None
    pending_from: int = 0
    pending_to: int = 0
    #: The UTC day whose day-index row names this conversation ("": none written yet).
    day: str = ""
    #: User IDs whose user-index row names this conversation, oldest first.
    speakers: tuple[str, ...] = ()
    spend: Spend = field(default_factory=Spend)
    #: The ETag of the stored head; None for a head not stored yet.
    etag: str | None = None

    @property
    def window_start(self) -> int:
        """The first visible message the summary does not cover."""
        return max(self.start, self.cleared_seq + 1)

    def ready_step(self) -> int | None:
        """The start the pending summary lets the window step to, if it was prepared for this one."""
        if self.pending is not None and self.pending_from == self.window_start \
                and self.pending_to >= self.window_start:
            return self.pending_to + 1
        return None

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
            epoch=str(entity.get("epoch", "")),
            start=int(entity.get("start", 0)),
            summary=get_text(entity, "summary"),
            pending=get_text(entity, "pending"),
            pending_from=int(entity.get("pending_from", 0)),
            pending_to=int(entity.get("pending_to", 0)),
            day=str(entity.get("day", "")),
            speakers=tuple(json.loads(entity.get("speakers", "[]"))),
            spend=Spend(minute=int(entity.get("spend_minute", 0)),
                        minute_turns=int(entity.get("spend_minute_turns", 0)),
                        day=str(entity.get("spend_day", "")),
                        day_tokens=int(entity.get("spend_day_tokens", 0))),
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
        if self.epoch:
            entity["epoch"] = self.epoch
        if self.start:
            entity["start"] = self.start
        put_text(entity, "summary", self.summary)
        if self.pending is not None:
            put_text(entity, "pending", self.pending)
            entity["pending_from"], entity["pending_to"] = self.pending_from, self.pending_to
        if self.day:
            entity["day"] = self.day
        if self.speakers:
            entity["speakers"] = json.dumps(list(self.speakers))
        if self.spend != Spend():
            entity.update(spend_minute=self.spend.minute,
                          spend_minute_turns=self.spend.minute_turns,
                          spend_day=self.spend.day, spend_day_tokens=self.spend.day_tokens)
        return entity

    def with_speakers(self, ids: Sequence[str]) -> Head:
        """This head remembering `ids` as indexed too (the oldest let go past the bounds)."""
        speakers = (*(known for known in self.speakers if known not in ids), *ids)[-SPEAKERS_MAX:]
        while speakers and len(json.dumps(list(speakers))) > SPEAKERS_MAX_CHARS:
            speakers = speakers[1:]
        return replace(self, speakers=speakers)

    def committed(self, activity_id: str | None) -> bool:
        return activity_id is not None and any(r.activity_id == activity_id for r in self.recent)

    def planner(self, *, token_budget: int, max_messages: int, summaries: bool) -> WindowPlanner:
        """The window planner for this head (`summaries` off: the newest turns that fit)."""
        return WindowPlanner(token_budget=token_budget, max_messages=max_messages,
                             visible_from=self.cleared_seq + 1,
                             start=self.window_start if summaries else None,
                             step_to=self.ready_step() if summaries else None)

    def fill(self, planner: WindowPlanner) -> bool:
        """Offer the copied messages to `planner`, newest first: True if they settle the window."""
        if self.copy is None:
            return False
        for row in reversed(self.copy):
            if row["seq"] <= self.cleared_seq:
                return planner.reached(self.cleared_seq + 1)
            if not planner.offer(int(row["seq"]), entity_message(row), int(row["tokens"])):
                return True
        # Every copied message was offered: settled if no candidate needs older ones.
        return planner.reached(self.copy_from)

    def cleared(self) -> Head:
        """The head after a clear: every stored message hidden, nothing remembered (summary too)
        but the activities committed lately (a channel's retry of one is not answered again) and
        the spend counters; it stays as the conversation's tombstone."""
        return replace(self, cleared_seq=self.last_seq, copy=(),
                       copy_from=self.last_seq + 1, start=self.last_seq + 1, summary=None,
                       pending=None, pending_from=0, pending_to=0, speakers=())

    def with_pending(self, summary: str, *, start: int, to: int) -> Head:
        """This head with a summary prepared for the step from `start` to `to` + 1."""
        return replace(self, pending=summary[:SUMMARY_MAX_CHARS], pending_from=start, pending_to=to)

    def after(self, basis: Basis, rows: Sequence[Entity], *, activity_ids: Sequence[str],
              token_budget: int, max_messages: int) -> Head:
        """The head once the turn `rows` (message rows, oldest first) answering `activity_ids`
        is committed on `basis`."""
        first, last = int(rows[0]["seq"]), int(rows[-1]["seq"])
        recent = (*self.recent, *(Recent(activity_id, first, last)
                                  for activity_id in activity_ids))[-RECENT_ACTIVITIES:]
        while len(recent) > 1 and len(_recent_text(recent)) > RECENT_MAX_CHARS:
            recent = recent[1:]  # the marker rows still catch older duplicates
        copy, copy_from = _next_copy(self, basis, list(rows), token_budget=token_budget,
                                     max_messages=max_messages)
        head = replace(self, last_seq=last, recent=recent, copy=copy, copy_from=copy_from,
                       epoch=self.epoch or uuid.uuid4().hex[:16])
        if basis.step and (start := self.ready_step()) is not None:
            # The step: the prepared summary becomes current as the start moves past what it covers.
            return replace(head, start=start, summary=self.pending, pending=None, pending_from=0,
                           pending_to=0)
        if basis.summaries and self.start == 0:
            # The first turn with summaries on: the window's start is where the window starts now
            # (a new conversation: its first message; an older one: what the window already held).
            return replace(head, start=basis.first_seq or first)
        return head


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
    #: The window was planned with a summary: the commit records the start if it is not yet.
    summaries: bool = False
    #: The commit steps the window (the pending summary becomes current).
    step: bool = False
    #: Sequence number of the window's first message.
    first_seq: int | None = None


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
    turns = group_turns([*old, *rows])  # as the window builder sees them
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
