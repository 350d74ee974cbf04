"""Accepted activities in their conversation's order, kept until answered; the queue that wakes the answer.

The inbox table (the conversations table's name + `inbox`) has one partition per conversation
(`encode_key(conversation_id)`, bounded as the store bounds its keys) with two kinds of row:

    !order        the order head (`OrderHead`): `last_seq`, the arrival number last given (it only
                  grows, so a place is never given twice); `done_seq`, every arrival up to it is
                  answered (or given up); `holder` / `held_until`, the worker answering the
                  conversation and until when (`shared/order.py`); `streamed_at`, when the last
                  stream request went out; `parked`, a turn waiting for a person (`Pending`)
    a<activity>   one accepted activity (`Kept`): its arrival `seq`, the body zlib-compressed in
                  binary chunks (a Teams activity over the queue's 64 KiB fits, up to the webhook's
                  1 MB), the sender's IDs (a user's removal finds their rows), whether it is a
                  `/reset`, the stream opened for it (`opening` while the webhook opens it), the
                  attempts made, and a paused turn's saved state; after its sender's removal, a
                  text-free stub (`withdrawn`)
    s<activity>   that the activity was accepted: no text, outliving its `a` row (the answer
                  removes that) until the leftovers' purge

`accept` gives the activity its place: one entity-group transaction writes the head with
`last_seq + 1` (conditioned on the head's ETag) and creates the activity's two rows (a create
fails for a channel's retry of an activity kept or answered before: that is the dedupe, which a
retry that was slow to arrive cannot slip past after the answer, and a clear cannot undo). The same write decides
whether the activity goes first and opens the chat's stream, so of two arrivals racing on an idle
chat only one does. Transactions are built by hand (`shared.store.TableWire`: 1.8 ms of client CPU
against the SDK's 4.6, benchmarks/README.md). Every other change of the
head goes through `change_head`: read, a pure change, a conditional write, a bounded jittered
retry. The queue (`CHAT_TURN_QUEUE`, base64 text as the Functions host reads it) carries small
JSON `TurnTicket`s: wake-ups naming a conversation, never the unit of order.

Azure exceptions are translated to the chatstate tree here, as `shared.store` does for its table.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient
from azure.storage.queue import BinaryBase64DecodePolicy, TextBase64EncodePolicy
from azure.storage.queue.aio import QueueClient

from .errors import BadRequest, ConversationConflict, StorageForbidden, StorageRejected, StorageUnavailable
from .keys import encode_key
from .pending import Pending
from .store import Operation, TableWire, TransactionFailed
from .streaming import CLOCK_SLACK, StreamStart

__all__ = ["LEFTOVER_DAYS", "Inbox", "Kept", "OrderHead", "Place", "TurnTicket",
           "inbox_table_name", "max_dequeue_count", "visibility_timeout"]

log = logging.getLogger(__name__)

ORDER_ROW = "!order"
ROW_PREFIX = "a"
_ROWS_END = "b"  # every activity row's key sorts below it
SEEN_PREFIX = "s"
_SEEN_END = "t"
#: A binary property holds at most 64 KiB.
CHUNK_BYTES = 60_000
MAX_CHUNKS = 16
#: A saved (paused) turn may take this many chunks of its row (with the body, under 1 MiB).
MAX_SAVED_CHUNKS = 8
#: A head change that keeps losing to other writers gives up after this many attempts.
HEAD_ATTEMPTS = 10
_SDK_OPTIONS: dict[str, Any] = {"retry_total": 2, "retry_backoff_factor": 0.2,
                                "connection_timeout": 5, "read_timeout": 10}
#: Rows older than this are leftovers (a conversation nobody woke again).
LEFTOVER_DAYS = 7
#: The Functions host's default `maxDequeueCount`.
DEFAULT_MAX_DEQUEUE_COUNT = 5
#: A queue message may stay invisible at most 7 days.
MAX_DELAY_SECONDS = 7 * 24 * 3600


def max_dequeue_count(host_json: Path) -> int:
    """host.json's `extensions.queues.maxDequeueCount`: the attempt that is a message's last
    (the drain gives a failing unit as many)."""
    return int(_queue_rules(host_json).get("maxDequeueCount", DEFAULT_MAX_DEQUEUE_COUNT))


def visibility_timeout(host_json: Path) -> float:
    """host.json's `extensions.queues.visibilityTimeout` in seconds (hh:mm:ss): how long a failed
    message waits before its retry (the drain waits as long before retrying a failed unit)."""
    raw = str(_queue_rules(host_json).get("visibilityTimeout", "00:00:00"))
    hours, minutes, seconds = (float(part) for part in raw.split(":"))
    return hours * 3600 + minutes * 60 + seconds


def _queue_rules(host_json: Path) -> dict[str, Any]:
    rules = json.loads(host_json.read_text()).get("extensions", {}).get("queues", {})
    return rules if isinstance(rules, dict) else {}


def inbox_table_name(table_name: str) -> str:
    """The inbox table beside the conversations table (at most 63 characters)."""
    return f"{table_name[:58]}inbox"


TicketKind = Literal["arrival", "wake"]


@dataclass(frozen=True, kw_only=True)
class TurnTicket:
    """A queue message: wake up the answerer of a conversation. `activity_id` names the activity
    whose arrival (or wait) queued it: a ticket whose activity is answered has nothing to do."""

    conversation_id: str
    activity_id: str
    enqueued_at: float
    kind: TicketKind = "arrival"

    def to_json(self, **extra: str) -> str:
        return json.dumps({"conversationId": self.conversation_id, "activityId": self.activity_id,
                           "enqueuedAt": self.enqueued_at, "kind": self.kind, **extra})

    @classmethod
    def from_json(cls, text: str | bytes) -> TurnTicket:
        """The ticket in a queue message, or `BadRequest` naming what is wrong."""
        try:
            data = json.loads(text)
            kind = data.get("kind", "arrival")
            if kind not in ("arrival", "wake"):
                raise ValueError(f"unknown kind {str(kind)[:20]!r}")
            return cls(conversation_id=_text(data, "conversationId"),
                       activity_id=_text(data, "activityId"),
                       enqueued_at=float(data["enqueuedAt"]), kind=kind)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BadRequest(f"not a turn ticket: {type(exc).__name__} {exc}") from None


def _text(data: dict[str, Any], name: str) -> str:
    value = data[name]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


@dataclass(frozen=True, kw_only=True)
class OrderHead:
    """A conversation's place in the inbox: its arrival counter, its hold, its parked turn."""

    conversation_id: str
    last_seq: int = 0
    done_seq: int = 0
    holder: str = ""
    held_until: float = 0.0
    streamed_at: float = 0.0
    parked: Pending | None = None
    #: The ETag of the stored head; None for a head not stored yet.
    etag: str | None = None

    def held(self, now: float) -> bool:
        """Some worker answers the conversation now (its hold has not expired)."""
        return bool(self.holder) and self.held_until > now

    @property
    def waiting(self) -> bool:
        """Accepted activities wait for an answer."""
        return self.last_seq > self.done_seq

    def idle(self, now: float) -> bool:
        """Nothing is being answered, waits, or is parked: a new message goes first."""
        return not self.held(now) and not self.waiting and self.parked is None

    @classmethod
    def read(cls, entity: dict[str, Any], *, etag: str) -> OrderHead:
        parked = entity.get("parked")
        return cls(conversation_id=str(entity.get("conversation_id", "")),
                   last_seq=int(entity.get("last_seq", 0)), done_seq=int(entity.get("done_seq", 0)),
                   holder=str(entity.get("holder", "")),
                   held_until=float(entity.get("held_until", 0.0)),
                   streamed_at=float(entity.get("streamed_at", 0.0)),
                   parked=_parked(parked) if isinstance(parked, str) and parked else None,
                   etag=etag)

    def entity(self, pk: str) -> dict[str, Any]:
        return {"PartitionKey": pk, "RowKey": ORDER_ROW, "conversation_id": self.conversation_id,
                "last_seq": self.last_seq, "done_seq": self.done_seq, "holder": self.holder,
                "held_until": float(self.held_until), "streamed_at": float(self.streamed_at),
                "parked": self.parked.to_json() if self.parked is not None else ""}


