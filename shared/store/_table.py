"""The Azure Table Storage backend of the conversation store (async, `azure.data.tables.aio`).

Azure exceptions become `shared.errors` errors here only (`_translated`).
Per turn: one point read of the head, whose copy of the newest turns answers the window (when it
cannot, one range query over the message rows), and one entity-group transaction (`_wire.py`)
that commits the turn, conditioned on the head's ETag (or on its absence for a new conversation).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
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
from azure.data.tables import TableEntity, UpdateMode
from azure.data.tables.aio import TableClient

from ..errors import (
    ConversationConflict,
    DuplicateActivity,
    StorageForbidden,
    StorageRejected,
    StorageUnavailable,
    StoreError,
    TurnTooLarge,
)
from ..keys import encode_key
from ..messages import ChatMessage, Feedback, Sender, StoredTurn, utc_now
from ..telemetry import storage_call
from ..window import WindowPlanner
from ._base import (
    ConversationStore,
    ConversationWindow,
    Indexed,
    PurgeReport,
    UserConversation,
    UserData,
)
from ._codec import (
    DAY_INDEX,
    HEAD,
    MARKER_PREFIX,
    MARKERS_END,
    MESSAGE_PREFIX,
    MESSAGES_END,
    Entity,
    day_index_key,
    entity_message,
    feedback_properties,
    marker_row_key,
    message_entity,
    message_row_key,
    user_index_key,
)
from ._fold import FoldJob, fold_job, summary_due
from ._head import Basis, Head
from ._wire import Operation, TableWire, TransactionFailed

__all__ = ["CLIENT_OPTIONS", "TableConversationStore"]

log = logging.getLogger(__name__)

#: Fail fast when storage is down: a channel waits about 15 s for the whole turn. The SDK's
#: timeouts are per connection and per read; `deadline` bounds one call, retries included.
CLIENT_OPTIONS: dict[str, Any] = {"retry_total": 2, "retry_backoff_factor": 0.2,
                                  "connection_timeout": 5, "read_timeout": 10, "deadline": 12}
_CONDITIONAL_FAILURES = {"UpdateConditionNotSatisfied", "ConditionNotMet", "EntityAlreadyExists",
                         "ResourceNotFound", "EntityNotFound"}
#: A summary that fell behind is prepared from at most this many of the oldest rows at a time.
_FOLD_ROWS = 500
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


class TableConversationStore(ConversationStore):
    """Conversations in one Azure table, one partition each.

    `summaries`: keep a rolling summary of what left the window, and a window whose start stays
    still between steps (`shared/window.py`); off, the window is the newest turns that fit.
    """

    def __init__(self, *, table: TableClient, create_table: bool = True,
                 summaries: bool = False) -> None:
        self._table = table
        self._wire = TableWire(table)
        self._table_ready = not create_table
        self.summaries = summaries

    @classmethod
    def from_connection_string(cls, connection_string: str, *, table_name: str,
                               env_proxy: bool = False,
                               summaries: bool = False) -> TableConversationStore:
        """`env_proxy`: honour HTTP(S)_PROXY (aiohttp then looks them up on a thread per request).
        `UseDevelopmentStorage=true` is Azurite, as the SDK reads it."""
        return cls(table=TableClient.from_connection_string(
            connection_string, table_name=table_name, transport=_transport(env_proxy=env_proxy),
            **_sdk_options()), summaries=summaries)

    @classmethod
    def from_endpoint(cls, endpoint: str, *, table_name: str, credential: Any,
                      env_proxy: bool = False, summaries: bool = False) -> TableConversationStore:
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

    # -- load --------------------------------------------------------------------------------

    async def _load_window(self, conversation_id: str, *, token_budget: int, max_messages: int,
                           activity_id: str | None) -> ConversationWindow:
        pk = encode_key(conversation_id)
        entity = await self._run("loading the conversation", self._get, pk, HEAD)
        head = Head(conversation_id=conversation_id) if entity is None else \
            Head.read(entity, etag=str(entity.metadata["etag"]))

        def planner() -> WindowPlanner:
            return head.planner(token_budget=token_budget, max_messages=max_messages,
                                summaries=self.summaries)

        if entity is None:
            return self._window(head, planner(), activity_id=activity_id, rows_read=0,
                                round_trips=1)
        first = planner()
        if head.fill(first):
            return self._window(head, first, activity_id=activity_id, rows_read=1, round_trips=1)
        window: ConversationWindow = await self._run(
            "loading the conversation", self._load_rows, pk, head, planner(),
            activity_id=activity_id)
        return window

    async def _load_rows(self, pk: str, head: Head, builder: WindowPlanner, *,
                         activity_id: str | None) -> ConversationWindow:
        """The window from the message rows, newest first, when the head's copy cannot answer."""
        offered: list[Entity] = []  # newest first: what the copy after this turn can start from
        rows_read = round_trips = 1  # the head's point read
        pages = self._table.query_entities(
            "PartitionKey eq @pk and RowKey ge @first and RowKey lt @end",
            parameters={"pk": pk, "first": MESSAGE_PREFIX, "end": MESSAGES_END},
            results_per_page=min(1_000, builder.max_messages + 1)).by_page()
        async for page in pages:
            round_trips += 1
            if not await _offer_page(page, head, builder, offered):
                break
        # Every visible row was offered unless the planner settled before the oldest one.
        reach_start = not builder.settled or (
            bool(offered) and offered[-1]["seq"] <= head.cleared_seq + 1)
        builder.reached(head.cleared_seq + 1 if reach_start else head.last_seq + 1)
        rows_read += len(offered)
        if not reach_start:
            while offered and offered[-1]["role"] != "user":
                offered.pop()  # the oldest turn was cut short: the copy takes whole turns
        return self._window(head, builder, activity_id=activity_id, rows_read=rows_read,
                            round_trips=round_trips, rows=tuple(reversed(offered)),
                            rows_reach_start=reach_start)

    def _window(self, head: Head, planner: WindowPlanner, *, activity_id: str | None,
                rows_read: int, round_trips: int, rows: tuple[Entity, ...] | None = None,
                rows_reach_start: bool = False) -> ConversationWindow:
        plan = planner.plan()
        summaries = self.summaries
        basis = Basis(head=head, rows=rows, rows_reach_start=rows_reach_start,
                      token_budget=planner.token_budget, max_messages=planner.max_messages,
                      summaries=summaries, step=plan.step, first_seq=plan.first_seq)
        if plan.behind:
            log.warning("the summary is behind the window: messages %d to %d are in neither "
                        "(until a summary catches up)", head.window_start,
                        (plan.first_seq or head.last_seq + 1) - 1)
        return ConversationWindow(
            conversation_id=head.conversation_id,
            messages=tuple(plan.messages),
            tokens=plan.tokens,
            version=head.etag,
            last_seq=head.last_seq,
            rows_read=rows_read,
            round_trips=round_trips,
            committed_activity=head.committed(activity_id),
            summary=(head.pending if plan.step else head.summary) if summaries else None,
            summary_due=summaries and summary_due(plan, head, token_budget=planner.token_budget,
                                                  max_messages=planner.max_messages),
            spend=head.spend,
            basis=basis,
        )

    # -- commit ------------------------------------------------------------------------------

    async def _commit_turn(self, window: ConversationWindow, *, activity_id: str,
                           messages: list[ChatMessage], tokens: list[int]) -> StoredTurn:
        basis = window.basis if isinstance(window.basis, Basis) else \
            Basis(head=Head(conversation_id=window.conversation_id))
        head = basis.head
        pk = encode_key(window.conversation_id)
        first = head.last_seq + 1
        rows = [message_entity(pk, first + offset, message, tokens=count, turn_seq=first,
                               activity_id=activity_id)
                for offset, (message, count) in enumerate(zip(messages, tokens, strict=True))]
        after = head.after(basis, rows, activity_id=activity_id, token_budget=basis.token_budget,
                           max_messages=basis.max_messages)
        if (indexed := window.indexed) is not None:
            after = replace(after, day=indexed.day or after.day).with_speakers(indexed.speakers)
        spent = sum(m.usage.total_tokens for m in messages if m.usage is not None)
        after = replace(after, spend=head.spend.after_turn(utc_now(), tokens=spent))
        head_row = after.entity(pk)
        marker = {"PartitionKey": pk, "RowKey": marker_row_key(activity_id),
                  "activity_id": activity_id, "first_seq": first, "last_seq": after.last_seq,
                  "delivered": False, "committed_at": utc_now()}
        operations = [Operation("create", head_row) if head.etag is None
                      else Operation("replace", head_row, etag=head.etag),
                      Operation("create", marker), *(Operation("create", row) for row in rows)]
        try:
            await self._run("committing the turn", self._wire.transact, operations)
        except StorageRejected as exc:
            await self._raise_commit_failure(exc, window, activity_id)
        return StoredTurn(conversation_id=window.conversation_id, activity_id=activity_id,
                          messages=tuple(entity_message(row) for row in rows))

    async def _raise_commit_failure(self, exc: StorageRejected, window: ConversationWindow,
                                    activity_id: str) -> None:
        cause = exc.__cause__
        if not isinstance(cause, TransactionFailed):
            raise exc
        code = cause.error_code or ""
        if cause.status_code == 413 or code == "RequestBodyTooLarge":
            raise TurnTooLarge("storage refused the turn as too large") from cause
        if code not in _CONDITIONAL_FAILURES and cause.status_code not in (404, 409, 412):
            raise exc
        # Whichever row failed (a stale head fails before the marker is reached), the activity
        # may have been committed by another instance meanwhile: then it is a duplicate.
        turn = await self._get_turn(window.conversation_id, activity_id)
        if turn is not None:
            raise DuplicateActivity(activity_id, turn) from cause
        raise ConversationConflict(
            f"conversation {window.conversation_id!r} changed since it was loaded ({code})") from cause

    # -- read a turn, mark delivered ---------------------------------------------------------

    async def _get_turn(self, conversation_id: str, activity_id: str) -> StoredTurn | None:
        return await self._run("reading a turn", self._read_turn, conversation_id, activity_id)  # type: ignore[no-any-return]

    async def _read_turn(self, conversation_id: str, activity_id: str) -> StoredTurn | None:
        pk = encode_key(conversation_id)
        marker = await self._get(pk, marker_row_key(activity_id))
        if marker is None:
            return None
        first, last = int(marker["first_seq"]), int(marker["last_seq"])
        rows = [row async for row in self._table.query_entities(
            "PartitionKey eq @pk and RowKey ge @newest and RowKey le @oldest",
            parameters={"pk": pk, "newest": message_row_key(last), "oldest": message_row_key(first)})]
        messages = tuple(entity_message(row) for row in sorted(rows, key=lambda row: row["seq"]))
        return StoredTurn(conversation_id=conversation_id, activity_id=activity_id,
                          messages=messages, delivered=bool(marker.get("delivered", False)))

    async def _mark_delivered(self, conversation_id: str, activity_id: str, *,
                              reply_id: str | None) -> None:
        entity: dict[str, Any] = {"PartitionKey": encode_key(conversation_id),
                                  "RowKey": marker_row_key(activity_id), "delivered": True}
        if reply_id is not None:
            entity["reply_id"] = reply_id
        try:
            await self._run("marking a reply delivered", self._table.update_entity, entity,
                            mode=UpdateMode.MERGE)
        except StorageRejected as exc:
            if not isinstance(exc.__cause__, ResourceNotFoundError):
                raise
            log.info("the turn was cleared before its delivery was recorded")

    async def _rate_reply(self, conversation_id: str, reply_id: str, feedback: Feedback) -> bool:
        return await self._run("rating a reply", self._merge_feedback,  # type: ignore[no-any-return]
                               encode_key(conversation_id), reply_id, feedback)

    async def _merge_feedback(self, pk: str, reply_id: str, feedback: Feedback) -> bool:
        """Find the turn by its reply's ID (ratings are rare: a query of the markers, no index
        written per turn) and merge the rating into the reply's message row."""
        markers = self._table.query_entities(
            "PartitionKey eq @pk and RowKey ge @first and RowKey lt @end and reply_id eq @reply",
            parameters={"pk": pk, "first": MARKER_PREFIX, "end": MARKERS_END, "reply": reply_id},
            select=["last_seq"])
        async for marker in markers:
            row = {"PartitionKey": pk, "RowKey": message_row_key(int(marker["last_seq"])),
                   **feedback_properties(feedback)}
            try:
                await self._table.update_entity(row, mode=UpdateMode.MERGE)
            except ResourceNotFoundError:
                return False  # cleared meanwhile
            return True
        return False

    # -- the rolling summary -----------------------------------------------------------------

    async def get_summary(self, conversation_id: str) -> str | None:
        await super().get_summary(conversation_id)
        entity = await self._run("reading the summary", self._get, encode_key(conversation_id), HEAD)
        return None if entity is None else Head.read(entity, etag="").summary

    async def get_fold(self, conversation_id: str, *, token_budget: int,
                       max_messages: int | None = None) -> FoldJob | None:
        if not self.summaries:
            return None
        pk = encode_key(conversation_id)
        entity = await self._run("reading the conversation for a summary", self._get, pk, HEAD)
        if entity is None:
            return None
        head = Head.read(entity, etag=str(entity.metadata["etag"]))
        start = head.window_start
        if head.ready_step() is not None or start > head.last_seq:
            return None  # prepared already, or nothing after the start
        if head.copy is not None and head.copy_from <= start:
            rows = [row for row in head.copy if row["seq"] >= start]
            return fold_job(head, rows, token_budget=token_budget, reach_newest=True,
                            max_messages=max_messages)
        # The copy does not reach back to the start (the summary fell behind): read the oldest
        # rows from the start, at most _FOLD_ROWS of them.
        last = min(head.last_seq, start + _FOLD_ROWS - 1)
        rows = await self._run("reading messages for a summary", self._read_range, pk, start, last)
        return fold_job(head, rows, token_budget=token_budget, reach_newest=last == head.last_seq,
                        max_messages=max_messages)

    async def _read_range(self, pk: str, first: int, last: int) -> list[Entity]:
        rows = [dict(row) async for row in self._table.query_entities(
            "PartitionKey eq @pk and RowKey ge @newest and RowKey le @oldest",
            parameters={"pk": pk, "newest": message_row_key(last), "oldest": message_row_key(first)})]
        return sorted(rows, key=lambda row: int(row["seq"]))

    async def update_summary(self, job: FoldJob, summary: str) -> bool:
        pk = encode_key(job.conversation_id)
        head: Head | None = job.head
        for _ in range(3):  # a turn committed meanwhile: the job may still hold for its head
            if head is None or head.epoch != job.head.epoch or head.window_start != job.start \
                    or head.ready_step() is not None or head.cleared_seq != job.head.cleared_seq:
                return False
            pending = head.with_pending(summary, start=job.start, to=job.to)
            try:
                await self._run("storing a summary", self._table.update_entity, pending.entity(pk),
                                mode=UpdateMode.REPLACE, etag=head.etag,
                                match_condition=MatchConditions.IfNotModified)
                return True
            except StorageRejected as exc:
                if not isinstance(exc.__cause__, ResourceModifiedError | ResourceNotFoundError):
                    raise
            entity = await self._run("reading the conversation for a summary", self._get, pk, HEAD)
            head = None if entity is None else Head.read(entity, etag=str(entity.metadata["etag"]))
        return False

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


    # -- indexes: by day of last activity (retention), by user (data requests) ---------------

    async def write_indexes(self, window: ConversationWindow, *, today: str,
                            sender: Sender | None, shared: bool) -> Indexed | None:
        head = window.basis.head if isinstance(window.basis, Basis) else \
            Head(conversation_id=window.conversation_id)
        pk = encode_key(window.conversation_id)
        rows: list[tuple[str | None, Entity]] = []
        if head.day != today:
            rows.append((None, {"PartitionKey": day_index_key(today), "RowKey": pk,
                                "conversation_id": window.conversation_id}))
        ids = sender.ids if sender is not None else ()
        rows += [(user_id, {"PartitionKey": user_index_key(user_id), "RowKey": pk,
                            "conversation_id": window.conversation_id, "shared": shared,
                            "user_ids": json.dumps(list(ids))})
                 for user_id in ids if user_id not in head.speakers]
        if not rows:
            return None
        results = await asyncio.gather(*(
            self._run("writing an index row", self._table.upsert_entity, row,
                      mode=UpdateMode.REPLACE) for _, row in rows), return_exceptions=True)
        day: str | None = None
        speakers: list[str] = []
        for (user_id, row), result in zip(rows, results, strict=True):
            if isinstance(result, StoreError):
                log.warning("index_write_failed partition=%r: %s; a later turn writes it",
                            row["PartitionKey"][:100], result)
            elif isinstance(result, BaseException):
                raise result
            elif user_id is None:
                day = today
            else:
                speakers.append(user_id)
        return Indexed(day=day, speakers=tuple(speakers))

    async def purge_idle(self, *, before: str, deadline: float,
                         clock: Callable[[], float] = time.monotonic) -> PurgeReport:
        """Walk the day-index partitions before `before`, oldest first (one range query over the
        index partitions, never a message row), and clear each conversation still idle."""
        purged = kept = 0
        await self._ready()
        async with _translated("listing idle conversations"):
            rows = self._table.query_entities(
                "PartitionKey ge @first and PartitionKey lt @end",
                parameters={"first": DAY_INDEX, "end": day_index_key(before)},
                select=["PartitionKey", "RowKey"])
            async for row in rows:
                if clock() >= deadline:
                    return PurgeReport(purged=purged, kept=kept, finished=False)
                if await self._run("purging an idle conversation", self._expire,
                                   row["PartitionKey"], row["RowKey"], before):
                    purged += 1
                else:
                    kept += 1
        return PurgeReport(purged=purged, kept=kept, finished=True)

    async def _expire(self, index_pk: str, pk: str, before: str) -> bool:
        """Clear the conversation `pk` if its head says it is still idle, then drop the index row."""
        cleared = await self._clear_if(pk, lambda head: bool(head.day) and head.day < before)
        if cleared.hidden and cleared.head is not None:
            log.info("retention: purged conversation=%r (last active %s, %d rows)",
                     cleared.head.conversation_id[:200], cleared.head.day, cleared.removed)
            if cleared.head_deleted:
                for user_id in cleared.head.speakers:
                    await self._table.delete_entity(user_index_key(user_id), pk)
        # Kept (a newer turn): its head's day has its own index row, written before that commit.
        await self._table.delete_entity(index_pk, pk)
        return cleared.hidden

    async def _export_user(self, user_id: str) -> UserData:
        entries = await self._run("reading the user index", self._user_entries, user_id)
        found: list[UserConversation] = []
        for entry in entries:
            messages = await self._run("exporting a user's messages", self._read_messages,
                                       entry["RowKey"])
            mine = users_messages(str(entry["conversation_id"]), messages, user_id,
                                  shared=bool(entry.get("shared")))
            if mine is not None:
                found.append(mine)
        return UserData(user_id=user_id, conversations=tuple(found))

    async def _forget_user(self, user_id: str, *, marker: str) -> UserData:
        data = await self._export_user(user_id)
        for entry in await self._run("reading the user index", self._user_entries, user_id):
            pk = str(entry["RowKey"])
            ids = {user_id, *json.loads(entry.get("user_ids", "[]"))}
            if entry.get("shared"):
                await self._run("removing a user's messages", self._redact, pk, ids, marker)
            else:
                await self._run("clearing a user's conversation", self._clear_if, pk)
            for known in ids:
                await self._run("updating the user index", self._table.delete_entity,
                                user_index_key(known), pk)
        return data

    async def _user_entries(self, user_id: str) -> list[Entity]:
        return [dict(row) async for row in self._table.query_entities(
            "PartitionKey eq @pk", parameters={"pk": user_index_key(user_id)})]

    async def _redact(self, pk: str, ids: set[str], marker: str) -> int:
        """Replace the user's messages, and the replies to them, by `marker` in place (role, order,
        turn kept), then rewrite the head without its copy of the newest turns and without a
        summary that may quote them."""
        rows = [row async for row in self._table.query_entities(
            "PartitionKey eq @pk and RowKey ge @first and RowKey lt @end",
            parameters={"pk": pk, "first": MESSAGE_PREFIX, "end": MESSAGES_END})]
        theirs = {row["turn_seq"] for row in rows
                  if row["role"] == "user" and {row.get("from_id"), row.get("from_aad")} & ids}
        replaced = 0
        for row in rows:
            if row.get("turn_seq") not in theirs or row.get("redacted"):
                continue
            if row["role"] == "user":
                kept = {name: row[name] for name in _REDACTED_KEEPS if name in row}
            elif row["role"] == "assistant" and "tool_calls" not in row:
                kept = {name: value for name, value in row.items()
                        if not name.startswith(("content", "feedback_text"))}
            else:
                continue  # tool calls and results: the bot's working, kept (docs/operate.md)
            await self._table.update_entity({**kept, "content": marker, "redacted": True},
                                            mode=UpdateMode.REPLACE)
            replaced += 1
        for _ in range(8):
            entity = await self._get(pk, HEAD)
            if entity is None:
                return replaced
            head = Head.read(entity, etag=str(entity.metadata["etag"]))
            rewritten = replace(
                head, copy=None, summary=None, pending=None, pending_from=0, pending_to=0,
                start=head.cleared_seq + 1 if head.start else 0,
                speakers=tuple(known for known in head.speakers if known not in ids))
            try:
                await self._table.update_entity(rewritten.entity(pk), mode=UpdateMode.REPLACE,
                                                etag=head.etag,
                                                match_condition=MatchConditions.IfNotModified)
                return replaced
            except ResourceModifiedError:
                continue  # a turn committed (its copy may hold the old text): again
            except ResourceNotFoundError:
                return replaced
        raise ConversationConflict("the conversation kept changing while a user's messages "
                                   "were removed")


