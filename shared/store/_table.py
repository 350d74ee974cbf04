"""The Azure Table Storage backend of the conversation store (async, `azure.data.tables.aio`).

Composed, not inherited: `_table_base.py`'s `TableRows` is the one typed client (its errors,
the head's one update path, reading and clearing rows) that the parts share: `_table_summary.py`'s
`Summaries` (rolling summaries), `_table_data.py`'s `Indexes` (indexes, retention, a user's
data) and `_table_budgets.py`'s `Ledgers` (users' and tenants' budgets); this module is the
store itself and a turn's reads and writes. Per turn: one point read of the head, whose copy of
the newest turns answers the window (when it cannot, one range query over the message rows), and
one entity-group transaction (`_wire.py`) that commits the turn, conditioned on the head's ETag
(or on its absence for a new conversation).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import datetime
from typing import Any, Self

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TableEntity, UpdateMode
from azure.data.tables.aio import TableClient

from ..errors import (
    ConversationConflict,
    DuplicateActivity,
    StorageRejected,
    TurnTooLarge,
)
from ..keys import encode_key
from ..ledger import Account, Ledger, Level
from ..limits import Spend
from ..messages import ChatMessage, Feedback, Sender, StoredTurn, utc_now
from ..window import WindowPlanner
from ._base import (
    CAPABILITIES,
    ConversationStore,
    ConversationWindow,
    Indexed,
    PurgeReport,
    UserData,
)
from ._codec import (
    HEAD,
    MARKER_PREFIX,
    MARKERS_END,
    MESSAGE_PREFIX,
    MESSAGES_END,
    Entity,
    entity_message,
    feedback_properties,
    marker_row_key,
    message_entity,
    message_row_key,
    whole_turns_newest_first,
)
from ._fold import FoldJob, summary_due
from ._head import Basis, Head
from ._table_base import CLIENT_OPTIONS, TableRows, sdk_options, transport
from ._table_budgets import Ledgers
from ._table_data import Indexes
from ._table_summary import Summaries
from ._wire import Operation, TransactionFailed

__all__ = ["CLIENT_OPTIONS", "TableConversationStore"]

log = logging.getLogger(__name__)

_CONDITIONAL_FAILURES = {"UpdateConditionNotSatisfied", "ConditionNotMet", "EntityAlreadyExists",
                         "ResourceNotFound", "EntityNotFound"}


class TableConversationStore(ConversationStore):
    """Conversations in one Azure table, one partition each: a turn's reads and writes here, the
    other capabilities in parts composed around one typed client (`TableRows`): `Summaries`
    (`_table_summary.py`), `Indexes` (`_table_data.py`: indexes, retention, a user's data).

    `summaries`: keep a rolling summary of what left the window, and a window whose start stays
    still between steps (`shared/window.py`); off, the window is the newest turns that fit.
    """

    capabilities = CAPABILITIES

    def __init__(self, *, table: TableClient, create_table: bool = True,
                 summaries: bool = False, clock: Callable[[], datetime] = utc_now) -> None:
        self._table = table
        self._rows = TableRows(table, create_table=create_table, clock=clock)
        self._summaries = Summaries(self._rows, enabled=summaries)
        self._indexes = Indexes(self._rows)
        self._ledgers = Ledgers(self._rows)
        self.summaries = summaries
        self.clock = clock

    @classmethod
    def from_connection_string(cls, connection_string: str, *, table_name: str,
                               env_proxy: bool = False,
                               summaries: bool = False) -> Self:
        """`env_proxy`: honour HTTP(S)_PROXY (aiohttp then looks them up on a thread per request).
        `UseDevelopmentStorage=true` is Azurite, as the SDK reads it."""
        return cls(table=TableClient.from_connection_string(
            connection_string, table_name=table_name, transport=transport(env_proxy=env_proxy),
            **sdk_options()), summaries=summaries)

    @classmethod
    def from_endpoint(cls, endpoint: str, *, table_name: str, credential: Any,
                      env_proxy: bool = False, summaries: bool = False) -> Self:
        return cls(table=TableClient(endpoint=endpoint, table_name=table_name, credential=credential,
                                     transport=transport(env_proxy=env_proxy), **sdk_options()),
                   summaries=summaries)

    async def close(self) -> None:
        await self._rows.close()

    async def ping(self) -> None:
        await self._rows.run("checking storage", self._rows.get, "~ping", "~ping")

    # -- the capabilities, by their parts ----------------------------------------------------

    async def write_indexes(self, window: ConversationWindow, *, today: str,
                            sender: Sender | None, shared: bool) -> Indexed | None:
        return await self._indexes.write_indexes(window, today=today, sender=sender, shared=shared)

    async def purge_idle(self, *, before: str, deadline: float,
                         clock: Callable[[], float] = time.monotonic) -> PurgeReport:
        return await self._indexes.purge_idle(before=before, deadline=deadline, clock=clock)

    async def _export_user(self, user_id: str) -> UserData:
        return await self._indexes.export_user(user_id)

    async def _forget_user(self, user_id: str, *, marker: str) -> UserData:
        return await self._indexes.forget_user(user_id, marker=marker)

    async def _update_ledger(self, account: Account, day: str,
                             change: Callable[[Ledger], Ledger | None]) -> Ledger | None:
        return await self._ledgers.update(account, day, change)

    async def _list_ledgers(self, account: Account, *, since: str) -> list[Ledger]:
        return await self._ledgers.of_account(account, since=since)

    async def list_level_ledgers(self, level: Level, *, since: str, until: str) -> list[Ledger]:
        return await self._ledgers.of_level(level, since=since, until=until)

    async def purge_ledgers(self, *, before: str) -> int:
        return await self._ledgers.purge(before=before)

    async def delete_ledgers(self, account: Account) -> int:
        return await self._ledgers.delete(account)

    async def get_summary(self, conversation_id: str) -> str | None:
        await super().get_summary(conversation_id)  # the ID's checks
        return await self._summaries.get_summary(conversation_id)

    async def get_fold(self, conversation_id: str, *, token_budget: int,
                       max_messages: int | None = None) -> FoldJob | None:
        return await self._summaries.get_fold(conversation_id, token_budget=token_budget,
                                              max_messages=max_messages)

    async def update_summary(self, job: FoldJob, summary: str) -> bool:
        return await self._summaries.update_summary(job, summary)

    # -- list, clear -------------------------------------------------------------------------

    async def _list_messages(self, conversation_id: str) -> list[ChatMessage]:
        return await self._rows.run("listing messages", self._rows.read_messages,
                                    encode_key(conversation_id))

    async def _clear(self, conversation_id: str) -> int:
        cleared = await self._rows.run("clearing the conversation", self._rows.clear_if,
                                       encode_key(conversation_id))
        return cleared.removed

    async def _touch(self, conversation_id: str) -> None:
        await self._rows.run("touching the conversation", self._rows.update_head,
                             encode_key(conversation_id), lambda head: head,
                             conversation_id=conversation_id, create=True)

    # -- load --------------------------------------------------------------------------------

    async def _load_window(self, conversation_id: str, *, token_budget: int, max_messages: int,
                           activity_id: str | None) -> ConversationWindow:
        pk = encode_key(conversation_id)
        entity = await self._rows.run("loading the conversation", self._rows.get, pk, HEAD)
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
        window: ConversationWindow = await self._rows.run(
            "loading the conversation", self._load_rows, pk, head, planner(),
            activity_id=activity_id)
        return window

    async def _load_rows(self, pk: str, head: Head, builder: WindowPlanner, *,
                         activity_id: str | None) -> ConversationWindow:
        """The window from the message rows, newest first, when the head's copy cannot answer."""
        offered: list[Entity] = []  # newest first: what the copy after this turn can start from
        rows_read = round_trips = 1  # the head's point read
        pages = self._rows.table.query_entities(
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
        if not reach_start:  # the oldest turn may be cut short: the copy takes whole turns
            offered = whole_turns_newest_first(offered)
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
                           activity_ids: tuple[str, ...], messages: list[ChatMessage],
                           tokens: list[int], spend: Spend) -> StoredTurn:
        basis = window.basis if isinstance(window.basis, Basis) else \
            Basis(head=Head(conversation_id=window.conversation_id))
        head = basis.head
        indexed = window.indexed
        if indexed is not None and (indexed.version != window.version
                                    or self._indexes.lacks(head, indexed)):
            # Written for a head this commit is not on (a lost race: a clear or a removal may
            # have deleted them since), or a write failed: what this head lacks is written now,
            # and a failure fails the commit (a stored message is always found by its sender).
            indexed = await self._indexes.write_for(
                window, replace(indexed, version=window.version, day=None, speakers=()),
                strict=True)
        pk = encode_key(window.conversation_id)
        first = head.last_seq + 1
        rows = [message_entity(pk, first + offset, message, tokens=count, turn_seq=first,
                               activity_id=activity_id)
                for offset, (message, count) in enumerate(zip(messages, tokens, strict=True))]
        after = head.after(basis, rows, activity_ids=activity_ids,
                           token_budget=basis.token_budget, max_messages=basis.max_messages)
        if indexed is not None:
            after = replace(after, day=indexed.day or after.day).with_speakers(indexed.speakers)
        after = replace(after, spend=spend)
        head_row = after.entity(pk)
        burst = json.dumps(list(activity_ids)) if len(activity_ids) > 1 else None
        markers = [{"PartitionKey": pk, "RowKey": marker_row_key(each), "activity_id": each,
                    "first_seq": first, "last_seq": after.last_seq, "delivered": False,
                    "committed_at": self.clock(), **({"burst": burst} if burst else {})}
                   for each in activity_ids]
        operations = [Operation("create", head_row) if head.etag is None
                      else Operation("replace", head_row, etag=head.etag),
                      *(Operation("create", marker) for marker in markers),
                      *(Operation("create", row) for row in rows)]
        try:
            await self._rows.run("committing the turn", self._rows.wire.transact, operations)
        except StorageRejected as exc:
            await self._raise_commit_failure(exc, window, activity_ids)
        return StoredTurn(conversation_id=window.conversation_id, activity_id=activity_id,
                          messages=tuple(entity_message(row) for row in rows),
                          activity_ids=activity_ids)

    async def _reserve_turn(self, window: ConversationWindow, spend: Spend) -> ConversationWindow:
        basis = window.basis if isinstance(window.basis, Basis) else \
            Basis(head=Head(conversation_id=window.conversation_id))
        pk = encode_key(window.conversation_id)
        new = basis.head.etag is None  # a new conversation: its head starts with an empty copy
        written = await self._rows.run("counting the turn", self._rows.write_head, pk, basis.head,
                                  replace(basis.head, spend=spend,
                                          copy=() if new else basis.head.copy))
        if written is None:
            raise ConversationConflict(
                f"conversation {window.conversation_id!r} changed since it was loaded")
        return replace(window, version=written.etag, spend=spend,
                       basis=replace(basis, head=written))

    async def _charge(self, conversation_id: str, tokens: int) -> None:
        now = self.clock()
        await self._rows.run("counting spent tokens", self._rows.update_head, encode_key(conversation_id),
                        lambda head: replace(head, spend=head.spend.after_turn(
                            now, tokens=tokens, turns=0)),
                        conversation_id=conversation_id, create=True)

    async def _raise_commit_failure(self, exc: StorageRejected, window: ConversationWindow,
                                    activity_ids: tuple[str, ...]) -> None:
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
        for activity_id in activity_ids:
            turn = await self._get_turn(window.conversation_id, activity_id)
            if turn is not None:
                raise DuplicateActivity(activity_id, turn) from cause
        raise ConversationConflict(
            f"conversation {window.conversation_id!r} changed since it was loaded ({code})") from cause

    # -- read a turn, mark delivered ---------------------------------------------------------

    async def _get_turn(self, conversation_id: str, activity_id: str) -> StoredTurn | None:
        return await self._rows.run("reading a turn", self._read_turn, conversation_id, activity_id)

    async def _read_turn(self, conversation_id: str, activity_id: str) -> StoredTurn | None:
        pk = encode_key(conversation_id)
        marker = await self._rows.get(pk, marker_row_key(activity_id))
        if marker is None:
            return None
        first, last = int(marker["first_seq"]), int(marker["last_seq"])
        rows = [row async for row in self._rows.table.query_entities(
            "PartitionKey eq @pk and RowKey ge @newest and RowKey le @oldest",
            parameters={"pk": pk, "newest": message_row_key(last), "oldest": message_row_key(first)})]
        if not rows:
            return None  # cleared: its marker is about to go too
        messages = tuple(entity_message(row) for row in sorted(rows, key=lambda row: row["seq"]))
        return StoredTurn(conversation_id=conversation_id, activity_id=activity_id,
                          messages=messages, delivered=bool(marker.get("delivered", False)),
                          activity_ids=_burst(marker, activity_id))

    async def _mark_delivered(self, conversation_id: str, activity_ids: tuple[str, ...], *,
                              reply_id: str | None) -> None:
        pk = encode_key(conversation_id)
        # The reply's ID goes on the last marker only: a rating finds the turn by it once.
        entities: list[dict[str, Any]] = [
            {"PartitionKey": pk, "RowKey": marker_row_key(activity_id), "delivered": True,
             **({"reply_id": reply_id} if reply_id is not None and last else {})}
            for last, activity_id in ((i == len(activity_ids) - 1, a)
                                      for i, a in enumerate(activity_ids))]
        try:
            if len(entities) == 1:
                await self._rows.run("marking a reply delivered", self._rows.table.update_entity,
                                     entities[0], mode=UpdateMode.MERGE)
            else:
                await self._rows.run("marking a reply delivered", self._rows.wire.transact,
                                     [Operation("merge", entity) for entity in entities])
        except StorageRejected as exc:
            cause = exc.__cause__
            if not (isinstance(cause, ResourceNotFoundError) or
                    (isinstance(cause, TransactionFailed) and cause.status_code == 404)):
                raise
            log.info("the turn was cleared before its delivery was recorded")

    async def _mark_stopped(self, conversation_id: str, activity_id: str, *, shown: str) -> None:
        await self._rows.run("marking a reply stopped", self._replace_reply, conversation_id,
                             activity_id, shown)

    async def _replace_reply(self, conversation_id: str, activity_id: str, shown: str) -> None:
        pk = encode_key(conversation_id)
        marker = await self._rows.get(pk, marker_row_key(activity_id))
        row = None if marker is None else \
            await self._rows.get(pk, message_row_key(int(marker["last_seq"])))
        if row is None:
            return
        message = replace(entity_message(row), content=shown, stopped=True)
        entity = message_entity(pk, int(row["seq"]), message, tokens=int(row["tokens"]),
                                turn_seq=int(row["turn_seq"]), activity_id=str(row["activity_id"]))
        await self._rows.table.update_entity(entity, mode=UpdateMode.REPLACE)

    async def _rate_reply(self, conversation_id: str, reply_id: str, feedback: Feedback) -> bool:
        return await self._rows.run("rating a reply", self._merge_feedback,
                                    encode_key(conversation_id), reply_id, feedback)

    async def _merge_feedback(self, pk: str, reply_id: str, feedback: Feedback) -> bool:
        """Find the turn by its reply's ID (ratings are rare: a query of the markers, no index
        written per turn) and merge the rating into the reply's message row."""
        markers = self._rows.table.query_entities(
            "PartitionKey eq @pk and RowKey ge @first and RowKey lt @end and reply_id eq @reply",
            parameters={"pk": pk, "first": MARKER_PREFIX, "end": MARKERS_END, "reply": reply_id},
            select=["last_seq"])
        async for marker in markers:
            row = {"PartitionKey": pk, "RowKey": message_row_key(int(marker["last_seq"])),
                   **feedback_properties(feedback)}
            try:
                await self._rows.table.update_entity(row, mode=UpdateMode.MERGE)
            except ResourceNotFoundError:
                return False  # cleared meanwhile
            return True
        return False


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


def _burst(marker: Entity, activity_id: str) -> tuple[str, ...]:
    """The activities a marker's turn answered (a burst's, as written; else its own)."""
    try:
        ids = json.loads(str(marker["burst"])) if marker.get("burst") else None
    except ValueError:
        ids = None
    if isinstance(ids, list) and activity_id in ids and all(isinstance(i, str) for i in ids):
        return tuple(ids)
    return (activity_id,)