def _parked(text: str) -> Pending | None:
    """A parked record read back: a malformed one is dropped (logged), never trusted."""
    try:
        return Pending.from_json(text)
    except ValueError as exc:
        log.warning("a malformed parked record was ignored: %s", exc)
        return None


@dataclass(frozen=True, kw_only=True)
class Kept:
    """An accepted activity's row, as the drain plans with it (its body is read on its own)."""

    activity_id: str
    seq: int
    reset: bool = False
    sender: str = ""
    aad: str = ""
    stream: StreamStart | None = None
    attempts: int = 0
    not_before: float = 0.0
    accepted_at: float = 0.0
    saved: bool = False
    #: The webhook is opening this activity's stream (it went first); `stream` once it is open.
    opening: bool = False
    #: Its last attempt failed and the user was told (`mark_given_up`): only forget it now.
    given_up: bool = False
    #: Its sender's removal took its content (`withdraw`): only end its stream, then forget it.
    withdrawn: bool = False

    @classmethod
    def read(cls, row: dict[str, Any]) -> Kept:
        stream = row.get("stream")
        return cls(activity_id=str(row.get("activity_id", "")), seq=int(row["seq"]),
                   reset=bool(row.get("reset", False)), sender=str(row.get("user", "")),
                   aad=str(row.get("aad", "")), stream=_stream(stream) if stream else None,
                   attempts=int(row.get("attempts", 0)),
                   not_before=float(row.get("not_before", 0.0)),
                   accepted_at=float(row.get("accepted_at", 0.0)),
                   saved=int(row.get("saved_chunks", 0)) > 0,
                   opening=bool(row.get("opening", False)),
                   given_up=bool(row.get("given_up", False)),
                   withdrawn=bool(row.get("withdrawn", False)))


