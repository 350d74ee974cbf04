"""The conversation-store contract: load a window, commit a turn, read or clear a conversation.

A backend fills in the private hooks; this base class owns what every backend must agree on: the
size limits, the order of a turn's messages, the checks made before anything is written and the
spend accounting of a commit (one clock, `clock`).

The core every backend has: `load_window`, `commit_turn` (with `reserve_turn` and `charge`, the
spend counters), `get_turn`, `mark_delivered`, `rate_reply`, `list_messages`, `clear`. Beside it,
optional capabilities a backend declares in `capabilities` (`Capability`):

    summaries   get_summary, get_fold, update_summary (without: None, None, False)
    indexes     write_indexes, purge_idle (without: None; purge_idle raises NotImplementedError)
    user_data   export_user, forget_user (without: NotImplementedError)
    budgets     update_ledger, list_ledgers, list_level_ledgers, purge_ledgers, delete_ledgers: a
                user's or tenant's spend by UTC day (`shared/ledger.py`; without:
                NotImplementedError)

A caller that needs one asks `supports(...)` first, so a backend never lacks a feature silently.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Literal

from ..errors import BadRequest, MessageTooLarge, TurnTooLarge
from ..ledger import Account, Ledger, Level
from ..limits import Spend
from ..messages import ChatMessage, Feedback, Sender, StoredTurn, Usage
from ..telemetry import commit, span
from ..tokens import count_message_tokens
from ._fold import FoldJob
from ._head import Basis

__all__ = [
    "CAPABILITIES",
    "MAX_BURST",
    "MAX_CONVERSATION_ID_CHARS",
    "MAX_MESSAGE_CHARS",
    "MAX_TURN_BYTES",
    "MAX_TURN_MESSAGES",
    "REMOVED_MARKER",
    "Capability",
    "ConversationStore",
    "ConversationWindow",
    "FoldJob",
    "Indexed",
    "PurgeReport",
    "UserConversation",
    "UserData",
]

Capability = Literal["summaries", "indexes", "user_data", "budgets"]
CAPABILITIES: frozenset[Capability] = frozenset({"summaries", "indexes", "user_data", "budgets"})

#: A message's content (or tool-call JSON) may hold at most this many characters.
MAX_MESSAGE_CHARS = 100_000
#: A turn answers at most this many activities at once (a burst: `shared/order.py`), each with
#: its own marker row.
MAX_BURST = 8
#: An entity-group transaction holds 100 entities: the head and a burst's markers take the rest.
MAX_TURN_MESSAGES = 100 - 1 - MAX_BURST
#: A transaction's body may be 4 MiB; we keep a margin for the batch framing.
MAX_TURN_BYTES = 3_500_000
MAX_CONVERSATION_ID_CHARS = 8_192
MAX_ACTIVITY_ID_CHARS = 1_024
MAX_USER_ID_CHARS = 1_024
#: What a user's message in a shared conversation becomes when they ask for their data removed.
REMOVED_MARKER = "[removed at the user's request]"


@dataclass(frozen=True, kw_only=True)
class Indexed:
    """Index rows written for a turn before it commits; the commit records them in the head.

    They hold for the head they were written against (`version`): a commit on another one (after
    a lost race) writes the rows that head lacks again, from the same request (`today`, `sender`,
    `shared`), so a head never names a speaker whose row a clear or removal deleted meanwhile."""

    #: The day whose day-index row now names the conversation (None: none written).
    day: str | None = None
    #: User IDs whose user-index row now names the conversation.
    speakers: tuple[str, ...] = ()
    #: The window version (head ETag) the rows were written for.
    version: str | None = None
    today: str = ""
    sender: Sender | None = None
    shared: bool = False


@dataclass(frozen=True, kw_only=True)
class PurgeReport:
    """What one retention run did. `finished` False: it stopped at its deadline (the index rows
    left are where the next run starts)."""

    purged: int = 0
    kept: int = 0
    finished: bool = True


@dataclass(frozen=True, kw_only=True)
class UserConversation:
    """A user's messages in one conversation: those they sent, and the replies to their turns."""

    conversation_id: str
    shared: bool
    sent: tuple[ChatMessage, ...]
    received: tuple[ChatMessage, ...]
    #: Everything of theirs and the replies in order, for the export.
    messages: tuple[ChatMessage, ...]


