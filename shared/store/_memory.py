"""An in-memory conversation store with the same contract, for fast unit tests of the turn logic.

It keeps the Table backend's semantics (version check on commit, duplicate markers, clear, spend
counters that outlive a clear, budget ledgers changed under a version check) without I/O, so a
test of the turn handler can run thousands of turns in a second. It keeps no summaries, no indexes
and no user data: those calls say so.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import ClassVar

from ..errors import ConversationConflict, DuplicateActivity
from ..ledger import Account, Ledger, Level
from ..limits import Spend
from ..messages import ChatMessage, Feedback, StoredTurn, utc_now
from ..window import WindowBuilder
from ._base import Capability, ConversationStore, ConversationWindow

__all__ = ["InMemoryConversationStore"]

_versions = itertools.count(1)


@dataclass
class _Conversation:
    version: str
    messages: list[tuple[ChatMessage, int]] = field(default_factory=list)
    turns: dict[str, StoredTurn] = field(default_factory=dict)
    replies: dict[str, str] = field(default_factory=dict)  # reply activity ID → activity ID
    spend: Spend = field(default_factory=Spend)


class InMemoryConversationStore(ConversationStore):
    capabilities: ClassVar[frozenset[Capability]] = frozenset({"budgets"})

    def __init__(self, *, clock: Callable[[], datetime] = utc_now) -> None:
        self._conversations: dict[str, _Conversation] = {}
        self._ledgers: dict[tuple[str, str], Ledger] = {}
        #: The spend counters of cleared conversations (a clear keeps them, as the Table's does).
        self._spent: dict[str, Spend] = {}
        self._lock = asyncio.Lock()
        self.clock = clock

    async def _load_window(self, conversation_id: str, *, token_budget: int, max_messages: int,
                           activity_id: str | None) -> ConversationWindow:
        conversation = self._conversations.get(conversation_id)
        builder = WindowBuilder(token_budget=token_budget, max_messages=max_messages)
        rows = 0
        for message, tokens in reversed(conversation.messages if conversation else []):
            rows += 1
            if not builder.offer(message, tokens):
                break
        return ConversationWindow(
            conversation_id=conversation_id,
            messages=tuple(builder.messages),
            tokens=builder.tokens,
            version=conversation.version if conversation else None,
            last_seq=len(conversation.messages) if conversation else 0,
            rows_read=rows + (1 if conversation else 0),
            round_trips=1,
            committed_activity=bool(conversation and activity_id in conversation.turns),
            spend=conversation.spend if conversation else self._spent.get(conversation_id, Spend()),
        )

    async def _commit_turn(self, window: ConversationWindow, *, activity_id: str,
                           activity_ids: tuple[str, ...], messages: list[ChatMessage],
                           tokens: list[int], spend: Spend) -> StoredTurn:
        async with self._lock:
            conversation = self._conversations.get(window.conversation_id)
            for each in activity_ids:
                if conversation is not None and each in conversation.turns:
                    raise DuplicateActivity(each, conversation.turns[each])
            current = conversation.version if conversation else None
            if current != window.version:
                raise ConversationConflict(f"conversation {window.conversation_id!r} changed")
            if conversation is None:
                conversation = self._conversations[window.conversation_id] = _Conversation(
                    version=str(next(_versions)))
            self._spent.pop(window.conversation_id, None)
            conversation.messages.extend(zip(messages, tokens, strict=True))
            conversation.spend = spend
            conversation.version = str(next(_versions))
            turn = StoredTurn(conversation_id=window.conversation_id, activity_id=activity_id,
                              messages=tuple(messages), activity_ids=activity_ids)
            for each in activity_ids:
                conversation.turns[each] = turn
            return turn

    async def _reserve_turn(self, window: ConversationWindow, spend: Spend) -> ConversationWindow:
        async with self._lock:
            conversation = self._conversations.get(window.conversation_id)
            if (conversation.version if conversation else None) != window.version:
                raise ConversationConflict(f"conversation {window.conversation_id!r} changed")
            if conversation is None:
                conversation = self._conversations[window.conversation_id] = _Conversation(
                    version="")
                self._spent.pop(window.conversation_id, None)
            conversation.spend = spend
            conversation.version = str(next(_versions))
            return replace(window, version=conversation.version, spend=spend)

    async def _charge(self, conversation_id: str, tokens: int) -> None:
        async with self._lock:
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                conversation = self._conversations[conversation_id] = _Conversation(
                    version=str(next(_versions)), spend=self._spent.pop(conversation_id, Spend()))
            conversation.spend = conversation.spend.after_turn(self.clock(), tokens=tokens,
                                                               turns=0)

    async def _update_ledger(self, account: Account, day: str,
                             change: Callable[[Ledger], Ledger | None]) -> Ledger | None:
        async with self._lock:
            read = self._ledgers.get((account.key, day), Ledger(account=account, day=day))
            changed = change(read)
            if changed is None:
                return None
            written = replace(changed, etag=str(next(_versions)))
            self._ledgers[(account.key, day)] = written
            return written

    async def _list_ledgers(self, account: Account, *, since: str) -> list[Ledger]:
        return sorted((ledger for (key, day), ledger in self._ledgers.items()
                       if key == account.key and day >= since), key=lambda ledger: ledger.day)

    async def list_level_ledgers(self, level: Level, *, since: str, until: str) -> list[Ledger]:
        return sorted((ledger for ledger in self._ledgers.values()
                       if ledger.account.level == level and since <= ledger.day <= until),
                      key=lambda ledger: (ledger.account.key, ledger.day))

    async def delete_ledgers(self, account: Account) -> int:
        async with self._lock:
            doomed = [key for key in self._ledgers if key[0] == account.key]
            for key in doomed:
                del self._ledgers[key]
        return len(doomed)

    async def purge_ledgers(self, *, before: str) -> int:
        async with self._lock:
            doomed = [key for key in self._ledgers if key[1] < before]
            for key in doomed:
                del self._ledgers[key]
        return len(doomed)

    async def _get_turn(self, conversation_id: str, activity_id: str) -> StoredTurn | None:
        conversation = self._conversations.get(conversation_id)
        return conversation.turns.get(activity_id) if conversation else None

    async def _mark_delivered(self, conversation_id: str, activity_ids: tuple[str, ...], *,
                              reply_id: str | None) -> None:
        conversation = self._conversations.get(conversation_id)
        for activity_id in activity_ids:
            if conversation and (turn := conversation.turns.get(activity_id)):
                conversation.turns[activity_id] = replace(turn, delivered=True)
                if reply_id is not None:
                    conversation.replies[reply_id] = activity_id

    async def _mark_stopped(self, conversation_id: str, activity_id: str, *, shown: str) -> None:
        conversation = self._conversations.get(conversation_id)
        turn = conversation.turns.get(activity_id) if conversation else None
        if conversation is None or turn is None or turn.reply is None:
            return
        stopped = replace(turn.reply, content=shown, stopped=True)
        for index, (message, tokens) in enumerate(conversation.messages):
            if message is turn.reply:
                conversation.messages[index] = (stopped, tokens)
        conversation.turns[activity_id] = replace(turn, messages=(*turn.messages[:-1], stopped))

    async def _rate_reply(self, conversation_id: str, reply_id: str, feedback: Feedback) -> bool:
        conversation = self._conversations.get(conversation_id)
        activity_id = conversation.replies.get(reply_id) if conversation else None
        if conversation is None or activity_id is None:
            return False
        reply = conversation.turns[activity_id].reply
        for index, (message, tokens) in enumerate(conversation.messages):
            if message is reply:
                conversation.messages[index] = (replace(message, feedback=feedback), tokens)
        return True

    async def _list_messages(self, conversation_id: str) -> list[ChatMessage]:
        conversation = self._conversations.get(conversation_id)
        return [message for message, _ in conversation.messages] if conversation else []

    async def _touch(self, conversation_id: str) -> None:
        async with self._lock:
            conversation = self._conversations.get(conversation_id)
            if conversation is not None:
                conversation.version = str(next(_versions))

    async def _clear(self, conversation_id: str) -> int:
        async with self._lock:
            conversation = self._conversations.pop(conversation_id, None)
            if conversation is not None:
                self._spent[conversation_id] = conversation.spend
        if conversation is None:
            return 0
        return len(conversation.messages) + len(conversation.turns) + 1