_KEPT_COLUMNS = ["RowKey", "activity_id", "seq", "reset", "user", "aad", "stream", "attempts",
                 "not_before", "accepted_at", "saved_chunks", "opening", "given_up", "withdrawn"]


@dataclass(frozen=True, kw_only=True)
class Place:
    """Where `accept` kept an activity: its arrival number, and whether it goes first (the
    conversation was idle, its last stream request a second ago or more) and so opens the
    chat's stream: decided by the same conditional write, so two arrivals never both do."""

    seq: int
    opens_stream: bool = False


def _stream(text: object) -> StreamStart | None:
    try:
        data = json.loads(str(text))
        return StreamStart(stream_id=str(data["id"]), sequence=int(data["sequence"]),
                           sent_at=float(data["sentAt"]))
    except (ValueError, TypeError, KeyError):
        return None


def _stream_text(stream: StreamStart) -> str:
    return json.dumps({"id": stream.stream_id, "sequence": stream.sequence,
                       "sentAt": stream.sent_at})


@dataclass(frozen=True, kw_only=True)
class Look:
    """What the webhook reads before it accepts: the order head, and whether the activity is kept."""

    head: OrderHead | None
    kept: bool


class Inbox:
    """The inbox table and the turn queue (and its poison queue), over one storage account."""

    def __init__(self, *, table: TableClient, queue: QueueClient,
                 poison: QueueClient | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._table = table
        self._wire = TableWire(table)
        self._queue = queue
        self._poison = poison
        self._ready = False
        self.clock = clock

    @classmethod
    def from_connection_string(cls, connection_string: str, *, table_name: str,
                               queue_name: str) -> Self:
        """`UseDevelopmentStorage=true` is Azurite (its queue service on 10001)."""
        def queue(name: str) -> QueueClient:
            return QueueClient.from_connection_string(
                connection_string, name, message_encode_policy=TextBase64EncodePolicy(),
                message_decode_policy=BinaryBase64DecodePolicy(), **_SDK_OPTIONS)

        return cls(table=TableClient.from_connection_string(
                       connection_string, table_name=inbox_table_name(table_name), **_SDK_OPTIONS),
                   queue=queue(queue_name), poison=queue(f"{queue_name}-poison"))

    @classmethod
    def from_endpoints(cls, *, table_endpoint: str, queue_endpoint: str, table_name: str,
                       queue_name: str, credential: Any) -> Self:
        """Entra ID (the app's managed identity in Azure)."""
        def queue(name: str) -> QueueClient:
            return QueueClient(queue_endpoint, name, credential=credential,
                               message_encode_policy=TextBase64EncodePolicy(),
                               message_decode_policy=BinaryBase64DecodePolicy(), **_SDK_OPTIONS)

        return cls(table=TableClient(endpoint=table_endpoint, table_name=inbox_table_name(table_name),
                                     credential=credential, **_SDK_OPTIONS),
                   queue=queue(queue_name), poison=queue(f"{queue_name}-poison"))

    @property
    def queue(self) -> QueueClient:
        """The turn queue (tests and benchmarks peek at it)."""
        return self._queue

    # -- accept ------------------------------------------------------------------------------

    async def look(self, conversation_id: str, activity_id: str) -> Look:
        """The order head and whether `activity_id` is kept already (two point reads at once)."""
        await self._prepare()
        pk = encode_key(conversation_id)
        head, row = await asyncio.gather(self._read_head(pk),
                                         self._get(pk, _row_key(activity_id), select=["seq"]))
        return Look(head=head, kept=row is not None)

    async def accept(self, body: bytes, *, conversation_id: str, activity_id: str,
                     sender: str = "", aad: str = "", reset: bool = False,
                     may_stream: bool = False, head: OrderHead | None = None) -> Place | None:
        """Keep `body` with the next place in its conversation's order: that place, or None when
        the activity was kept before (a channel's retry). `may_stream`: its channel streams, so
        if it goes first it opens the chat's stream (the head's `streamed_at` is taken with the
        place, the row marked `opening` until `keep_stream`). `head`: the head as just read (a
        retry of the write reads it again)."""
        packed = zlib.compress(body, 6)
        chunks = _chunks(packed, "b")
        if len(chunks) > MAX_CHUNKS:
            raise StorageRejected(f"the activity is too large to keep ({len(packed):,} bytes "
                                  "compressed)")
        await self._prepare()
        pk = encode_key(conversation_id)
        row: dict[str, Any] = {"PartitionKey": pk, "RowKey": _row_key(activity_id),
                               "activity_id": activity_id, "user": sender, "aad": aad,
                               "reset": reset, "accepted_at": self.clock(), "chunks": len(chunks),
                               **chunks}
        for attempt in range(HEAD_ATTEMPTS):
            if attempt:
                await _backoff(attempt)
                head = await self._read_head(pk)
            read = head or OrderHead(conversation_id=conversation_id)
            now = time.time()
            first = may_stream and read.idle(now) and now - read.streamed_at >= 1.0 + CLOCK_SLACK
            after = replace(read, last_seq=read.last_seq + 1,
                            streamed_at=now if first else read.streamed_at)
            head_op = Operation("create", after.entity(pk)) if read.etag is None else \
                Operation("replace", after.entity(pk), etag=read.etag)
            try:
                async with _translated("keeping the accepted activity"):
                    await self._wire.transact(
                        [head_op, Operation("create", {**row, "seq": after.last_seq,
                                                       "opening": first}),
                         Operation("create", {"PartitionKey": pk,
                                              "RowKey": _seen_key(activity_id)})])
            except StorageRejected as exc:
                failed = _failed_operation(exc)
                if failed in (1, 2):
                    return None  # a retry of an activity kept (1) or answered (2) before
                if failed == 0:
                    continue  # the head moved (another arrival, a hold): read it again
                raise
            return Place(seq=after.last_seq, opens_stream=first)
        raise ConversationConflict("the conversation's order kept changing while a message was kept")

    # -- the queue ---------------------------------------------------------------------------

    async def enqueue(self, ticket: TurnTicket, *, delay: float = 0.0) -> None:
        """Queue `ticket`, visible after `delay` seconds (a wake-up for later)."""
        visibility = min(MAX_DELAY_SECONDS, int(delay + 0.999)) if delay > 0 else None
        async with _translated("queueing the turn"):
            await self._queue.send_message(ticket.to_json(), visibility_timeout=visibility)

    async def poison(self, ticket: TurnTicket, *, reason: str) -> None:
        """Record a unit given up: a text-free ticket in the poison queue (an operator's trail).
        `reason` is ours (an exception's kind), never text from outside."""
        if self._poison is None:
            return
        async with _translated("recording the given-up message"):
            try:
                await self._poison.send_message(ticket.to_json(reason=reason[:200]))
            except ResourceNotFoundError:
                await self._poison.create_queue()
                await self._poison.send_message(ticket.to_json(reason=reason[:200]))

    # -- the order head ----------------------------------------------------------------------

    async def read_head(self, conversation_id: str) -> OrderHead | None:
        await self._prepare()
        return await self._read_head(encode_key(conversation_id))

    async def write_head(self, read: OrderHead, head: OrderHead) -> OrderHead | None:
        """Write `head` in place of `read` if it is unchanged (created if never stored): the head
        as written (its new ETag), or None when another writer won."""
        pk = encode_key(read.conversation_id)
        try:
            async with _translated("updating the conversation's order"):
                if read.etag is None:
                    result = await self._table.create_entity(head.entity(pk))
                else:
                    result = await self._table.update_entity(
                        head.entity(pk), mode=UpdateMode.REPLACE, etag=read.etag,
                        match_condition=MatchConditions.IfNotModified)
        except StorageRejected as exc:
            if isinstance(exc.__cause__, ResourceModifiedError | ResourceExistsError |
                          ResourceNotFoundError):
                return None
            raise
        return replace(head, etag=str(result["etag"]))

    async def change_head(self, conversation_id: str,
                          change: Callable[[OrderHead], OrderHead | None], *,
                          read: OrderHead | None = None) -> OrderHead | None:
        """The one retry loop of a head change: read the head (or start from `read`), `change`
        it (pure; None: leave it as it is), write it under the read's ETag; again after a
        jittered wait when another writer won. The head as written, or None: nothing written."""
        for attempt in range(HEAD_ATTEMPTS):
            if read is None or attempt:
                if attempt:
                    await _backoff(attempt)
                read = await self.read_head(conversation_id)
            current = read or OrderHead(conversation_id=conversation_id)
            changed = change(current)
            if changed is None:
                return None
            written = await self.write_head(current, changed)
            if written is not None:
                return written
        raise ConversationConflict("the conversation's order kept changing; the change was not made")

    # -- kept activities ---------------------------------------------------------------------

    async def waiting(self, conversation_id: str) -> list[Kept]:
        """The conversation's kept activities, in arrival order (bodies not read)."""
        await self._prepare()
        pk = encode_key(conversation_id)
        async with _translated("listing the accepted activities"):
            rows = [Kept.read(row) async for row in self._table.query_entities(
                "PartitionKey eq @pk and RowKey ge @first and RowKey lt @end",
                parameters={"pk": pk, "first": ROW_PREFIX, "end": _ROWS_END},
                select=_KEPT_COLUMNS)]
        return sorted(rows, key=lambda kept: kept.seq)

    async def load(self, conversation_id: str, activity_id: str) -> bytes | None:
        """The accepted body, or None when there is none (answered and removed, withdrawn, or
        never kept)."""
        await self._prepare()
        row = await self._get(encode_key(conversation_id), _row_key(activity_id))
        if row is None or row.get("withdrawn"):
            return None
        return zlib.decompress(_joined(row, "b", int(row["chunks"])))

    async def withdraw(self, conversation_id: str, activity_id: str, reference: bytes) -> None:
        """A user's removal: replace the kept activity with a stub that holds no text of theirs
        (nor their IDs), only its place, the stream opened for it and `reference` (what a reply
        needs), so the drain ends that stream and forgets it. Conditioned on the row's ETag (the
        webhook may be keeping the stream's start meanwhile); a row already gone is left gone."""
        pk, key = encode_key(conversation_id), _row_key(activity_id)
        for attempt in range(HEAD_ATTEMPTS):
            if attempt:
                await _backoff(attempt)
            row = await self._get(pk, key, select=["seq", "stream", "opening", "attempts"])
            if row is None:
                return
            stub = {"PartitionKey": pk, "RowKey": key, "activity_id": activity_id,
                    "seq": int(row["seq"]), "stream": str(row.get("stream") or ""),
                    "opening": bool(row.get("opening", False)),
                    "attempts": int(row.get("attempts", 0)), "withdrawn": True, "chunks": 0,
                    "reference": reference.decode()}
            try:
                async with _translated("withdrawing a kept activity"):
                    await self._table.update_entity(
                        stub, mode=UpdateMode.REPLACE, etag=row.metadata["etag"],
                        match_condition=MatchConditions.IfNotModified)
                return
            except StorageRejected as exc:
                if isinstance(exc.__cause__, ResourceNotFoundError):
                    return
                if not isinstance(exc.__cause__, ResourceModifiedError):
                    raise
        raise ConversationConflict("a kept activity kept changing while it was withdrawn")

    async def reference(self, conversation_id: str, activity_id: str) -> bytes | None:
        """A withdrawn activity's reference (`withdraw`), or None."""
        row = await self._get(encode_key(conversation_id), _row_key(activity_id),
                              select=["reference"])
        text = (row or {}).get("reference")
        return text.encode() if isinstance(text, str) and text else None

    async def mark_attempt(self, conversation_id: str, kept: Sequence[Kept], *,
                           not_before: float) -> None:
        """One more failed attempt at these activities; the next one not before `not_before`
        (all of them, or none: one transaction)."""
        await self._merge(conversation_id, [{"RowKey": _row_key(item.activity_id),
                                             "attempts": item.attempts + 1,
                                             "not_before": not_before} for item in kept],
                          "counting an attempt")

    async def mark_given_up(self, conversation_id: str, activity_ids: Sequence[str]) -> None:
        """These activities' last attempt failed and their apology went out: a drain that meets
        them again (their removal failed) forgets them without asking or apologising again. All
        of them or none (one transaction), so a unit is never met again half given up."""
        await self._merge(conversation_id, [{"RowKey": _row_key(activity_id), "given_up": True}
                                            for activity_id in dict.fromkeys(activity_ids)],
                          "recording a given-up message")

    async def _merge(self, conversation_id: str, changes: Sequence[dict[str, Any]],
                     action: str) -> None:
        """Merge `changes` into a conversation's kept rows in one entity-group transaction (a
        unit holds at most a burst's few rows, well under a transaction's 100)."""
        pk = encode_key(conversation_id)
        async with _translated(action):
            await self._table.submit_transaction(
                [("update", {"PartitionKey": pk, **change}, {"mode": UpdateMode.MERGE})
                 for change in changes])

    async def keep_stream(self, conversation_id: str, activity_id: str,
                          stream: StreamStart | None) -> None:
        """Record the stream opened for a message (by the webhook, for a message that went
        first; by a queued turn, for one that waited), so the turn resumes it, and a worker that
        takes over after a crash ends it rather than opening a second one; None: the channel
        refused it. Either way the row is no longer `opening`."""
        async with _translated("keeping the stream's start"):
            await self._table.update_entity(
                {"PartitionKey": encode_key(conversation_id), "RowKey": _row_key(activity_id),
                 "stream": _stream_text(stream) if stream is not None else "", "opening": False},
                mode=UpdateMode.MERGE)

    async def forget_stream(self, conversation_id: str, activity_id: str) -> None:
        """The message's stream was ended (a paused turn's): a resumed turn opens its own."""
        async with _translated("forgetting the stream's start"):
            await self._table.update_entity(
                {"PartitionKey": encode_key(conversation_id), "RowKey": _row_key(activity_id),
                 "stream": ""}, mode=UpdateMode.MERGE)

    async def save_turn(self, conversation_id: str, activity_id: str, state: bytes) -> None:
        """Keep a paused turn's state with its activity's row (replacing what was saved)."""
        packed = zlib.compress(state, 6)
        chunks = _chunks(packed, "s")
        if len(chunks) > MAX_SAVED_CHUNKS:
            raise StorageRejected(f"a paused turn is too large to keep ({len(packed):,} bytes "
                                  "compressed)")
        pk = encode_key(conversation_id)
        row = await self._get(pk, _row_key(activity_id), select=["saved_chunks"])
        stale = {f"s{i:02d}": b"" for i in range(len(chunks), int((row or {}).get("saved_chunks", 0)))}
        async with _translated("saving the paused turn"):
            await self._table.update_entity(
                {"PartitionKey": pk, "RowKey": _row_key(activity_id), "saved_chunks": len(chunks),
                 **chunks, **stale}, mode=UpdateMode.MERGE)

    async def load_turn(self, conversation_id: str, activity_id: str) -> bytes | None:
        """A paused turn's saved state, or None."""
        row = await self._get(encode_key(conversation_id), _row_key(activity_id))
        count = int((row or {}).get("saved_chunks", 0))
        return zlib.decompress(_joined(row, "s", count)) if row is not None and count else None

    async def remove(self, conversation_id: str, activity_ids: Sequence[str], *,
                     unseen: bool = False) -> None:
        """Forget answered activities (a missing row is not an error). `unseen`: as if never
        accepted (not queued: the channel's retry is accepted again)."""
        pk = encode_key(conversation_id)
        keys = [key for activity_id in dict.fromkeys(activity_ids) for key in (
            _row_key(activity_id), *((_seen_key(activity_id),) if unseen else ()))]
        for start in range(0, len(keys), 100):
            batch = keys[start:start + 100]
            try:
                async with _translated("removing answered activities"):
                    if len(batch) == 1:
                        await self._table.delete_entity(pk, batch[0])
                    else:
                        await self._wire.transact(
                            [Operation("delete", {"PartitionKey": pk, "RowKey": key}) for key in batch])
            except StorageRejected as exc:
                if _failed_operation(exc) is None:
                    raise
                for key in batch:  # one was gone already: the rest one by one
                    async with _translated("removing answered activities"):
                        await self._table.delete_entity(pk, key)

    async def kept_of_user(self, user_id: str) -> dict[str, list[str]]:
        """Activities of `user_id` (channel or Entra ID) kept unanswered: conversation → IDs."""
        await self._prepare()
        found: dict[str, list[str]] = {}
        async with _translated("finding a user's accepted activities"):
            async for row in self._table.query_entities(
                    "user eq @user or aad eq @user", parameters={"user": user_id},
                    select=["PartitionKey", "activity_id"]):
                head = await self._read_head(str(row["PartitionKey"]))
                if head is not None:
                    found.setdefault(head.conversation_id, []).append(str(row["activity_id"]))
        return found

    async def purge_before(self, cutoff: datetime) -> int:
        """Delete activity rows kept since before `cutoff` (leftovers); how many went. Order
        heads stay: their counters never start again."""
        await self._prepare()
        removed = 0
        async with _translated("purging old accepted activities"):
            for first, end in ((ROW_PREFIX, _ROWS_END), (SEEN_PREFIX, _SEEN_END)):
                rows = self._table.query_entities(
                    "Timestamp lt @cutoff and RowKey ge @first and RowKey lt @end",
                    parameters={"cutoff": cutoff.astimezone(UTC), "first": first, "end": end},
                    select=["PartitionKey", "RowKey"])
                async for row in rows:
                    await self._table.delete_entity(row["PartitionKey"], row["RowKey"])
                    removed += 1
        return removed

    async def close(self) -> None:
        await self._table.close()
        await self._queue.close()
        if self._poison is not None:
            await self._poison.close()

    # -- internals ---------------------------------------------------------------------------

    async def _read_head(self, pk: str) -> OrderHead | None:
        row = await self._get(pk, ORDER_ROW)
        return None if row is None else OrderHead.read(row, etag=str(row.metadata["etag"]))

    async def _get(self, pk: str, row_key: str, *, select: list[str] | None = None) -> Any:
        try:
            async with _translated("reading the inbox"):
                return await self._table.get_entity(pk, row_key, select=select)
        except StorageRejected as exc:
            if isinstance(exc.__cause__, ResourceNotFoundError):
                return None
            raise

    async def _prepare(self) -> None:
        """Create the table and queues once (they may exist, or be made by the deployment)."""
        if self._ready:
            return
        makers: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("table", self._table.create_table), ("queue", self._queue.create_queue)]
        for what, create in makers:
            try:
                async with _translated(f"creating the inbox {what}"):
                    await create()
            except StorageRejected as exc:
                if not isinstance(exc.__cause__, ResourceExistsError):
                    raise
            except StorageForbidden:  # an identity scoped to the resource may not create it
                log.info("may not create the inbox %s; using it as deployed", what)
        self._ready = True


