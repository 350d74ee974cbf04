"""The turn: load the window, check the limits, prompt the model, commit; with its retry policy.

    load the window (dedupe) → limits → prompt (streaming through the caller's stream; each model
    call reserved in the user's and tenant's budgets first, shared/budgets.py) → commit

The store loads a window; the prompt gets its messages and returns the turn's; the turn is
committed against that window, in one ETag-guarded transaction. A turn that loses the race re-loads
the window and commits again: with the same messages when the user has already read the answer as
it streamed, or when it was asked again once already; otherwise it asks the model again with the
new window (`MAX_REASKS`). The turn sends nothing itself: its result says what to deliver. A model
failure is raised (`ModelError`): the caller apologises or retries. Whatever ends the turn, every
model call it paid for is counted: in the conversation's counters (the commit, or `charge`) and
in the user's and tenant's ledgers (the budgets' hook, then `finish`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from .activity import Activity
from .attachments import Incoming
from .budgets import Budgets
from .errors import (
    BudgetExhausted,
    ConversationConflict,
    DuplicateActivity,
    MessageTooLarge,
    ModelError,
    StoreError,
    TurnTooLarge,
)
from .limits import LIMIT_REPLIES, limit_reached, over_limit
from .messages import ChatMessage, StoredTurn, ToolCall, ToolDecision, Usage, utc_day
from .pause import PausedTurn, ToolCallsHeld
from .prompt import TURN_LIMIT_REPLY, ChatPrompt, RunOnce, ToolListener, UserInput
from .settings import Settings
from .store import ConversationStore, ConversationWindow, Indexed
from .streaming import ReplyStream

__all__ = ["MAX_REASKS", "Busy", "Committed", "Found", "Paused", "Refused", "Resume", "TurnResult",
           "TurnRunner", "Withdrawn"]

log = logging.getLogger(__name__)

#: After losing a race, a turn not yet shown asks the model again this many times at most; then
#: its answer is committed after the turns that won.
MAX_REASKS = 1


@dataclass(frozen=True, kw_only=True)
class Committed:
    """The turn is stored; deliver its reply (then the summary work on `window`)."""

    turn: StoredTurn
    window: ConversationWindow
    #: Follow-ups the model suggested (`shared/suggestions.py`), for the reply's buttons.
    suggestions: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Found:
    """The activity was committed before. `send`: its reply may still need sending (a retry);
    False when another instance committed it a moment ago and delivers it."""

    turn: StoredTurn | None
    send: bool


@dataclass(frozen=True, kw_only=True)
class Refused:
    """No model answer to store: reply with this text of ours (a limit, a turn too large)."""

    text: str


@dataclass(frozen=True, kw_only=True)
class Busy:
    """Other turns kept committing first, `attempts` times."""

    attempts: int


@dataclass(frozen=True, kw_only=True)
class Withdrawn:
    """The messages were withdrawn while the turn ran (a user's removal): nothing was stored."""


@dataclass(frozen=True, kw_only=True)
class Paused:
    """The model called a tool that waits for a person: nothing stored; the turn so far is
    `paused` (`shared/pause.py`), to be parked until they decide (`shared/approvals.py`)."""

    paused: PausedTurn


@dataclass(frozen=True, kw_only=True)
class Resume:
    """Go on with a paused turn: its held round as `decisions` say, each call run at most once
    through `run_once`; `activity_ids`: the activities the turn answers (a burst's, in order)."""

    paused: PausedTurn
    decisions: Mapping[str, ToolDecision]
    activity_ids: tuple[str, ...]
    run_once: RunOnce | None = None


TurnResult = Committed | Found | Refused | Busy | Withdrawn | Paused


class TurnRunner:
    def __init__(self, *, settings: Settings, store: ConversationStore, prompt: ChatPrompt,
                 clock: Callable[[], datetime] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 budgets: Budgets | None = None) -> None:
        """`clock`: the turn's time; None: the store's (`store.clock`), the one the spend
        counters move by. `budgets`: the users' and tenants' (None: none kept)."""
        self.settings = settings
        self.store = store
        self.prompt = prompt
        self.budgets = budgets
        self._clock = clock or store.clock
        self._sleep = sleep

    async def run(self, activity: Activity, text: str, *, needed: int,
                  stream: ReplyStream | None, attachments: Incoming | None = None,
                  earlier: Sequence[UserInput] = (),
                  still_wanted: Callable[[], Coroutine[Any, Any, bool]] | None = None,
                  resume: Resume | None = None) -> TurnResult:
        """Answer `text` (`needed` tokens, with `earlier`'s) of `activity`; the model's text goes
        to `stream`. `attachments`: the files and images that came with it
        (`shared/attachments.py`). `earlier`: a burst's messages before it (each with its
        activity ID), answered in the same turn. `still_wanted`: asked after each load of the
        window (while the model works) and awaited before the commit: False (a user's removal
        took the messages: it deletes them, then changes the conversation's head, so a commit on
        a window loaded before the check fails) ends the turn, unstored. `resume`: go on with a
        paused turn instead (its messages are the turn's; `text` is not asked again); it is
        committed with whatever it ran, never asked again, and may pause again (`Paused`)."""
        limits = self.settings.model
        started = time.perf_counter()
        # A turn that is kept once asked: the user has read it as it streamed, or it was asked
        # again once already after losing a race (so a busy conversation cannot starve it).
        kept: tuple[ChatMessage, ...] | None = None
        indexing: asyncio.Task[Indexed | None] | None = None
        suggestions: tuple[str, ...] = ()
        billed, counted, committed = Usage(), False, False  # every model call the turn paid for
        spend = self.budgets.for_turn(activity) if self.budgets is not None else None
        asked: tuple[ChatMessage, ...] | None = None  # the last answer, if asking again is refused
        # A burst is committed whole: if its first activity is committed, an earlier attempt
        # committed it (or the first part of it).
        first_id = earlier[0].activity_id or activity.id if earlier else activity.id
        more_ids = tuple(item.activity_id for item in earlier if item.activity_id)
        if resume is not None:
            first_id, more_ids = resume.activity_ids[0], resume.activity_ids[:-1]
        # What the turn's model calls before a pause cost (billed when it paused).
        base = resume.paused.usage if resume is not None else Usage()
        wanted: asyncio.Task[bool] | None = None
        # The tool definitions go with every request: the history window gets what they leave.
        budget = max(0, limits.history_token_budget - needed - await self.prompt.tools_tokens())
        try:
            for attempt in range(self.settings.turn_max_attempts):
                window = await self.store.load_window(
                    activity.conversation_id, token_budget=budget,
                    max_messages=limits.history_max_messages, activity_id=first_id)
                if window.committed_activity:
                    # Found on a re-load after a conflict: another instance just committed it
                    # and delivers it. Found at once: a retry, which may need a re-send.
                    turn = await self.store.get_turn(activity.conversation_id, first_id)
                    return Found(turn=turn, send=attempt == 0)
                now = self._clock()
                if kept is None and not counted and resume is None and \
                        (limit := over_limit(window.spend, self.settings.data, now)):
                    limit_reached(limit, window.spend, now)
                    return Refused(text=LIMIT_REPLIES[limit])
                if self.settings.data.max_turns_per_minute is not None and not counted and \
                        resume is None:  # a resumed turn took its place when it started
                    try:  # the turn takes its place in the minute before the model call
                        window, counted = await self.store.reserve_turn(window), True
                    except ConversationConflict:
                        await self._sleep(random.uniform(0, min(1.0, 0.05 * 2 ** attempt)))
                        continue
                wanted = asyncio.create_task(still_wanted()) if still_wanted else None
                if attempt and kept is None and wanted is not None and not await wanted:
                    log.info("the messages were withdrawn (a user's removal); nothing stored")
                    return Withdrawn()  # found before asking the model again
                if indexing is None:  # index rows, written while the model works
                    indexing = asyncio.create_task(self.store.write_indexes(
                        window, today=utc_day(now), sender=activity.user, shared=activity.in_group))
                messages = kept
                if messages is None:
                    try:
                        if resume is None:
                            result = await self.prompt.send(
                                text, history=window.messages, summary=window.summary,
                                speaker=activity.speaker, sender=activity.user,
                                on_text=stream.on_text if stream else None,
                                on_tools=_tools_listener(stream), attachments=attachments,
                                earlier=earlier, activity_id=activity.id, spend=spend)
                        else:
                            result = await self.prompt.resume(
                                resume.paused, resume.decisions, history=window.messages,
                                summary=window.summary, on_text=stream.on_text if stream else None,
                                on_tools=_tools_listener(stream), run_once=resume.run_once,
                                spend=spend)
                    except ToolCallsHeld as held:
                        billed += _since(held.paused.usage, base)
                        return Paused(paused=held.paused)
                    except BudgetExhausted as exhausted:
                        if asked is None:  # before any model call: the budget reply
                            return Refused(text=exhausted.reply)
                        messages = kept = asked  # no room to ask again: the one paid for
                    except ModelError as exc:
                        billed += exc.billed or Usage()
                        raise
                    else:
                        billed += _since(result.usage, base)
                        messages = asked = _as_seen(result.messages, stream)
                        suggestions = result.suggestions
                        # A resumed turn ran its tools: it is never asked again.
                        if (stream is not None and stream.shown) or attempt >= MAX_REASKS or \
                                resume is not None:
                            kept = messages
                window = replace(window, indexed=await indexing)
                if wanted is not None and not await wanted:
                    log.info("the messages were withdrawn (a user's removal); nothing stored")
                    return Withdrawn()
                try:  # the ledgers' records are written beside the commit
                    turn = await _alongside(
                        self.store.commit_turn(window, activity_id=activity.id,
                                               messages=messages, billed=billed, counted=counted,
                                               more_activity_ids=more_ids),
                        spend.finish() if spend is not None else None)
                    committed = True
                except ConversationConflict:
                    log.info("conflict on attempt %d%s", attempt + 1,
                             "; committing the same answer after the turns that won"
                             if kept else "")
                    if attempt + 1 < self.settings.turn_max_attempts:
                        await self._sleep(random.uniform(0, min(1.0, 0.05 * 2 ** attempt)))
                    continue
                except DuplicateActivity as exc:
                    log.info("the activity was committed by another instance")
                    return Found(turn=exc.turn, send=False)
                except (TurnTooLarge, MessageTooLarge) as exc:
                    log.warning("turn too large to store: %s", exc)
                    return Refused(text=TURN_LIMIT_REPLY)
                log.info("turn committed attempts=%d rows_read=%d window=%d streamed=%s ms=%.1f",
                         attempt + 1, window.rows_read, len(window.messages),
                         bool(stream and stream.shown), (time.perf_counter() - started) * 1000)
                return Committed(turn=turn, window=window, suggestions=suggestions)
        finally:
            if not committed:  # paid for, stored nowhere: the tokens still count
                await self._charge(activity, billed)
            if spend is not None:  # what the ledgers have not recorded yet
                await spend.finish()
            if indexing is not None:  # a turn that ends before its commit: the rows stay, harmless
                await asyncio.gather(indexing, return_exceptions=True)
            if wanted is not None:
                wanted.cancel()
                await asyncio.gather(wanted, return_exceptions=True)
        log.warning("gave up after %d conflicts", self.settings.turn_max_attempts)
        return Busy(attempts=self.settings.turn_max_attempts)


    async def _charge(self, activity: Activity, billed: Usage) -> None:
        try:
            await self.store.charge(activity.conversation_id, billed)
        except StoreError as exc:
            log.warning("tokens of a turn that stored nothing not counted: %s", exc)


async def _alongside[T](main: Awaitable[T], beside: Awaitable[None] | None) -> T:
    """`main`'s result, with `beside` (which never raises) run at the same time."""
    if beside is None:
        return await main
    task = asyncio.ensure_future(beside)
    try:
        return await main
    finally:
        await task


def _since(total: Usage, base: Usage) -> Usage:
    """What `total` adds to `base` (the usage a resumed turn carries from before its pause)."""
    return Usage(prompt_tokens=max(0, total.prompt_tokens - base.prompt_tokens),
                 completion_tokens=max(0, total.completion_tokens - base.completion_tokens),
                 cached_tokens=max(0, total.cached_tokens - base.cached_tokens))


def _tools_listener(stream: ReplyStream | None) -> ToolListener | None:
    if stream is None:
        return None

    async def using(calls: Sequence[ToolCall]) -> None:
        stream.new_round()
        names = ", ".join(dict.fromkeys(call.name for call in calls))
        stream.inform(f"Using {names}…")

    return using


def _as_seen(messages: tuple[ChatMessage, ...], stream: ReplyStream | None) -> tuple[ChatMessage, ...]:
    """The turn as the user saw it: a reply they stopped ends with what they had read."""
    if stream is None or not stream.canceled or messages[-1].stopped:
        return messages
    return (*messages[:-1], replace(messages[-1], content=stream.shown, stopped=True))
