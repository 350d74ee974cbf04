"""The Azure Table Storage backend of the conversation store (async, `azure.data.tables.aio`).

Azure exceptions (the SDK's, and those `_wire.py` raises) become `shared.errors` errors here only.
Per turn: one point read of the head, whose copy of the newest turns answers the window (when
it cannot, one range query over the message rows, in one page sized from what the conversation
needed the last time it was read so), and one entity-group transaction that commits the turn,
conditioned on the head's ETag (or on its absence for a new conversation).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

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
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from ..errors import (
    ConversationConflict,
    DuplicateActivity,
    StorageRejected,
    StorageUnavailable,
    TurnTooLarge,
)
from ..keys import encode_key
from ..messages import ChatMessage, StoredTurn, utc_now
from ..window import WindowBuilder
from ._base import ConversationStore, ConversationWindow
from ._codec import (
    CACHE,
    CACHE_FROM,
    CACHE_MAX_CHARS,
    HEAD,
    MARKER_PREFIX,
    MESSAGE_PREFIX,
    MESSAGES_END,
    Entity,
    cache_text,
    cached_rows,
    drop_text,
    entity_message,
    marker_row_key,
    message_entity,
    message_row_key,
    put_text,
)
from ._wire import ETAG, Operation, TableWire, TransactionFailed, odata_literal

__all__ = ["TableConversationStore", "azurite_connection_string"]

log = logging.getLogger(__name__)

AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
RECENT_ACTIVITIES = 32
MAX_PAGE = 1_000
_HINTS_KEPT = 4_096
#: Fail fast when storage is down: a channel waits about 15 s for the whole turn.
CLIENT_OPTIONS: dict[str, Any] = {"retry_total": 2, "retry_backoff_factor": 0.2,
                                  "connection_timeout": 5, "read_timeout": 10}
#: Where a window loaded from the rows keeps them for the commit's cache (never a property name).
_ROWS_READ = "~rows"
_ROWS_FROM = "~rows_from"  # set when those rows reach back to the first visible message
_CONDITIONAL_FAILURES = {"UpdateConditionNotSatisfied", "ConditionNotMet", "EntityAlreadyExists",
                         "ResourceNotFound", "EntityNotFound"}


def azurite_connection_string(*, host: str = "127.0.0.1", port: int = 10002) -> str:
    """The connection string of an Azurite table service (the well-known development account)."""
    return (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={AZURITE_ACCOUNT_KEY};TableEndpoint=http://{host}:{port}/devstoreaccount1;")


@asynccontextmanager
async def _translated(action: str) -> AsyncIterator[None]:
    """Turn an azure exception raised while doing `action` into a chatstate error."""
    try:
        yield
    except (ServiceRequestError, ServiceResponseError, OSError) as exc:
        raise StorageUnavailable(f"storage unreachable while {action}: {exc}") from exc
    except HttpResponseError as exc:
        if exc.status_code is None or exc.status_code >= 500 or exc.status_code in (408, 429):
            raise StorageUnavailable(f"storage failed while {action}: {exc.message}") from exc
        raise StorageRejected(f"storage refused {action}: {exc.message}") from exc
    except AzureError as exc:
        raise StorageUnavailable(f"storage failed while {action}: {exc}") from exc


class TableConversationStore(ConversationStore):
    """Conversations in one Azure table, one partition each."""

    def __init__(self, *, table: TableClient, create_table: bool = True) -> None:
        self._table = table
        self._wire = TableWire(table)
        self._table_ready = not create_table
        # Rows each conversation needed last time: the next read asks for that in one page.
        self._page_hints: OrderedDict[str, int] = OrderedDict()

    @classmethod
    def from_connection_string(cls, connection_string: str, *, table_name: str,
                               env_proxy: bool = False) -> TableConversationStore:
        """`env_proxy`: honour HTTP(S)_PROXY (aiohttp then looks them up on a thread per request)."""
        if connection_string.strip().lower().rstrip(";") == "usedevelopmentstorage=true":
            connection_string = azurite_connection_string()
        return cls(table=TableClient.from_connection_string(
            connection_string, table_name=table_name, transport=_transport(env_proxy=env_proxy),
            **CLIENT_OPTIONS))

    @classmethod
    def from_endpoint(cls, endpoint: str, *, table_name: str, credential: Any,
                      env_proxy: bool = False) -> TableConversationStore:
        return cls(table=TableClient(endpoint=endpoint, table_name=table_name, credential=credential,
                                     transport=_transport(env_proxy=env_proxy), **CLIENT_OPTIONS))

    async def close(self) -> None:
        await self._table.close()

    async def ping(self) -> None:
        await self._ready()
        async with _translated("checking storage"):
            async for _ in self._wire.query(_partition("~ping"), page_size=1):
                break

    async def _ready(self) -> None:
        if self._table_ready:
            return
        async with _translated("creating the table"):
            try:
                await self._table.create_table()
            except ResourceExistsError:
                pass
        self._table_ready = True

    # -- load --------------------------------------------------------------------------------

    def _first_page_size(self, pk: str, *, token_budget: int, max_messages: int) -> int:
        hint = self._page_hints.get(pk)
        guess = hint if hint is not None else max(16, token_budget // 100)
        return max(1, min(MAX_PAGE, max_messages + 1, guess))

    def _remember_page_size(self, pk: str, rows_needed: int) -> None:
        self._page_hints[pk] = rows_needed + max(4, rows_needed // 4)
        self._page_hints.move_to_end(pk)
        while len(self._page_hints) > _HINTS_KEPT:
            self._page_hints.popitem(last=False)

    async def _load_window(self, conversation_id: str, *, token_budget: int, max_messages: int,
                           activity_id: str | None) -> ConversationWindow:
        await self._ready()
        pk = encode_key(conversation_id)
        async with _translated("loading the conversation"):
            head = await self._wire.get(pk, HEAD)
        if head is None:
            return self._window(conversation_id, None, WindowBuilder(
                token_budget=token_budget, max_messages=max_messages), activity_id=activity_id,
                rows_read=0, round_trips=1)
        builder = WindowBuilder(token_budget=token_budget, max_messages=max_messages)
        if _fill_from_cache(builder, head):
            return self._window(conversation_id, head, builder, activity_id=activity_id,
                                rows_read=1, round_trips=1)
        return await self._load_rows(conversation_id, head, token_budget=token_budget,
                                     max_messages=max_messages, activity_id=activity_id)

    def _window(self, conversation_id: str, head: Entity | None, builder: WindowBuilder, *,
                activity_id: str | None, rows_read: int, round_trips: int) -> ConversationWindow:
        recent = json.loads(head.get("recent", "[]")) if head else []
        return ConversationWindow(
            conversation_id=conversation_id,
            messages=tuple(builder.messages),
            tokens=builder.tokens,
            version=head.get(ETAG) if head else None,
            last_seq=int(head["last_seq"]) if head else 0,
            message_count=int(head.get("message_count", 0)) if head else 0,
            rows_read=rows_read,
            round_trips=round_trips,
            committed_activity=activity_id is not None and any(
                item.get("a") == activity_id for item in recent),
            token_budget=builder.token_budget,
            max_messages=builder.max_messages,
            head=head or {},
        )

    async def _load_rows(self, conversation_id: str, head: Entity, *, token_budget: int,
                         max_messages: int, activity_id: str | None) -> ConversationWindow:
        """The window from the message rows after `head` (just read): when its copy cannot
        answer. One range query over the message rows only, newest first."""
        pk = str(head["PartitionKey"])
        builder = WindowBuilder(token_budget=token_budget, max_messages=max_messages)
        page_size = self._first_page_size(pk, token_budget=token_budget, max_messages=max_messages)
        cleared, last = int(head.get("cleared_seq", 0)), int(head["last_seq"])
        rows_read = round_trips = 1  # the head's point read
        offered: list[Entity] = []  # newest first: what the cache after this turn can start from
        async with _translated("loading the conversation"):
            async for page in self._wire.query(_messages(pk), page_size=page_size):
                round_trips += 1
                rows_read += len(page)
                if not _offer_rows(builder, page, offered, cleared=cleared, last=last):
                    break
        self._remember_page_size(pk, len(offered))  # the rows taken, and the one that ended it
        rows_from: int | None = None
        if builder.full:
            while offered and offered[-1]["role"] != "user":
                offered.pop()  # the oldest turn was cut short: the cache takes whole turns
        else:
            rows_from = cleared + 1  # read back to the first visible message
        head = {**head, _ROWS_READ: offered[::-1], _ROWS_FROM: rows_from}
        return self._window(conversation_id, head, builder, activity_id=activity_id,
                            rows_read=rows_read, round_trips=round_trips)

    # -- commit ------------------------------------------------------------------------------

    async def _commit_turn(self, window: ConversationWindow, *, activity_id: str,
                           messages: list[ChatMessage], tokens: list[int]) -> StoredTurn:
        await self._ready()
        pk = encode_key(window.conversation_id)
        first, last = window.last_seq + 1, window.last_seq + len(messages)
        rows = [message_entity(pk, first + offset, message, tokens=count, turn_seq=first,
                               activity_id=activity_id)
                for offset, (message, count) in enumerate(zip(messages, tokens, strict=True))]
        head = _next_head(pk, window, activity_id=activity_id, first=first, last=last,
                          tokens=sum(tokens))
        _keep_cache(head, window, rows)
        head_op = (Operation("create", head) if window.version is None
                   else Operation("replace", head, etag=window.version))
        marker = {"PartitionKey": pk, "RowKey": marker_row_key(activity_id),
                  "activity_id": activity_id, "first_seq": first, "last_seq": last,
                  "delivered": False, "committed_at": utc_now()}
        operations = [head_op, Operation("create", marker),
                      *(Operation("create", row) for row in rows)]
        async with _translated("committing the turn"):
            try:
                await self._wire.transact(operations)
            except TransactionFailed as exc:
                await self._raise_commit_failure(exc, window, activity_id)
        stored = tuple(entity_message(row) for row in rows)
        return StoredTurn(conversation_id=window.conversation_id, activity_id=activity_id,
                          messages=stored)

    async def _raise_commit_failure(self, exc: TransactionFailed, window: ConversationWindow,
                                    activity_id: str) -> None:
        code = exc.error_code or ""
        if exc.status_code == 413 or code == "RequestBodyTooLarge":
            raise TurnTooLarge("storage refused the turn as too large") from exc
        if code not in _CONDITIONAL_FAILURES and exc.status_code not in (404, 409, 412):
            raise exc
        # Whichever row failed (a stale head fails before the marker is reached), the activity
        # may have been committed by another instance meanwhile: then it is a duplicate.
        turn = await self._get_turn(window.conversation_id, activity_id)
        if turn is not None:
            raise DuplicateActivity(activity_id, turn) from exc
        raise ConversationConflict(
            f"conversation {window.conversation_id!r} changed since it was loaded ({code})") from exc

    # -- read a turn, mark delivered ---------------------------------------------------------

    async def _get_turn(self, conversation_id: str, activity_id: str) -> StoredTurn | None:
        await self._ready()
        pk = encode_key(conversation_id)
        async with _translated("reading a turn"):
            try:
                marker = await self._table.get_entity(pk, marker_row_key(activity_id))
            except ResourceNotFoundError:
                return None
            first, last = int(marker["first_seq"]), int(marker["last_seq"])
            rows = [entity async for page in self._wire.query(
                f"{_partition(pk)} and RowKey ge {odata_literal(message_row_key(last))}"
                f" and RowKey le {odata_literal(message_row_key(first))}") for entity in page]
        messages = tuple(entity_message(row) for row in sorted(rows, key=lambda row: row["seq"]))
        return StoredTurn(conversation_id=conversation_id, activity_id=activity_id,
                          messages=messages, delivered=bool(marker.get("delivered", False)))

    async def _mark_delivered(self, conversation_id: str, activity_id: str) -> None:
        await self._ready()
        entity = {"PartitionKey": encode_key(conversation_id),
                  "RowKey": marker_row_key(activity_id), "delivered": True}
        async with _translated("marking a reply delivered"):
            try:
                await self._wire.merge(entity)
            except ResourceNotFoundError:
                log.info("activity %s of conversation %s was cleared before delivery was recorded",
                         activity_id, conversation_id)

    # -- list, clear -------------------------------------------------------------------------

    async def _list_messages(self, conversation_id: str) -> list[ChatMessage]:
        await self._ready()
        pk = encode_key(conversation_id)
        newest_first: list[ChatMessage] = []
        async with _translated("listing messages"):
            cleared = None
            async for page in self._wire.query(_window(pk)):
                for entity in page:
                    if entity["RowKey"] == HEAD:
                        cleared = int(entity.get("cleared_seq", 0))
                        continue
                    if cleared is None or entity["seq"] <= cleared:
                        break
                    newest_first.append(entity_message(entity))
                else:
                    continue
                break
        return newest_first[::-1]

    async def _clear(self, conversation_id: str) -> int:
        await self._ready()
        pk = encode_key(conversation_id)
        async with _translated("clearing the conversation"):
            head_etag, cleared_seq = await self._hide_history(pk)
            if head_etag is None or cleared_seq is None:
                return 0  # nothing stored (or another clear got there first)
            removed = await self._delete_rows(pk, up_to_seq=cleared_seq)
            try:
                await self._table.delete_entity(pk, HEAD, etag=head_etag,
                                                match_condition=MatchConditions.IfNotModified)
                removed += 1
            except ResourceModifiedError:
                log.info("conversation %s got a new turn while it was cleared; kept it",
                         conversation_id)
        self._page_hints.pop(pk, None)
        return removed

    async def _hide_history(self, pk: str) -> tuple[str | None, int | None]:
        """Make every stored message invisible in one conditional write; return the new ETag."""
        for _ in range(8):
            try:
                head = await self._table.get_entity(pk, HEAD)
            except ResourceNotFoundError:
                return None, None
            cleared = int(head["last_seq"])
            update = {**head, "cleared_seq": cleared, "message_count": 0, "token_total": 0,
                      "recent": "[]", "updated_at": utc_now()}
            drop_text(update, CACHE)
            update.update({CACHE: "[]", CACHE_FROM: cleared + 1})
            try:
                result = await self._table.update_entity(
                    update, mode=UpdateMode.REPLACE, etag=head.metadata["etag"],
                    match_condition=MatchConditions.IfNotModified)
            except ResourceModifiedError:
                continue
            except ResourceNotFoundError:
                return None, None  # another clear removed it
            return str(result["etag"]), cleared
        raise ConversationConflict("the conversation kept changing while it was cleared")

    async def _delete_rows(self, pk: str, *, up_to_seq: int) -> int:
        """Delete the message and marker rows up to `up_to_seq`, in transactions of 100."""
        doomed: list[str] = []
        async for page in self._wire.query(_partition(pk), select=["RowKey", "seq", "last_seq"]):
            for entity in page:
                key = entity["RowKey"]
                if key == HEAD:
                    continue
                seq = entity.get("seq") if not key.startswith(MARKER_PREFIX) \
                    else entity.get("last_seq")
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


def _fill_from_cache(builder: WindowBuilder, head: Entity) -> bool:
    """Offer the head's cached messages, newest first: True if they settle the window."""
    rows = cached_rows(head)
    if rows is None:
        return False
    cleared = int(head.get("cleared_seq", 0))
    for row in reversed(rows):
        if row["seq"] <= cleared or not builder.offer(entity_message(row), row["tokens"]):
            return True
    # Every cached message fitted: the window is settled if nothing visible is older.
    return int(head[CACHE_FROM]) <= cleared + 1