def _row_key(activity_id: str) -> str:
    return ROW_PREFIX + encode_key(activity_id)


def _seen_key(activity_id: str) -> str:
    return SEEN_PREFIX + encode_key(activity_id)


def _chunks(packed: bytes, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}{i:02d}": packed[start:start + CHUNK_BYTES]
            for i, start in enumerate(range(0, len(packed), CHUNK_BYTES))}


def _joined(row: dict[str, Any], prefix: str, count: int) -> bytes:
    return b"".join(bytes(row[f"{prefix}{i:02d}"]) for i in range(count))


def _failed_operation(exc: StorageRejected) -> int | None:
    """Which operation of a transaction failed on a condition (a row there, or gone, or an ETag
    that no longer matches), or None for any other failure."""
    cause = exc.__cause__
    if isinstance(cause, TransactionFailed):
        if cause.error_code in ("EntityAlreadyExists", "UpdateConditionNotSatisfied",
                                "ResourceNotFound", "EntityNotFound"):
            return cause.index or 0
        return None
    if isinstance(cause, ResourceExistsError | ResourceModifiedError | ResourceNotFoundError):
        return 0
    return None


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(random.uniform(0, min(0.5, 0.02 * 2 ** attempt)))


@asynccontextmanager
async def _translated(action: str) -> AsyncIterator[None]:
    started = time.perf_counter()
    try:
        yield
    except (ServiceRequestError, ServiceResponseError, OSError) as exc:
        raise StorageUnavailable(f"storage unreachable while {action}: {exc}") from exc
    except HttpResponseError as exc:
        if exc.status_code in (401, 403):
            raise StorageForbidden(f"storage refused our credentials while {action} "
                                   f"({exc.status_code})") from exc
        if exc.status_code is None or exc.status_code >= 500 or exc.status_code in (408, 429):
            raise StorageUnavailable(f"storage failed while {action}: {exc.message}") from exc
        raise StorageRejected(f"storage refused {action}: {exc.message}") from exc
    except AzureError as exc:
        raise StorageUnavailable(f"storage failed while {action}: {exc}") from exc
    finally:
        log.debug("%s took %.1f ms", action, (time.perf_counter() - started) * 1000)
