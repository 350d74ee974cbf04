"""The Table backend's plumbing, shared by its parts: the client and its errors, point reads,
reading and clearing a conversation's rows.

Azure exceptions become `shared.errors` errors here only (`_translated`). Every call goes through
`_run`: the table is made again if it vanished, the call has a total deadline, and its duration is
measured.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Self

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
from ..keys import encode_key
from ..messages import ChatMessage
from ..telemetry import storage_call
from ._base import (
    ConversationStore,
)
from ._codec import (
    HEAD,
    MARKER_PREFIX,
    MESSAGES_END,
    entity_message,
)
from ._head import Head
from ._wire import Operation, TableWire, TransactionFailed

__all__ = ["CLIENT_OPTIONS", "TableBase"]

log = logging.getLogger(__name__)

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



class TableBase(ConversationStore):
    """One Azure table of conversations: the client, and what every part of the backend reads
    and clears through it. `summaries`: the conversations keep rolling summaries."""

    def __init__(self, *, table: TableClient, create_table: bool = True,
                 summaries: bool = False) -> None:
        self._table = table
        self._wire = TableWire(table)
        self._table_ready = not create_table
        self.summaries = summaries

    @classmethod
    def from_connection_string(cls, connection_string: str, *, table_name: str,
                               env_proxy: bool = False,
                               summaries: bool = False) -> Self:
        """`env_proxy`: honour HTTP(S)_PROXY (aiohttp then looks them up on a thread per request).
        `UseDevelopmentStorage=true` is Azurite, as the SDK reads it."""
        return cls(table=TableClient.from_connection_string(
            connection_string, table_name=table_name, transport=_transport(env_proxy=env_proxy),
            **_sdk_options()), summaries=summaries)

    @classmethod
    def from_endpoint(cls, endpoint: str, *, table_name: str, credential: Any,
                      env_proxy: bool = False, summaries: bool = False) -> Self:
        return cls(table=TableClient(endpoint=endpoint, table_name=table_name, credential=credential,
                                     transport=_transport(env_proxy=env_proxy), **_sdk_options()),
                   summaries=summaries)

    async def close(self) -> None:
        await self._table.close()

    async def ping(self) -> None:
        await self._run("checking storage", self._get, "~ping", "~ping")

    async def _run(self, action: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        """`call(*args)` with the table ready, errors translated; a vanished table is made again."""
        for _ in range(2):
            await self._ready()
            started = time.perf_counter()
            try:
                async with _translated(action), asyncio.timeout(CLIENT_OPTIONS["deadline"]):
                    return await call(*args, **kwargs)
            except _TableMissing:
                log.warning("the table %s is missing; creating it again", self._table.table_name)
                self._table_ready = False
            finally:
                storage_call(action, time.perf_counter() - started)
        raise StorageUnavailable(f"the table {self._table.table_name} keeps vanishing")

    async def _ready(self) -> None:
        if self._table_ready:
            return
        async with _translated("creating the table"):
            try:
                await self._table.create_table()
            except ResourceExistsError:
                pass
            except HttpResponseError as exc:
                if exc.status_code != 403:
                    raise
                # An identity with a role on the table alone may not create tables: the
                # deployment made it (infra/), so go on; a missing table would say so next.
                log.info("may not create tables (403); using %s as it is", self._table.table_name)
        self._table_ready = True

    async def _get(self, pk: str, row_key: str) -> TableEntity | None:
        """A row by its keys (a point read), or None; its ETag is in `.metadata["etag"]`."""
        try:
            return await self._table.get_entity(pk, row_key)
        except ResourceNotFoundError as exc:
            if getattr(exc, "error_code", None) == "TableNotFound":
                raise
            return None

    # -- list, clear -------------------------------------------------------------------------

    async def _list_messages(self, conversation_id: str) -> list[ChatMessage]:
        return await self._run("listing messages", self._read_messages, encode_key(conversation_id))  # type: ignore[no-any-return]

    async def _read_messages(self, pk: str) -> list[ChatMessage]:
        newest_first: list[ChatMessage] = []
        cleared: int | None = None
        async for row in self._table.query_entities(
                "PartitionKey eq @pk and RowKey ge @head and RowKey lt @end",
                parameters={"pk": pk, "head": HEAD, "end": MESSAGES_END}):
            if row["RowKey"] == HEAD:
                cleared = int(row.get("cleared_seq", 0))
                continue
            if cleared is None or row["seq"] <= cleared:
                break
            newest_first.append(entity_message(row))
        return newest_first[::-1]

    async def _clear(self, conversation_id: str) -> int:
        return await self._run("clearing the conversation", self._clear_rows,  # type: ignore[no-any-return]
                               encode_key(conversation_id))

    async def _clear_rows(self, pk: str) -> int:
        return (await self._clear_if(pk)).removed

    async def _clear_if(self, pk: str, only_if: Callable[[Head], bool] | None = None) -> _Cleared:
        """Clear the conversation if its head passes `only_if` (checked on the head that the hiding
        write is conditioned on, so a turn committed after the check makes the check run again)."""
        head_etag, hidden = await self._hide_history(pk, only_if)
        if head_etag is None or hidden is None:
            return _Cleared(removed=0, head=hidden, hidden=False, head_deleted=False)
        removed = await self._delete_rows(pk, up_to_seq=hidden.cleared_seq)
        try:
            await self._table.delete_entity(pk, HEAD, etag=head_etag,
                                            match_condition=MatchConditions.IfNotModified)
        except ResourceModifiedError:
            log.info("the conversation got a new turn while it was cleared; kept it")
            return _Cleared(removed=removed, head=hidden, hidden=True, head_deleted=False)
        return _Cleared(removed=removed + 1, head=hidden, hidden=True, head_deleted=True)

    async def _hide_history(self, pk: str, only_if: Callable[[Head], bool] | None = None,
                            ) -> tuple[str | None, Head | None]:
        """Make every stored message invisible in one conditional write; return the new ETag and
        the head as it was read (None, head: `only_if` refused it; None, None: nothing stored)."""
        for _ in range(8):
            entity = await self._get(pk, HEAD)
            if entity is None:
                return None, None
            read = Head.read(entity, etag=str(entity.metadata["etag"]))
            if only_if is not None and not only_if(read):
                return None, read
            head = read.cleared()
            try:
                result = await self._table.update_entity(
                    head.entity(pk), mode=UpdateMode.REPLACE, etag=head.etag,
                    match_condition=MatchConditions.IfNotModified)
            except ResourceModifiedError:
                continue
            except ResourceNotFoundError:
                return None, None  # another clear removed it
            return str(result["etag"]), replace(read, cleared_seq=head.cleared_seq)
        raise ConversationConflict("the conversation kept changing while it was cleared")

    async def _delete_rows(self, pk: str, *, up_to_seq: int) -> int:
        """Delete the message and marker rows up to `up_to_seq`, in transactions of 100."""
        doomed: list[str] = []
        async for row in self._table.query_entities(
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
                await self._wire.transact(
                    [Operation("delete", {"PartitionKey": pk, "RowKey": key}) for key in keys])
            except TransactionFailed as exc:
                if exc.status_code != 404:
                    raise
                # A concurrent clear deleted some of them: delete the rest one by one.
                for key in keys:
                    await self._table.delete_entity(pk, key)
        return len(doomed)



@dataclass(frozen=True, kw_only=True)
class _Cleared:
    """What a clear did: `hidden` the history (then `head` is the head it hid), deleted the head."""

    removed: int
    head: Head | None
    hidden: bool
    head_deleted: bool


def _sdk_options() -> dict[str, Any]:
    return {name: value for name, value in CLIENT_OPTIONS.items() if name != "deadline"}


def _transport(*, env_proxy: bool) -> AioHttpTransport:
    # A transport given to a client keeps its own timeouts: CLIENT_OPTIONS' would be ignored.
    return AioHttpTransport(use_env_settings=env_proxy,
                            connection_timeout=CLIENT_OPTIONS["connection_timeout"],
                            read_timeout=CLIENT_OPTIONS["read_timeout"])
