"""The Table backend's indexes (by day of last activity, by user), the retention purge, and a
user's data exported and removed."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import UpdateMode

from ..errors import ConversationConflict, StoreError
from ..keys import encode_key
from ..messages import ChatMessage, Sender
from ._base import (
    ConversationWindow,
    Indexed,
    PurgeReport,
    UserConversation,
    UserData,
)
from ._codec import (
    DAY_INDEX,
    MESSAGE_PREFIX,
    MESSAGES_END,
    Entity,
    day_index_key,
    get_text,
    put_text,
    user_index_key,
)
from ._head import Basis, Head
from ._table_base import HEAD_ATTEMPTS, TableRows, _backoff, _translated

__all__ = ["Indexes", "users_messages"]

log = logging.getLogger(__name__)


class Indexes:
    """Index rows in their own partitions (`~idx-day-…`, `~idx-user-…`) and what reads them: the
    retention purge, a user's export and removal."""

    def __init__(self, rows: TableRows) -> None:
        self._rows = rows

    async def write_indexes(self, window: ConversationWindow, *, today: str,
                            sender: Sender | None, shared: bool) -> Indexed | None:
        return await self.write_for(window, Indexed(version=window.version, today=today,
                                                         sender=sender, shared=shared))

    async def write_for(self, window: ConversationWindow, request: Indexed, *,
                             strict: bool = False) -> Indexed:
        """The index rows `window`'s head lacks for `request`; `strict`: a failed write raises
        (the commit that needs them fails, nothing stored), else it is left for the commit."""
        head = window.basis.head if isinstance(window.basis, Basis) else \
            Head(conversation_id=window.conversation_id)
        pk = encode_key(window.conversation_id)
        today, shared = request.today, request.shared
        rows: list[tuple[str | None, Entity]] = []
        if head.day != today:
            rows.append((None, {"PartitionKey": day_index_key(today), "RowKey": pk,
                                "conversation_id": window.conversation_id}))
        ids = request.sender.ids if request.sender is not None else ()
        rows += [(user_id, {"PartitionKey": user_index_key(user_id), "RowKey": pk,
                            "conversation_id": window.conversation_id, "shared": shared,
                            "user_ids": json.dumps(list(ids))})
                 for user_id in ids if user_id not in head.speakers]
        if not rows:
            return request
        results = await asyncio.gather(*(
            self._rows.run("writing an index row", self._rows.table.upsert_entity, row,
                      mode=UpdateMode.REPLACE) for _, row in rows), return_exceptions=True)
        day: str | None = None
        speakers: list[str] = []
        for (user_id, row), result in zip(rows, results, strict=True):
            if isinstance(result, StoreError) and not strict:
                log.warning("index_write_failed partition=%r: %s; the commit writes it",
                            row["PartitionKey"][:100], result)
            elif isinstance(result, BaseException):
                raise result
            elif user_id is None:
                day = today
            else:
                speakers.append(user_id)
        return replace(request, day=day, speakers=tuple(speakers))

    def lacks(self, head: Head, indexed: Indexed) -> bool:
        """Whether the commit of `head` + `indexed` would leave a speaker or the day unindexed."""
        ids = indexed.sender.ids if indexed.sender is not None else ()
        return (head.day != indexed.today and indexed.day is None) or any(
            user_id not in head.speakers and user_id not in indexed.speakers for user_id in ids)

    async def purge_idle(self, *, before: str, deadline: float,
                         clock: Callable[[], float] = time.monotonic) -> PurgeReport:
        """Walk the day-index partitions before `before`, oldest first (one range query over the
        index partitions, never a message row), and clear each conversation still idle."""
        purged = kept = 0
        await self._rows.ready()
        async with _translated("listing idle conversations"):
            rows = self._rows.table.query_entities(
                "PartitionKey ge @first and PartitionKey lt @end",
                parameters={"first": DAY_INDEX, "end": day_index_key(before)},
                select=["PartitionKey", "RowKey"])
            async for row in rows:
                if clock() >= deadline:
                    return PurgeReport(purged=purged, kept=kept, finished=False)
                if await self._rows.run("purging an idle conversation", self._expire,
                                   row["PartitionKey"], row["RowKey"], before):
                    purged += 1
                else:
                    kept += 1
        return PurgeReport(purged=purged, kept=kept, finished=True)

    async def _expire(self, index_pk: str, pk: str, before: str) -> bool:
        """Clear the conversation `pk` if its head says it is still idle, then drop the index row."""
        cleared = await self._rows.clear_if(pk, lambda head: bool(head.day) and head.day < before)
        if cleared.hidden and cleared.head is not None:
            log.info("retention: purged conversation=%r (last active %s, %d rows)",
                     cleared.head.conversation_id[:200], cleared.head.day, cleared.removed)
        # Kept (a newer turn): its head's day has its own index row, written before that commit.
        await self._rows.table.delete_entity(index_pk, pk)
        return cleared.hidden

    async def export_user(self, user_id: str) -> UserData:
        entries = await self._rows.run("reading the user index", self._user_entries, user_id)
        found: list[UserConversation] = []
        for entry in entries:
            messages = await self._rows.run("exporting a user's messages", self._rows.read_messages,
                                       entry["RowKey"])
            mine = users_messages(str(entry["conversation_id"]), messages, user_id,
                                  shared=bool(entry.get("shared")))
            if mine is not None:
                found.append(mine)
        return UserData(user_id=user_id, conversations=tuple(found))

    async def forget_user(self, user_id: str, *, marker: str) -> UserData:
        data = await self.export_user(user_id)
        for entry in await self._rows.run("reading the user index", self._user_entries, user_id):
            pk = str(entry["RowKey"])
            ids = {user_id, *json.loads(entry.get("user_ids", "[]"))}
            if entry.get("shared"):
                await self._rows.run("removing a user's messages", self._redact, pk, ids, marker)
            else:
                await self._rows.run("clearing a user's conversation", self._rows.clear_if, pk, forget=ids)
        return data

    async def _user_entries(self, user_id: str) -> list[Entity]:
        return [dict(row) async for row in self._rows.table.query_entities(
            "PartitionKey eq @pk", parameters={"pk": user_index_key(user_id)})]

    async def _redact(self, pk: str, ids: set[str], marker: str) -> int:
        """Replace the user's messages, and the replies to them, by `marker` in place (role, order,
        turn kept), then rewrite the head without its copy of the newest turns, without a summary
        that may quote them and without naming them as speakers, conditioned on the head read
        before the rows: a turn committed meanwhile fails that write, and its rows are read and
        replaced too before the head is written again. Their user-index rows go last, unless a
        turn rewrote them since they were read."""
        replaced = 0
        for attempt in range(HEAD_ATTEMPTS):
            head = await self._rows.read_head(pk)
            if head is None:
                return replaced
            etags = await self._rows.index_etags(pk, ids)
            replaced += await self._redact_rows(pk, ids, marker)
            rewritten = replace(
                head, copy=None, summary=None, pending=None, pending_from=0, pending_to=0,
                start=head.cleared_seq + 1 if head.start else 0,
                speakers=tuple(known for known in head.speakers if known not in ids))
            if await self._rows.write_head(pk, head, rewritten) is not None:
                await self._rows.delete_index_rows(pk, etags)
                return replaced
            await _backoff(attempt)  # a turn committed (its rows, its copy): again
        raise ConversationConflict("the conversation kept changing while a user's messages "
                                   "were removed")

    async def _redact_rows(self, pk: str, ids: set[str], marker: str) -> int:
        rows = [row async for row in self._rows.table.query_entities(
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
            elif row["role"] == "tool" and "decision" in row:
                # A call held back for a person: its result stays (the bot's working), who
                # answered goes; what was decided, and when, stay (docs/operate.md).
                try:
                    await self._rows.table.update_entity(_without_approver(row),
                                                         mode=UpdateMode.REPLACE)
                except ResourceNotFoundError:
                    continue
                replaced += 1
                continue
            else:
                continue  # tool calls and results: the bot's working, kept (docs/operate.md)
            try:
                await self._rows.table.update_entity({**kept, "content": marker, "redacted": True},
                                                mode=UpdateMode.REPLACE)
            except ResourceNotFoundError:
                continue  # cleared meanwhile
            replaced += 1
        return replaced


def _without_approver(row: Entity) -> Entity:
    """A tool result row whose decision no longer names who answered."""
    decision = json.loads(get_text(row, "decision") or "{}")
    kept = {name: value for name, value in row.items() if not name.startswith("decision")}
    put_text(kept, "decision", json.dumps({**decision, "by": None, "byId": None}))
    return {**kept, "redacted": True}


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