@dataclass(frozen=True, kw_only=True)
class UserData:
    user_id: str
    conversations: tuple[UserConversation, ...]


@dataclass(frozen=True, kw_only=True)
class ConversationWindow:
    """The recent history of one conversation, as loaded for a turn, and the version it was read at.

    `version` is the store's concurrency token (the head's ETag); None means the conversation has
    no stored state yet. `committed_activity` is set when `activity_id` was found already committed.
    `rows_read` and `round_trips` say what the load cost (the benchmarks report them).
    `summary` is the rolling summary of every message before the window (None: there is none);
    `summary_due` says a summary should be prepared once this turn's reply is out.
    """

    conversation_id: str
    messages: tuple[ChatMessage, ...]
    tokens: int
    version: str | None
    last_seq: int
    rows_read: int
    round_trips: int
    committed_activity: bool = False
    summary: str | None = None
    summary_due: bool = False
    #: The conversation's spend counters as loaded (`shared/limits.py`).
    spend: Spend = field(default_factory=Spend)
    #: Index rows written for this turn (`write_indexes`), for the commit to record in the head.
    indexed: Indexed | None = None
    #: What the backend read the window from, for its commit; opaque to callers.
    basis: Basis | None = field(default=None, repr=False, compare=False)


class ConversationStore(ABC):
    """Durable conversation memory, safe when turns of one conversation race.

    `clock` is the one clock of the spend counters: a backend sets it (UTC, `utc_now` unless a
    test passes its own)."""

    clock: Callable[[], datetime]
    #: The optional capabilities this backend has (the module docstring lists them).
    capabilities: ClassVar[frozenset[Capability]] = frozenset()

    def supports(self, capability: Capability) -> bool:
        return capability in self.capabilities

    async def load_window(
        self,
        conversation_id: str,
        *,
        token_budget: int,
        max_messages: int,
        activity_id: str | None = None,
    ) -> ConversationWindow:
        """The newest whole turns that fit `token_budget` and `max_messages`, oldest first."""
        _check_conversation_id(conversation_id)
        if activity_id is not None:  # refused now, before a model call, rather than at commit
            _check_activity_id(activity_id)
        with span("chatstate.window.load") as current:
            window = await self._load_window(conversation_id, token_budget=max(0, token_budget),
                                             max_messages=max(0, max_messages),
                                             activity_id=activity_id)
            current.set_attributes({"chatstate.window.messages": len(window.messages),
                                    "chatstate.window.tokens": window.tokens,
                                    "chatstate.window.rows_read": window.rows_read,
                                    "chatstate.window.round_trips": window.round_trips})
            return window

    async def commit_turn(
        self,
        window: ConversationWindow,
        *,
        activity_id: str,
        messages: Sequence[ChatMessage],
        billed: Usage | None = None,
        counted: bool = False,
        more_activity_ids: Sequence[str] = (),
    ) -> StoredTurn:
        """Append `messages` atomically, if nothing was committed since `window` was loaded.

        `activity_id` is the activity the turn answers; `more_activity_ids` the others of a burst
        answered with it (each is recorded as committed: a retry of any of them finds the turn).

        The spend counters move in the same write: one turn more this minute (unless `counted`:
        `reserve_turn` counted it already) and `billed`'s tokens today (every model call the turn
        paid for, whatever ended the reply; None: the usage the messages carry).

        Raises `ConversationConflict` when another turn committed first (nothing is written),
        `DuplicateActivity` when `activity_id` was committed before, and `MessageTooLarge` /
        `TurnTooLarge` before writing anything when the turn is over the limits.
        """
        activity_ids = tuple(dict.fromkeys((*more_activity_ids, activity_id)))
        for each in activity_ids:
            _check_activity_id(each)
        if len(activity_ids) > MAX_BURST:
            raise TurnTooLarge(f"a turn answers at most {MAX_BURST} activities, got {len(activity_ids)}")
        check_turn(messages)
        tokens = billed.total_tokens if billed is not None else \
            sum(m.usage.total_tokens for m in messages if m.usage is not None)
        spend = window.spend.after_turn(self.clock(), tokens=tokens, turns=0 if counted else 1)
        with commit() as current:
            current.set_attribute("chatstate.commit.messages", len(messages))
            return await self._commit_turn(window, activity_id=activity_id,
                                           activity_ids=activity_ids, messages=list(messages),
                                           tokens=[count_message_tokens(m) for m in messages],
                                           spend=spend)

    async def reserve_turn(self, window: ConversationWindow) -> ConversationWindow:
        """Count the coming turn in this minute's counter now, before its model call, with a write
        conditioned on `window`'s version: two instances cannot both take the minute's last turn.
        Returns the window at the new version (commit it with `counted=True`); raises
        `ConversationConflict` when the conversation changed since `window` was loaded."""
        _check_conversation_id(window.conversation_id)
        spend = window.spend.after_turn(self.clock(), tokens=0)
        return await self._reserve_turn(window, spend)

    async def charge(self, conversation_id: str, billed: Usage) -> None:
        """Add `billed`'s tokens to today's counter: model calls paid for by a turn that stored
        nothing (it failed, or another instance committed it) or by a summary."""
        _check_conversation_id(conversation_id)
        if billed.total_tokens > 0:
            await self._charge(conversation_id, billed.total_tokens)

    async def write_indexes(self, window: ConversationWindow, *, today: str,
                            sender: Sender | None, shared: bool) -> Indexed | None:
        """Write the index rows this turn needs before it commits (the day index on the
        conversation's first turn of `today`, the user index when `sender` first speaks in it);
        never raises: a failed write is made again by the commit (which fails if it fails again).
        None: this store keeps no index."""
        return None

    async def purge_idle(self, *, before: str, deadline: float,
                         clock: Callable[[], float] = time.monotonic) -> PurgeReport:
        """Delete the conversations whose last turn was before the UTC day `before`, until
        `clock()` passes `deadline`. A turn that arrives meanwhile is kept."""
        raise NotImplementedError(f"{type(self).__name__} keeps no retention index")

    async def export_user(self, user_id: str) -> UserData:
        """Every stored message `user_id` sent or received, by conversation."""
        _check_user_id(user_id)
        return await self._export_user(user_id)

    async def forget_user(self, user_id: str, *, marker: str = REMOVED_MARKER) -> UserData:
        """Delete `user_id`'s personal conversations; in shared ones replace their messages by
        `marker`. Returns what was found (before the change)."""
        _check_user_id(user_id)
        return await self._forget_user(user_id, marker=marker)

    async def _export_user(self, user_id: str) -> UserData:
        raise NotImplementedError(f"{type(self).__name__} keeps no user index")

    async def _forget_user(self, user_id: str, *, marker: str) -> UserData:
        raise NotImplementedError(f"{type(self).__name__} keeps no user index")

    async def update_ledger(self, account: Account, day: str,
                            change: Callable[[Ledger], Ledger | None]) -> Ledger | None:
        """`change` the account's ledger of the UTC `day` (a new, empty one if there is none; a
        pure function; None: leave it) with a conditional write, again when another writer won.
        The ledger as written, or None when nothing was written."""
        _check_account(account)
        return await self._update_ledger(account, day, change)

    async def list_ledgers(self, account: Account, *, since: str) -> list[Ledger]:
        """The account's ledgers from the UTC day `since` on, oldest first."""
        _check_account(account)
        return await self._list_ledgers(account, since=since)

    async def list_level_ledgers(self, level: Level, *, since: str, until: str) -> list[Ledger]:
        """Every account's ledgers of `level` from `since` to `until` (UTC days, inclusive)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no budgets")

    async def purge_ledgers(self, *, before: str) -> int:
        """Delete the ledgers of the days before `before` (retention); how many."""
        raise NotImplementedError(f"{type(self).__name__} keeps no budgets")

    async def delete_ledgers(self, account: Account) -> int:
        """Delete every ledger of the account (a user's removal); how many."""
        raise NotImplementedError(f"{type(self).__name__} keeps no budgets")

    async def _update_ledger(self, account: Account, day: str,
                             change: Callable[[Ledger], Ledger | None]) -> Ledger | None:
        raise NotImplementedError(f"{type(self).__name__} keeps no budgets")

    async def _list_ledgers(self, account: Account, *, since: str) -> list[Ledger]:
        raise NotImplementedError(f"{type(self).__name__} keeps no budgets")

    async def get_turn(self, conversation_id: str, activity_id: str) -> StoredTurn | None:
        """What `activity_id` committed in this conversation, or None."""
        _check_conversation_id(conversation_id)
        return await self._get_turn(conversation_id, activity_id)

    async def mark_delivered(self, conversation_id: str, activity_id: str, *,
                             reply_id: str | None = None,
                             more_activity_ids: Sequence[str] = ()) -> None:
        """Record that the reply of `activity_id` (and of the burst's `more_activity_ids`)
        reached the channel (as activity `reply_id`)."""
        with span("chatstate.delivered"):
            await self._mark_delivered(conversation_id,
                                       tuple(dict.fromkeys((*more_activity_ids, activity_id))),
                                       reply_id=reply_id)

    async def mark_stopped(self, conversation_id: str, activity_id: str, *, shown: str) -> None:
        """The user stopped the reply of `activity_id` after it was committed (on the stream's
        final message): keep `shown`, the text they saw, as the reply, marked stopped."""
        _check_conversation_id(conversation_id)
        await self._mark_stopped(conversation_id, activity_id, shown=shown)

    async def _mark_stopped(self, conversation_id: str, activity_id: str, *, shown: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot mark a reply stopped")

    async def rate_reply(self, conversation_id: str, reply_id: str, feedback: Feedback) -> bool:
        """Keep `feedback` with the reply the channel knows as `reply_id` (replacing an earlier
        rating); False when no stored turn has that reply."""
        _check_conversation_id(conversation_id)
        _check_activity_id(reply_id)
        return await self._rate_reply(conversation_id, reply_id, feedback)

    async def list_messages(self, conversation_id: str) -> list[ChatMessage]:
        """Every visible message of the conversation, oldest first."""
        _check_conversation_id(conversation_id)
        return await self._list_messages(conversation_id)

    async def clear(self, conversation_id: str) -> int:
        """Forget the conversation: every message (and turn marker) row of it is removed; the head
        stays as a tombstone with no text (its sequence number, recent activity IDs and spend
        counters). Returns the rows removed."""
        _check_conversation_id(conversation_id)
        return await self._clear(conversation_id)

    async def touch(self, conversation_id: str) -> None:
        """Change the conversation's version (its head), nothing else: a turn loaded before
        fails its commit (a user's removal makes running turns check their messages again)."""
        _check_conversation_id(conversation_id)
        await self._touch(conversation_id)

    async def get_summary(self, conversation_id: str) -> str | None:
        """The conversation's current rolling summary (None: none, or a store that keeps none)."""
        _check_conversation_id(conversation_id)
        return None

    async def get_fold(self, conversation_id: str, *, token_budget: int,
                       max_messages: int | None = None) -> FoldJob | None:
        """The summary to prepare next (the oldest turns of the window), or None: nothing to do."""
        return None

    async def update_summary(self, job: FoldJob, summary: str) -> bool:
        """Store `summary` as ready for the window's next step, if the conversation's window
        still starts where `job` was read (a conditional write). False: left for a later turn."""
        return False

    async def ping(self) -> None:
        """Raise `StorageUnavailable` unless the store answers."""

    async def close(self) -> None:
        """Release connections."""

    async def __aenter__(self) -> ConversationStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @abstractmethod
    async def _load_window(self, conversation_id: str, *, token_budget: int, max_messages: int,
                           activity_id: str | None) -> ConversationWindow: ...

    @abstractmethod
    async def _commit_turn(self, window: ConversationWindow, *, activity_id: str,
                           activity_ids: tuple[str, ...], messages: list[ChatMessage],
                           tokens: list[int], spend: Spend) -> StoredTurn: ...

    @abstractmethod
    async def _reserve_turn(self, window: ConversationWindow, spend: Spend) -> ConversationWindow: ...

    @abstractmethod
    async def _charge(self, conversation_id: str, tokens: int) -> None: ...

    @abstractmethod
    async def _get_turn(self, conversation_id: str, activity_id: str) -> StoredTurn | None: ...

    @abstractmethod
    async def _mark_delivered(self, conversation_id: str, activity_ids: tuple[str, ...], *,
                              reply_id: str | None) -> None: ...

    @abstractmethod
    async def _rate_reply(self, conversation_id: str, reply_id: str, feedback: Feedback) -> bool: ...

    @abstractmethod
    async def _list_messages(self, conversation_id: str) -> list[ChatMessage]: ...

    @abstractmethod
    async def _clear(self, conversation_id: str) -> int: ...

    @abstractmethod
    async def _touch(self, conversation_id: str) -> None: ...


def check_turn(messages: Sequence[ChatMessage]) -> None:
    """Refuse a turn that cannot be stored, before anything is written."""
    if not messages:
        raise TurnTooLarge("a turn needs at least one message")
    if len(messages) > MAX_TURN_MESSAGES:
        raise TurnTooLarge(f"a turn holds at most {MAX_TURN_MESSAGES} messages, got {len(messages)}")
    size = 0
    for message in messages:
        for text in (message.content, message.tool_calls_json()):
            if text is not None and len(text) > MAX_MESSAGE_CHARS:
                raise MessageTooLarge(
                    f"a {message.role} message holds at most {MAX_MESSAGE_CHARS:,} characters, "
                    f"got {len(text):,}")
            # The SDK sends JSON with non-ASCII escaped (\uXXXX): count what goes on the wire.
            size += len(json.dumps(text)) if text else 0
        size += 1_024  # keys, metadata and batch framing of one entity
    if size > MAX_TURN_BYTES:
        raise TurnTooLarge(f"a turn may store at most {MAX_TURN_BYTES:,} bytes, got {size:,}")


def _check_conversation_id(conversation_id: str) -> None:
    if not conversation_id or len(conversation_id) > MAX_CONVERSATION_ID_CHARS:
        raise BadRequest(f"a conversation ID must have 1 to {MAX_CONVERSATION_ID_CHARS} characters")


def _check_user_id(user_id: str) -> None:
    if not user_id or len(user_id) > MAX_USER_ID_CHARS:
        raise BadRequest(f"a user ID must have 1 to {MAX_USER_ID_CHARS} characters")


def _check_account(account: Account) -> None:
    if not account.id or len(account.id) > MAX_USER_ID_CHARS:
        raise BadRequest(f"a {account.level} ID must have 1 to {MAX_USER_ID_CHARS} characters")


def _check_activity_id(activity_id: str) -> None:
    if not activity_id or len(activity_id) > MAX_ACTIVITY_ID_CHARS:
        raise BadRequest(f"an activity ID must have 1 to {MAX_ACTIVITY_ID_CHARS} characters")
