"""Accepted activities: kept durably until their turn is delivered, with a queue that points at them.

The webhook `accept`s a message activity with one conditional create of a row in the inbox table
(the conversations table's name + `inbox`; partition = conversation, row = activity). The body is
stored zlib-compressed in binary chunks, so a Teams activity over the queue's 64 KiB limit fits
(up to the webhook's 1 MB). A create that finds the row already there is a channel's retry of an
activity already accepted: nothing more is done. Then a small JSON `TurnTicket` goes on the queue
(`CHAT_TURN_QUEUE`, base64 text as the Functions host reads it by default). The answer function
reads the ticket, `load`s the body and `remove`s the row once the turn is delivered.

A row left behind (a ticket that went to the poison queue, a crash between delivery and removal)
does no harm: a later retry of that activity finds it committed. `purge_before` deletes rows older
than a cut-off; the retention timer calls it.

Azure exceptions are translated to the chatstate tree here, as `shared.store` does for its table.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables.aio import TableClient
from azure.storage.queue import BinaryBase64DecodePolicy, TextBase64EncodePolicy
from azure.storage.queue.aio import QueueClient

from .errors import BadRequest, StorageForbidden, StorageRejected, StorageUnavailable
from .streaming import StreamStart

__all__ = ["LEFTOVER_DAYS", "Inbox", "TurnTicket", "inbox_table_name", "max_dequeue_count"]

log = logging.getLogger(__name__)

#: A binary property holds at most 64 KiB.
CHUNK_BYTES = 60_000
MAX_CHUNKS = 16
_SDK_OPTIONS: dict[str, Any] = {"retry_total": 2, "retry_backoff_factor": 0.2,
                                "connection_timeout": 5, "read_timeout": 10}


#: Rows older than this are leftovers (the poison queue keeps a message 7 days by default).
LEFTOVER_DAYS = 7
#: The Functions host's default `maxDequeueCount`.
DEFAULT_MAX_DEQUEUE_COUNT = 5


def max_dequeue_count(host_json: Path) -> int:
    """host.json's `extensions.queues.maxDequeueCount`: the dequeue that is the turn's last."""
    queues = json.loads(host_json.read_text()).get("extensions", {}).get("queues", {})
    return int(queues.get("maxDequeueCount", DEFAULT_MAX_DEQUEUE_COUNT))


def inbox_table_name(table_name: str) -> str:
    """The inbox table beside the conversations table (at most 63 characters)."""
    return f"{table_name[:58]}inbox"


@dataclass(frozen=True, kw_only=True)
class TurnTicket:
    """The queue message: which accepted activity to answer, and the stream the webhook opened."""

    conversation_id: str
    activity_id: str
    enqueued_at: float
    stream: StreamStart | None = None

    def to_json(self) -> str:
        stream = None if self.stream is None else {
            "id": self.stream.stream_id, "sequence": self.stream.sequence,
            "sentAt": self.stream.sent_at}
        return json.dumps({"conversationId": self.conversation_id, "activityId": self.activity_id,
                           "enqueuedAt": self.enqueued_at, "stream": stream})

    @classmethod
    def from_json(cls, text: str | bytes) -> TurnTicket:
        """The ticket in a queue message, or `BadRequest` naming what is wrong."""
        try:
            data = json.loads(text)
            stream = data.get("stream")
            return cls(conversation_id=_text(data, "conversationId"),
                       activity_id=_text(data, "activityId"),
                       enqueued_at=float(data["enqueuedAt"]),
                       stream=None if stream is None else StreamStart(
                           stream_id=_text(stream, "id"), sequence=int(stream["sequence"]),
                           sent_at=float(stream["sentAt"])))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BadRequest(f"not a turn ticket: {type(exc).__name__} {exc}") from None


def _text(data: dict[str, Any], name: str) -> str:
    value = data[name]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


class Inbox:
    """The inbox table and the turn queue, over one storage account."""

    def __init__(self, *, table: TableClient, queue: QueueClient) -> None:
        self._table = table
        self._queue = queue
        self._ready = False

    @classmethod
    def from_connection_string(cls, connection_string: str, *, table_name: str,
                               queue_name: str) -> Self:
        """`UseDevelopmentStorage=true` is Azurite (its queue service on 10001)."""
        return cls(table=TableClient.from_connection_string(
                       connection_string, table_name=inbox_table_name(table_name), **_SDK_OPTIONS),
                   queue=QueueClient.from_connection_string(
                       connection_string, queue_name, message_encode_policy=TextBase64EncodePolicy(),
                       message_decode_policy=BinaryBase64DecodePolicy(), **_SDK_OPTIONS))

    @classmethod
    def from_endpoints(cls, *, table_endpoint: str, queue_endpoint: str, table_name: str,
                       queue_name: str, credential: Any) -> Self:
        """Entra ID (the app's managed identity in Azure)."""
        return cls(table=TableClient(endpoint=table_endpoint, table_name=inbox_table_name(table_name),
                                     credential=credential, **_SDK_OPTIONS),
                   queue=QueueClient(queue_endpoint, queue_name, credential=credential,
                                     message_encode_policy=TextBase64EncodePolicy(),
                                     message_decode_policy=BinaryBase64DecodePolicy(),
                                     **_SDK_OPTIONS))

    @property
    def queue(self) -> QueueClient:
        """The turn queue (tests and benchmarks peek at it)."""
        return self._queue

    async def accept(self, body: bytes, *, conversation_id: str, activity_id: str) -> bool:
        """Keep `body` until its turn is delivered; False when it was accepted before (a retry)."""
        packed = zlib.compress(body, 6)
        chunks = [packed[i:i + CHUNK_BYTES] for i in range(0, len(packed), CHUNK_BYTES)]
        if len(chunks) > MAX_CHUNKS:
            raise StorageRejected(f"the activity is too large to keep ({len(packed):,} bytes "
                                  "compressed)")
        entity: dict[str, Any] = {"PartitionKey": _key(conversation_id),
                                  "RowKey": _key(activity_id), "chunks": len(chunks),
                                  **{f"b{i:02d}": chunk for i, chunk in enumerate(chunks)}}
        await self._prepare()
        try:
            async with _translated("keeping the accepted activity"):
                await self._table.create_entity(entity)
        except StorageRejected as exc:
            if isinstance(exc.__cause__, ResourceExistsError):
                return False
            raise
        return True

    async def enqueue(self, ticket: TurnTicket) -> None:
        async with _translated("queueing the turn"):
            await self._queue.send_message(ticket.to_json())

    async def load(self, conversation_id: str, activity_id: str) -> bytes | None:
        """The accepted body, or None when there is none (answered and removed, or never kept)."""
        await self._prepare()
        try:
            async with _translated("reading the accepted activity"):
                row = await self._table.get_entity(_key(conversation_id), _key(activity_id))
        except StorageRejected as exc:
            if isinstance(exc.__cause__, ResourceNotFoundError):
                return None
            raise
        return zlib.decompress(b"".join(bytes(row[f"b{i:02d}"]) for i in range(int(row["chunks"]))))

    async def remove(self, conversation_id: str, activity_id: str) -> None:
        """Forget an answered activity (a missing row is not an error)."""
        async with _translated("removing the answered activity"):
            await self._table.delete_entity(_key(conversation_id), _key(activity_id))

    async def purge_before(self, cutoff: datetime) -> int:
        """Delete rows kept since before `cutoff` (leftovers); how many went."""
        await self._prepare()
        removed = 0
        async with _translated("purging old accepted activities"):
            rows = self._table.query_entities("Timestamp lt @cutoff",
                                              parameters={"cutoff": cutoff.astimezone(UTC)},
                                              select=["PartitionKey", "RowKey"])
            async for row in rows:
                await self._table.delete_entity(row["PartitionKey"], row["RowKey"])
                removed += 1
        return removed

    async def close(self) -> None:
        await self._table.close()
        await self._queue.close()

    async def _prepare(self) -> None:
        """Create the table and queue once (both may exist already, or be made by the deployment)."""
        if self._ready:
            return
        for what, create in (("table", self._table.create_table), ("queue", self._queue.create_queue)):
            try:
                async with _translated(f"creating the inbox {what}"):
                    await create()
            except StorageRejected as exc:
                if not isinstance(exc.__cause__, ResourceExistsError):
                    raise
            except StorageForbidden:  # an identity scoped to the resource may not create it
                log.info("may not create the inbox %s; using it as deployed", what)
        self._ready = True


def _key(value: str) -> str:
    """A table key: `/ \\ # ?` and control characters are not allowed, so percent-encode."""
    return quote(value, safe="")


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
