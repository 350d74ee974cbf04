"""The Table backend's one typed client (`TableRows`), shared by its parts: the client and its
errors, point reads, the one way a head changes, reading and clearing a conversation's rows.

Azure exceptions become `shared.errors` errors here only (`_translated`). Every call goes through
`TableRows.run` (typed by `ParamSpec`): the table is made again if it vanished, the call has a
total deadline, and its duration is measured.

Every operation that changes a head other than a turn's commit (a clear, a user's removal, a
summary, the spend counters) goes through `TableRows.update_head`: read the head, a pure function of it,
a conditional write, and one bounded retry policy with jitter (`HEAD_ATTEMPTS`). Its twin for other
rows, `update_row` (the one loop both use), changes a user's or tenant's budget ledger. A clear keeps the
head as a tombstone (its `last_seq` and spend counters), so sequence numbers never repeat within
a partition and a clear only ever deletes the rows it hid.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

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
from azure.core.pipeline.transport import AioHttpTransport
from azure.data.tables import TableEntity, UpdateMode
from azure.data.tables.aio import TableClient

from ..errors import (
    ConversationConflict,
    StorageForbidden,
    StorageRejected,
    StorageUnavailable,
)
from ..messages import ChatMessage, utc_now
from ..telemetry import storage_call
from ._codec import (
    HEAD,
    MARKER_PREFIX,
    MESSAGES_END,
    Entity,
    entity_message,
    user_index_key,
)
from ._head import Head
from ._wire import Operation, TableWire, TransactionFailed

__all__ = ["CLIENT_OPTIONS", "HEAD_ATTEMPTS", "TableRows", "sdk_options", "transport"]

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")
#: A head change that keeps losing to other writers gives up after this many attempts, waiting a
#: random 0 to `min(0.5, 0.02 * 2**attempt)` s between them.
HEAD_ATTEMPTS = 8

#: Fail fast when storage is down: a channel waits about 15 s for the whole turn. The SDK's
#: timeouts are per connection and per read; `deadline` bounds one call, retries included.
CLIENT_OPTIONS: dict[str, Any] = {"retry_total": 2, "retry_backoff_factor": 0.2,
                                  "connection_timeout": 5, "read_timeout": 10, "deadline": 12}
_CREDENTIAL_SETTINGS = "CHAT_STORAGE_CONNECTION_STRING (or, with CHAT_STORAGE_TABLE_ENDPOINT, " \
    "the identity's Storage Table Data Contributor role)"


class _TableMissing(Exception):
    """The table is gone (deleted after start-up): create it again."""


@asynccontextmanager
async def _translated(action: str) -> AsyncIterator[None]:
    """Turn an azure exception raised while doing `action` into a chatstate error."""
    try:
        yield
    except TimeoutError as exc:
        raise StorageUnavailable(f"storage took over {CLIENT_OPTIONS['deadline']} s while "
                                 f"{action}") from exc
    except (ServiceRequestError, ServiceResponseError, OSError) as exc:
        raise StorageUnavailable(f"storage unreachable while {action}: {exc}") from exc
    except HttpResponseError as exc:
        if getattr(exc, "error_code", None) == "TableNotFound":
            raise _TableMissing() from exc
        if exc.status_code in (401, 403):
            raise StorageForbidden(f"storage refused our credentials while {action} "
                                   f"({exc.status_code}); check {_CREDENTIAL_SETTINGS}") from exc
        if exc.status_code is None or exc.status_code >= 500 or exc.status_code in (408, 429):
            raise StorageUnavailable(f"storage failed while {action}: {exc.message}") from exc
        raise StorageRejected(f"storage refused {action}: {exc.message}") from exc
    except AzureError as exc:
        raise StorageUnavailable(f"storage failed while {action}: {exc}") from exc



class TableRows:
    """One Azure table of conversations behind one typed client: every storage call of the
    backend's parts goes through `run` (errors translated, a deadline, the table made again if it
    vanished), and the row work they share (point reads, the head's one update path, clearing)."""

    def __init__(self, table: TableClient, *, create_table: bool = True,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.table = table
        self.wire = TableWire(table)
        self._table_ready = not create_table
        self.clock = clock

    async def close(self) -> None:
        await self.table.close()

    async def run(self, action: str, call: Callable[_P, Awaitable[_T]], *args: _P.args,
                  **kwargs: _P.kwargs) -> _T:
        """`call(*args)` with the table ready, errors translated; a vanished table is made again."""
        for _ in range(2):
            await self.ready()
            started = time.perf_counter()
            try:
                async with _translated(action), asyncio.timeout(CLIENT_OPTIONS["deadline"]):
                    return await call(*args, **kwargs)
            except _TableMissing:
                log.warning("the table %s is missing; creating it again", self.table.table_name)
                self._table_ready = False
            finally:
                storage_call(action, time.perf_counter() - started)
        raise StorageUnavailable(f"the table {self.table.table_name} keeps vanishing")

    async def ready(self) -> None:
        if self._table_ready:
            return
        async with _translated("creating the table"):
            try:
                await self.table.create_table()
            except ResourceExistsError:
                pass
            except HttpResponseError as exc:
                if exc.status_code != 403:
                    raise
                # An identity with a role on the table alone may not create tables: the
                # deployment made it (infra/), so go on; a missing table would say so next.
                log.info("may not create tables (403); using %s as it is", self.table.table_name)
        self._table_ready = True

    async def get(self, pk: str, row_key: str) -> TableEntity | None:
        """A row by its keys (a point read), or None; its ETag is in `.metadata["etag"]`."""
        try:
            return await self.table.get_entity(pk, row_key)
        except ResourceNotFoundError as exc:
            if getattr(exc, "error_code", None) == "TableNotFound":
                raise
            return None

    async def read_messages(self, pk: str) -> list[ChatMessage]:
        """Every visible message of the conversation `pk`, oldest first."""
        newest_first: list[ChatMessage] = []
        cleared: int | None = None
        async for row in self.table.query_entities(
                "PartitionKey eq @pk and RowKey ge @head and RowKey lt @end",
                parameters={"pk": pk, "head": HEAD, "end": MESSAGES_END}):
            if row["RowKey"] == HEAD:
                cleared = int(row.get("cleared_seq", 0))
                continue
            if cleared is None or row["seq"] <= cleared:
                break
            newest_first.append(entity_message(row))
        return newest_first[::-1]

    async def clear_if(self, pk: str, only_if: Callable[[Head], bool] | None = None, *,
                        forget: Iterable[str] = ()) -> _Cleared:
        """Clear the conversation if its head passes `only_if` (checked on the head that the hiding
        write is conditioned on, so a turn committed after the check makes the check run again).

        The head stays, as a tombstone: its `last_seq` (so the next turn's sequence numbers go on
        from there and a slower clear cannot take them for the ones it hid) and its spend counters.
        The user-index rows of the speakers it named and of `forget` are deleted only if no turn
        rewrote them since they were read, before the hiding write (a turn that rewrote one
        claims it in a head written after that)."""
        head = await self.read_head(pk)
        for attempt in range(HEAD_ATTEMPTS):
            if head is None or head.etag is None:
                return _Cleared(removed=0, head=None, hidden=False)
            if only_if is not None and not only_if(head):
                return _Cleared(removed=0, head=head, hidden=False)
            users = tuple(dict.fromkeys((*head.speakers, *forget)))
            etags = await self.index_etags(pk, users)
            # Written even over a tombstone: the write is what proves no turn committed (and
            # claimed a user-index row) between the read of the head and the ETags of the rows.
            hidden = await self.write_head(pk, head, head.cleared())
            if hidden is not None:
                removed = await self.delete_rows(pk, up_to_seq=head.last_seq)
                await self.delete_index_rows(pk, etags)
                return _Cleared(removed=removed, head=head, hidden=True)
            await _backoff(attempt)
            head = await self.read_head(pk)
        raise ConversationConflict("the conversation kept changing while it was cleared")

    async def read_head(self, pk: str) -> Head | None:
        entity = await self.get(pk, HEAD)
        return None if entity is None else Head.read(entity, etag=str(entity.metadata["etag"]))

    async def write_head(self, pk: str, read: Head, head: Head) -> Head | None:
        """Write `head` in place of `read` if it is unchanged (created if `read` was never
        stored); the head as written (with its new ETag), or None when another writer won."""
        etag = await self.write_row(head.entity(pk), etag=read.etag)
        return None if etag is None else replace(head, etag=etag)

    async def write_row(self, entity: Entity, *, etag: str | None) -> str | None:
        """Write `entity` in place of the row read at `etag` if it is unchanged (created when
        `etag` is None: the row was not there); its new ETag, or None when another writer won."""
        try:
            if etag is None:
                result = await self.table.create_entity(entity)
            else:
                result = await self.table.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=etag,
                    match_condition=MatchConditions.IfNotModified)
        except (ResourceModifiedError, ResourceExistsError, ResourceNotFoundError) as exc:
            if getattr(exc, "error_code", None) == "TableNotFound":
                raise
            return None
        return str(result["etag"])

    async def update_row(self, pk: str, row_key: str,
                         change: Callable[[Entity | None, str | None], Entity | None], *,
                         what: str, known: tuple[Entity, str] | None = None) -> str | None:
        """The one retry loop of a conditional row change: read the row and its ETag (None: not
        there), `change` it (a pure function; None: leave it as it is), write it under the
        read's ETag (or create it); again, after a jittered wait, when another writer won. The
        new ETag, or None when nothing was written. `known`: the row and ETag this process last
        wrote, tried first without a read (a stale one just loses the first race). The head's
        changes (`update_head`) and a budget's ledger rows (`_table_budgets.py`) both come this
        way."""
        for attempt in range(HEAD_ATTEMPTS):
            read: Entity | None
            etag: str | None
            if attempt == 0 and known is not None:
                read, etag = known
            else:
                entity = await self.get(pk, row_key)
                read, etag = (None, None) if entity is None else \
                    (entity, str(entity.metadata["etag"]))
            changed = change(read, etag)
            if changed is None:
                return None
            written = await self.write_row(changed, etag=etag)
            if written is not None:
                return written
            if attempt > 0 or known is None:
                await _backoff(attempt)
        raise ConversationConflict(f"{what} kept changing; the change was not made")

    async def update_head(self, pk: str, change: Callable[[Head], Head | None], *,
                           conversation_id: str, create: bool = False) -> Head | None:
        """A head change through `update_row`: `change` the head read (a pure function; None:
        leave it as it is). `create`: a missing head is made (else None is returned). The head
        as written, or None when nothing was written."""
        written: Head | None = None

        def changed(entity: Entity | None, etag: str | None) -> Entity | None:
            nonlocal written
            if entity is None and not create:
                return None
            read = Head(conversation_id=conversation_id, copy=()) if entity is None else \
                Head.read(entity, etag=str(etag))
            written = change(read)
            return None if written is None else written.entity(pk)

        etag = await self.update_row(pk, HEAD, changed,
                                     what=f"conversation {conversation_id[:200]!r}")
        return None if etag is None or written is None else replace(written, etag=etag)

    async def index_etags(self, pk: str, users: Iterable[str]) -> dict[str, str]:
        """The ETags of the user-index rows naming conversation `pk`, by user ID (those stored)."""
        etags: dict[str, str] = {}
        for user_id in users:
            row = await self.get(user_index_key(user_id), pk)
            if row is not None:
                etags[user_id] = str(row.metadata["etag"])
        return etags

    async def delete_index_rows(self, pk: str, etags: dict[str, str]) -> None:
        """Delete each user-index row unless a turn rewrote it since its ETag was read."""
        for user_id, etag in etags.items():
            try:
                await self.table.delete_entity(user_index_key(user_id), pk, etag=etag,
                                                match_condition=MatchConditions.IfNotModified)
            except ResourceModifiedError:
                log.info("a user-index row was rewritten by a newer turn; kept it")

    async def delete_rows(self, pk: str, *, up_to_seq: int) -> int:
        """Delete the message and marker rows up to `up_to_seq`, in transactions of 100."""
        doomed: list[str] = []
        async for row in self.table.query_entities(
                "PartitionKey eq @pk", parameters={"pk": pk}, select=["RowKey", "seq", "last_seq"]):
            key = row["RowKey"]
            if key == HEAD:
                continue
            seq = row.get("last_seq") if key.startswith(MARKER_PREFIX) else row.get("seq")
            if seq is None or int(seq) <= up_to_seq:
                doomed.append(key)
        for start in range(0, len(doomed), 100):
            keys = doomed[start:start + 100]
            try:
                await self.wire.transact(
                    [Operation("delete", {"PartitionKey": pk, "RowKey": key}) for key in keys])
            except TransactionFailed as exc:
                if exc.status_code != 404:
                    raise
                # A concurrent clear deleted some of them: delete the rest one by one.
                for key in keys:
                    await self.table.delete_entity(pk, key)
        return len(doomed)



@dataclass(frozen=True, kw_only=True)
class _Cleared:
    """What a clear did: `hidden` the history (then `head` is the head it hid)."""

    removed: int
    head: Head | None
    hidden: bool


async def _backoff(attempt: int) -> None:
    await asyncio.sleep(random.uniform(0, min(0.5, 0.02 * 2 ** attempt)))


def sdk_options() -> dict[str, Any]:
    return {name: value for name, value in CLIENT_OPTIONS.items() if name != "deadline"}


def transport(*, env_proxy: bool) -> AioHttpTransport:
    # A transport given to a client keeps its own timeouts: CLIENT_OPTIONS' would be ignored.
    return AioHttpTransport(use_env_settings=env_proxy,
                            connection_timeout=CLIENT_OPTIONS["connection_timeout"],
                            read_timeout=CLIENT_OPTIONS["read_timeout"])