def _keep_cache(head: Entity, window: ConversationWindow, rows: list[Entity]) -> None:
    """Put in `head` the cache after this turn: the newest whole turns, enough for the next load.

    Enough means the window builder stops inside it: whole turns are kept, newest first, until
    they hold more than twice the token budget (the next message may reserve less of it) or
    `max_messages` messages; and no more than CACHE_MAX_CHARS of JSON.
    """
    read: list[Entity] | None = window.head.get(_ROWS_READ)
    old = cached_rows(window.head) if window.head else []
    if read is not None:  # loaded from the rows: they are the newest whole turns
        old = read
        rows_from = window.head.get(_ROWS_FROM)
        covered_from = rows_from or (read[0]["seq"] if read else rows[0]["seq"])
    elif old is None:  # a head from before the cache: it starts with this turn
        old = []
        covered_from = rows[0]["seq"]
    else:
        covered_from = int(window.head.get(CACHE_FROM, 1))
    # Turns as the window builder sees them: a user message and all that follows it.
    turns: list[list[Entity]] = []
    for row in [*old, *rows]:
        if row["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(row)
    kept: list[list[Entity]] = []
    tokens = count = 0
    chars = 2
    for turn in reversed(turns):
        size = len(cache_text(turn))
        if kept and chars + size > CACHE_MAX_CHARS:
            break
        kept.append(turn)
        tokens += sum(int(row["tokens"]) for row in turn)
        count += len(turn)
        chars += size
        if tokens > 2 * window.token_budget or count >= window.max_messages:
            break
    cache = [row for turn in reversed(kept) for row in turn]
    if chars > CACHE_MAX_CHARS:
        cache = []  # the newest turn alone is too large to copy
    if not cache:
        head[CACHE_FROM] = rows[-1]["seq"] + 1  # covers nothing
    elif len(cache) < len(old) + len(rows):
        head[CACHE_FROM] = cache[0]["seq"]  # older turns were let go
    else:
        head[CACHE_FROM] = covered_from
    put_text(head, CACHE, cache_text(cache))


def _transport(*, env_proxy: bool) -> AioHttpTransport:
    # A transport given to a client keeps its own timeouts: CLIENT_OPTIONS' would be ignored.
    return AioHttpTransport(use_env_settings=env_proxy,
                            connection_timeout=CLIENT_OPTIONS["connection_timeout"],
                            read_timeout=CLIENT_OPTIONS["read_timeout"])


def _partition(pk: str) -> str:
    return f"PartitionKey eq {odata_literal(pk)}"


def _offer_rows(builder: WindowBuilder, page: list[Entity], offered: list[Entity], *,
                cleared: int, last: int) -> bool:
    """Offer a page of message rows (newest first) to `builder`; False once the window is settled.

    Rows past `last` belong to a turn committed after the head was read (this turn's commit will
    fail on the head's ETag and reload); rows up to `cleared` are hidden by a clear.
    """
    for entity in page:
        seq = int(entity["seq"])
        if seq > last:
            continue
        if seq <= cleared:
            return False
        offered.append(entity)
        if not builder.offer(entity_message(entity), entity["tokens"]):
            return False
    return True


def _messages(pk: str) -> str:
    """Every message row of a partition, newest first."""
    return (f"{_partition(pk)} and RowKey ge {odata_literal(MESSAGE_PREFIX)}"
            f" and RowKey lt {odata_literal(MESSAGES_END)}")


def _window(pk: str) -> str:
    """The head and every message row of a partition, newest message first."""
    return (f"{_partition(pk)} and RowKey ge {odata_literal(HEAD)}"
            f" and RowKey lt {odata_literal(MESSAGES_END)}")


def _next_head(pk: str, window: ConversationWindow, *, activity_id: str, first: int, last: int,
               tokens: int) -> Entity:
    old = window.head
    recent = json.loads(old.get("recent", "[]"))
    recent = [*recent, {"a": activity_id, "f": first, "l": last}][-RECENT_ACTIVITIES:]
    return {
        "PartitionKey": pk,
        "RowKey": HEAD,
        "conversation_id": window.conversation_id,
        "last_seq": last,
        "cleared_seq": int(old.get("cleared_seq", 0)),
        "message_count": int(old.get("message_count", 0)) + (last - first + 1),
        "token_total": int(old.get("token_total", 0)) + tokens,
        "recent": json.dumps(recent, ensure_ascii=False),
        "updated_at": utc_now(),
    }