#: What a redacted user message row keeps: its place in the conversation, nothing they wrote, not
#: who they were.
_REDACTED_KEEPS = ("PartitionKey", "RowKey", "seq", "turn_seq", "role", "tokens", "activity_id",
                   "timestamp")


def users_messages(conversation_id: str, messages: list[ChatMessage], user_id: str, *,
                   shared: bool) -> UserConversation | None:
    """The turns `user_id` began (every turn of a personal conversation): the messages they sent
    and the replies they received (assistant messages with text; tool calls and results are the
    bot's working, not a message to them)."""
    sent: list[ChatMessage] = []
    received: list[ChatMessage] = []
    ordered: list[ChatMessage] = []
    theirs = False
    for message in messages:
        if message.role == "user":
            theirs = not shared or (message.sender is not None and user_id in message.sender.ids)
            if theirs:
                sent.append(message)
                ordered.append(message)
        elif theirs and message.role == "assistant" and message.content and not message.tool_calls:
            received.append(message)
            ordered.append(message)
    if not ordered:
        return None
    return UserConversation(conversation_id=conversation_id, shared=shared, sent=tuple(sent),
                            received=tuple(received), messages=tuple(ordered))


@dataclass(frozen=True, kw_only=True)
class _Cleared:
    """What a clear did: `hidden` the history (then `head` is the head it hid), deleted the head."""

    removed: int
    head: Head | None
    hidden: bool
    head_deleted: bool


async def _offer_page(page: AsyncIterator[TableEntity], head: Head, builder: WindowPlanner,
                      offered: list[Entity]) -> bool:
    """Offer a page of message rows (newest first); False once the window is settled.

    Rows past the head's `last_seq` belong to a turn committed after the head was read (this
    turn's commit will fail on the head's ETag and reload); rows up to `cleared_seq` are hidden
    by a clear.
    """
    async for row in page:
        seq = int(row["seq"])
        if seq > head.last_seq:
            continue
        if seq <= head.cleared_seq:
            return False
        offered.append(dict(row))
        if not builder.offer(seq, entity_message(row), row["tokens"]):
            return False
    return True


def _sdk_options() -> dict[str, Any]:
    return {name: value for name, value in CLIENT_OPTIONS.items() if name != "deadline"}


def _transport(*, env_proxy: bool) -> AioHttpTransport:
    # A transport given to a client keeps its own timeouts: CLIENT_OPTIONS' would be ignored.
    return AioHttpTransport(use_env_settings=env_proxy,
                            connection_timeout=CLIENT_OPTIONS["connection_timeout"],
                            read_timeout=CLIENT_OPTIONS["read_timeout"])
