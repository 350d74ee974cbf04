"""The answer: accepted messages turned into delivered replies, inline or in their conversation's order.

    inline:  activity → /reset | checks → the turn → the delivery → the summary work
    queued:  ticket → the conversation's order (`shared/order.py`) → unit → the same steps

`answer()` runs one message inline (expectReplies, `CHAT_ANSWER_MODE=inline`). `answer_ticket()`
is the queue trigger's core: it wakes the conversation's drain, which calls `answer_unit()` for
each unit in arrival order: a `/reset`, a burst (its messages checked one by one, those that pass
answered in one turn: one model call, one reply, each message stored with its own activity ID),
or a parked turn (resumed or closed by the waiter of its kind, `Waiter`). Every activity read back
from the inbox is checked again before anything is sent for it (its serviceUrl must pass the
reply allow-list: the bot's token goes there). The exception that leaves the queue trigger carries
no text from outside: its kind only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

from .activity import Activity, parse_activity
from .attachments import AttachmentReader, Incoming, Refusal
from .delivery import Delivery, Progress
from .errors import (
    BadRequest,
    ChatstateError,
    ConnectorError,
    InputTooLong,
    MessageTooLarge,
    ModelError,
    ModelMisconfigured,
    StoreError,
)
from .inbox import Inbox, Kept, TurnTicket
from .logs import turn_context
from .order import Answered, Conductor, Failed, Paused, Unit, UnitOutcome
from .pause import PausedTurn
from .pending import Pending
from .prompt import UserInput, check_input
from .settings import Settings
from .store import ConversationStore, ConversationWindow
from .streaming import StreamStart
from .summary import Summarizer
from .telemetry import turn
from .turn import Busy, Committed, Found, Refused, Resume, TurnResult, TurnRunner, Withdrawn
from .turn import Paused as TurnPaused

__all__ = ["APOLOGY", "BUSY", "RESET_DONE", "SETUP_PROBLEM", "TOO_LONG", "WITHDRAWN", "Answerer",
           "TurnFailed", "Unanswered", "Waiter"]

log = logging.getLogger(__name__)

RESET_DONE = "Done: I have forgotten this conversation. Let's start over."
APOLOGY = "Sorry, I couldn't get an answer just now. Please try again in a moment."
SETUP_PROBLEM = ("Sorry, I can't answer: my model is not set up correctly, so trying again will "
                 "not help. The bot's operator will find what to fix in its log.")
BUSY = "Sorry, this conversation is very busy right now. Please send that again in a moment."
#: Ends the stream of a turn whose messages were removed at the user's request while it ran.
WITHDRAWN = "This message was removed at the sender's request, so it was not answered."
#: The streamed reply of a turn that pauses ends with this (the card follows as its own message).
PAUSE_NOTE = "Before I go on, I need your approval for this step."
#: Ends a stream whose start could not be kept when its turn fails (the retry answers anew).
INTERRUPTED = "I was interrupted; my answer follows in a moment."
#: A tool that asks a person first, where answers cannot wait for one (inline, expectReplies).
NO_APPROVALS = ("Sorry, I would need your approval for a step of this, and I can ask for it only "
                "when I answer through my turn queue; nothing was done.")
TOO_LONG = ("Sorry, that message is too long for me (about {tokens:,} tokens; I can take "
            "{budget:,}). Could you shorten it?")
_HEADERS = {"Content-Type": "application/json"}
#: How long a turn waits for the stream the webhook is opening for its message to be kept.
OPENING_SECONDS = 5.0


class Unanswered(Exception):
    """Other turns kept committing first: nothing was stored or sent (inline: answer 503)."""


class TurnFailed(Exception):
    """What leaves the queue trigger when a wake-up could not be handled: the failure's kind
    only (a provider's error text may quote the prompt), so the host retries the message."""


class Waiter(Protocol):
    """One kind of parked turn (an approval, a sign-in): how to ask, resume and close it."""

    kind: str

    async def park(self, paused: PausedTurn, activity: Activity) -> Paused:
        """A turn paused answering `activity` (`shared/pause.py`): its record and saved state."""
        ...

    async def ask(self, unit: Unit, pending: Pending, activity: Activity) -> Pending:
        """Send the question (a card); the record with what refreshing it needs (`card_id`)."""
        ...

    async def resume(self, unit: Unit, pending: Pending, activities: Sequence[Activity],
                     saved: bytes) -> UnitOutcome:
        """A person decided: go on with the turn (or park it again)."""
        ...

    async def close(self, unit: Unit, pending: Pending, activities: Sequence[Activity],
                    saved: bytes, *, why: str) -> None:
        """Expired or superseded: nothing runs; the turn so far is stored as declined."""
        ...


@dataclass(frozen=True, kw_only=True)
class _Message:
    """One message of a unit, read and checked."""

    activity: Activity
    text: str
    needed: int
    incoming: Incoming


class _KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it (inline answers)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._entries.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._entries[key]


class Answerer:
    def __init__(self, *, settings: Settings, store: ConversationStore, turns: TurnRunner,
                 delivery: Delivery, summarizer: Summarizer | None = None,
                 inbox: Inbox | None = None, reply_allowed: Callable[[str], bool] | None = None,
                 max_attempts: int = 5, retry_seconds: float = 5.0) -> None:
        """`summarizer`: prepares rolling summaries after replies (None: no summaries).
        `inbox`: the accepted activities (None: inline answers only). `reply_allowed`: whether
        replies (and the bot's token) may go to a serviceUrl. `max_attempts`, `retry_seconds`:
        a failing unit is tried this many times, this far apart (host.json's queue settings)."""
        self.settings = settings
        self.store = store
        self.turns = turns
        self.delivery = delivery
        self.summarizer = summarizer
        self.inbox = inbox
        self.reply_allowed = reply_allowed or (lambda url: True)
        self.waiters: dict[str, Waiter] = {}
        self._locks = _KeyedLocks()
        self._background: set[asyncio.Task[bool]] = set()
        self.attachments = AttachmentReader(settings=settings, token=delivery.connector.token)
        self.conductor = None if inbox is None else Conductor(
            inbox=inbox, answerer=self, burst=settings.order.burst,
            max_burst=settings.order.max_burst, hold_seconds=settings.order.hold_seconds,
            drain_seconds=settings.order.drain_seconds, retry_seconds=retry_seconds,
            max_attempts=max_attempts)

    def add_waiter(self, waiter: Waiter) -> None:
        """Handle parked turns of `waiter.kind` (approvals, sign-ins)."""
        self.waiters[waiter.kind] = waiter

    # -- inline ------------------------------------------------------------------------------

    async def answer(self, activity: Activity, *,
                     apologize: bool = True) -> dict[str, Any] | None:
        """Answer one message now; with expectReplies, the reply activity (nothing is sent).
        `apologize`: a model failure ends in the apology (else it is raised)."""
        async with self._locks.hold(activity.conversation_id):
            if activity.message_text.lower() == "/reset":
                return await self._reset(activity, None)
            checked, outgoing, _ = await self._check([activity], None)
            if not checked:
                return outgoing
            progress = self.delivery.progress(activity)
            try:
                outgoing, window = await self._turn(checked, activity, progress, apologize)
            finally:
                await progress.close()
        if window is not None:
            await self._after_reply(activity, window)
        return outgoing

    # -- in the conversation's order ---------------------------------------------------------

    async def answer_ticket(self, message: str | bytes) -> None:
        """Wake the drain of the conversation a queue message names; raise to have it retried
        (a `TurnFailed` naming only the failure's kind)."""
        ticket = TurnTicket.from_json(message)
        assert self.conductor is not None, "the turn queue needs an inbox"
        # Its own span and metrics, as activity type "answer": the webhook's "message" is the accept.
        with turn_context(ticket.conversation_id, ticket.activity_id), \
                turn("answer", ticket.conversation_id) as stats:
            stats.status = 500  # until done
            log.info("picked up after %.0f ms (%s)", (time.time() - ticket.enqueued_at) * 1000,
                     ticket.kind)
            failed = ""
            try:
                await self.conductor.wake(ticket)
            except Exception as exc:
                failed = type(exc).__name__
                log.warning("the wake-up failed; the queue retries it: %s", failed)
            if failed:  # raised out here: no chained exception carries its text along
                raise TurnFailed(failed)
            stats.status = 200

    async def answer_unit(self, unit: Unit) -> UnitOutcome:
        """Answer one unit of a conversation's order (`shared/order.py`)."""
        if unit.kept and all(kept.withdrawn for kept in unit.kept):
            await self._withdrawn(unit)
            return Answered()
        read = await self._read(unit)
        if len(read) < len(unit.kept) and await self._withdrawn_since(unit, read):
            # A stream of the chat ended just now: the rest's stream keeps Teams' pace after it.
            unit = replace(unit, streamed_at=time.time())
        if not read:
            return Answered()
        activities = [activity for activity, _ in read]
        with turn_context(unit.conversation_id, activities[-1].id):
            if unit.kind == "parked":
                return await self._parked(unit, activities)
            # The stream the webhook opened (for the unit's first message, if it went first),
            # and the message whose reply ends it: the turn's reply goes there.
            stream, owner = next(((kept.stream, activity) for activity, kept in read
                                  if kept.stream is not None), (None, None))
            if stream is None and any(kept.opening for _, kept in read):
                stream, owner = await self._opened(unit, [activity for activity, _ in read])
            if unit.kind == "reset":
                await self._reset(activities[0], stream, paced_after=unit.streamed_at)
                return Answered()
            try:
                checked, _, stream = await self._check(activities, stream,
                                                       paced_after=unit.streamed_at)
                if not checked:
                    return Answered()
                reply_to = owner if stream is not None and owner is not None \
                    else checked[-1].activity
                refused, kept_stream = False, True
                if stream is None and self.delivery.streams(reply_to):
                    # It waited behind another turn: its stream starts now, kept with its
                    # message so a worker that takes over after a crash ends it.
                    stream = await self.delivery.open_stream(reply_to,
                                                             paced_after=unit.streamed_at)
                    refused = stream is None  # not asked again in this turn
                    if stream is not None:
                        kept_stream = await self._keep_stream(unit, reply_to, stream)
                progress = self.delivery.progress(reply_to, resume=stream, updates=not unit.retried,
                                                  paced_after=unit.streamed_at, streams=not refused)
                try:
                    outcome, window = await self._queued_turn(
                        lambda: self._run(checked, progress, kept=True), reply_to, progress,
                        first=checked[0].activity.id)
                    if isinstance(outcome, Failed) and not kept_stream and \
                            progress.stream is not None and progress.stream.start is not None:
                        # Nobody else knows this stream: the next attempt could not end it.
                        await self.delivery.text(reply_to, INTERRUPTED, progress=progress)
                finally:
                    await progress.close()
            except ConnectorError as exc:  # not delivered: the retry re-sends it
                log.warning("the reply was not delivered: %s", exc)
                return Failed(reason=type(exc).__name__)
        if window is not None:
            await self._after_reply(reply_to, window)
        return outcome

    async def _keep_stream(self, unit: Unit, reply_to: Activity, stream: StreamStart) -> bool:
        """Keep the start of the stream this turn opened (a worker taking over after a crash
        ends it); False if that fails: the turn goes on with it, and ends it itself, even when
        the turn fails."""
        assert self.inbox is not None
        try:
            await self.inbox.keep_stream(unit.conversation_id, reply_to.id, stream)
        except StoreError as exc:
            log.warning("the stream's start was not kept (the turn goes on with it): %s", exc)
            return False
        return True

    async def _opened(self, unit: Unit, activities: Sequence[Activity],
                      ) -> tuple[StreamStart | None, Activity | None]:
        """The webhook is opening the stream of one of the unit's messages (it went first): its
        start once kept, and the message it answers; (None, None) when the channel refused it,
        or when it is not kept within `OPENING_SECONDS` (the webhook died: answered without)."""
        assert self.inbox is not None
        by_id = {activity.id: activity for activity in activities}
        deadline = time.monotonic() + OPENING_SECONDS
        while time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            kept = [k for k in await self.inbox.waiting(unit.conversation_id)
                    if k.activity_id in by_id]
            found = next(((k.stream, by_id[k.activity_id]) for k in kept if k.stream), None)
            if found is not None:
                return found
            if not any(k.opening for k in kept):
                return None, None
        log.warning("the stream the webhook was opening was not kept in time; answering "
                    "without it")
        return None, None

    async def _withdrawn(self, unit: Unit) -> bool:
        """Messages withdrawn while they waited (their sender's removal): end the stream opened
        for any of them, saying why (nothing else is sent, nothing asked or stored). True when
        a stream was ended."""
        ended = False
        assert self.inbox is not None
        for kept in unit.kept:
            stream = kept.stream
            if stream is None and kept.opening:  # the webhook is keeping its start
                deadline = time.monotonic() + OPENING_SECONDS
                while stream is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    now = next((k for k in await self.inbox.waiting(unit.conversation_id)
                                if k.activity_id == kept.activity_id), None)
                    if now is None or not now.opening:
                        stream = now.stream if now is not None else None
                        break
            reference = await self.inbox.reference(unit.conversation_id, kept.activity_id)
            if stream is None or reference is None:
                continue
            try:
                activity = parse_activity(reference, _HEADERS)
            except BadRequest:
                continue
            if activity.conversation_id != unit.conversation_id or \
                    not self.reply_allowed(activity.service_url):
                continue  # (checked as any activity read back)
            await self._say(activity, WITHDRAWN, resume=stream, paced_after=unit.streamed_at)
            ended = True
            log.info("ended the stream of a message withdrawn while it waited")
        return ended

    async def _withdrawn_since(self, unit: Unit, read: Sequence[tuple[Activity, Kept]]) -> bool:
        """Messages of `unit` withdrawn after it was planned (their sender's removal came between
        the listing and the read, so `_read` found no body): end the streams opened for them, as
        for a unit planned withdrawn; the drain forgets their stubs with the unit."""
        assert self.inbox is not None
        gone = set(unit.activity_ids) - {activity.id for activity, _ in read}
        withdrawn = tuple(kept for kept in await self.inbox.waiting(unit.conversation_id)
                          if kept.withdrawn and kept.activity_id in gone)
        return bool(withdrawn) and await self._withdrawn(replace(unit, kept=withdrawn))

    async def give_up(self, unit: Unit) -> bool:
        """The unit's last attempt failed: one apology, ending the stream its first message has;
        unless its turn was stored after all (the commit's answer was lost on its way back):
        then its stored reply goes out instead. True when the unit is answered so."""
        read = await self._read(unit)
        if not read:
            return False
        stream, reply_to = next(((kept.stream, activity) for activity, kept in read
                                 if kept.stream is not None), (None, read[-1][0]))
        try:
            turn = await self.store.get_turn(unit.conversation_id, read[0][0].id)
        except ChatstateError as exc:
            log.warning("could not tell whether the turn was stored: %s", type(exc).__name__)
            turn = None
        if turn is not None and not set(unit.activity_ids) <= set(turn.answered):
            turn = None  # an earlier turn's, for part of the unit: the unit was not answered
        try:
            if turn is None:
                await self._say(reply_to, APOLOGY, resume=stream, paced_after=unit.streamed_at)
                return False
            log.info("the turn was stored after all; its reply goes out instead of an apology")
            if not turn.delivered:
                progress = self.delivery.progress(reply_to, resume=stream, updates=False,
                                                  paced_after=unit.streamed_at)
                try:
                    await self.delivery.reply(reply_to, turn, progress=progress)
                finally:
                    await progress.close()
        except Exception as exc:
            log.error("neither the apology nor the stored reply was sent: %s", type(exc).__name__)
            return False  # given up: its record goes to the poison queue
        return True

    async def parked(self, unit: Unit, pending: Pending) -> Pending:
        """A turn was parked: ask the person (its waiter sends the card)."""
        waiter = self.waiters.get(pending.kind)
        read = await self._read(unit)
        if waiter is None or not read:
            return pending
        return await waiter.ask(unit, pending, read[-1][0])

    async def _parked(self, unit: Unit, activities: list[Activity]) -> UnitOutcome:
        pending = unit.parked
        assert pending is not None and self.inbox is not None
        waiter = self.waiters.get(pending.kind)
        saved = await self.inbox.load_turn(unit.conversation_id, unit.activity_ids[-1])
        if waiter is None or saved is None:
            log.warning("a parked turn (%s) cannot be resumed here; dropped", pending.kind)
            return Answered()
        if pending.decided:
            return await waiter.resume(unit, pending, activities, saved)
        why = "superseded" if unit.superseded else "expired"
        await waiter.close(unit, pending, activities, saved, why=why)
        return Answered()

    async def _read(self, unit: Unit) -> list[tuple[Activity, Kept]]:
        """The unit's activities as kept, each checked again: one the webhook would refuse now
        (not a message, or a serviceUrl off the reply allow-list) is dropped, with a log line."""
        assert self.inbox is not None
        bodies = await asyncio.gather(*(self.inbox.load(unit.conversation_id, kept.activity_id)
                                        for kept in unit.kept))
        activities: list[tuple[Activity, Kept]] = []
        for kept, body in zip(unit.kept, bodies, strict=True):
            activity_id = kept.activity_id
            if body is None:
                continue
            try:
                activity = parse_activity(body, _HEADERS)
            except BadRequest as exc:
                log.warning("a kept activity is unreadable (%s); dropped", exc)
                continue
            if activity.id != activity_id or activity.conversation_id != unit.conversation_id:
                log.warning("a kept activity is not the one its row names; dropped")
                continue
            if activity.type != "message" or not activity.service_url or \
                    not self.reply_allowed(activity.service_url):
                log.warning("a kept activity's serviceUrl is not allowed for replies; dropped "
                            "unanswered (nothing sent there)")
                continue
            activities.append((activity, kept))
        return activities

    # -- the steps ---------------------------------------------------------------------------

    async def _reset(self, activity: Activity, stream: StreamStart | None, *,
                     paced_after: float = 0.0) -> dict[str, Any] | None:
        await self.store.clear(activity.conversation_id)
        log.info("cleared the conversation on /reset")
        return await self._say(activity, RESET_DONE, resume=stream, paced_after=paced_after)

    async def _check(self, activities: Sequence[Activity], stream: StreamStart | None, *,
                     paced_after: float = 0.0,
                     ) -> tuple[list[_Message], dict[str, Any] | None, StreamStart | None]:
        """Each message with its files read and its size checked; those refused are answered
        here (in order; the first refusal ends `stream`), the rest returned, with the refusal's
        outgoing activity (for expectReplies) and the stream if it is still open."""
        budget = self.settings.model.history_token_budget
        passed: list[_Message] = []
        outgoing: dict[str, Any] | None = None
        used = 0
        for activity in activities:
            text = activity.message_text
            incoming = await self.attachments.read(activity, text, token_budget=budget - used)
            if isinstance(incoming, Refusal):
                log.info("attachments refused: %s", incoming.reason)
                outgoing = await self._say(activity, incoming.reply, resume=stream,
                                           paced_after=paced_after)
                stream = None
                continue
            try:  # the images' tokens as the model's context counts them (shared/tokens.py)
                needed = check_input(incoming.text, token_budget=budget - used) + \
                    incoming.image_tokens
            except (InputTooLong, MessageTooLarge) as exc:
                log.info("message too long to answer: %s", exc)
                tokens = exc.tokens if isinstance(exc, InputTooLong) else len(incoming.text) // 3
                outgoing = await self._say(activity, TOO_LONG.format(tokens=tokens, budget=budget),
                                           resume=stream, paced_after=paced_after)
                stream = None
                continue
            used += needed
            passed.append(_Message(activity=activity, text=incoming.text, needed=needed,
                                   incoming=incoming))
        return passed, outgoing, stream

    async def _say(self, activity: Activity, text: str, *, resume: StreamStart | None,
                   paced_after: float = 0.0) -> dict[str, Any] | None:
        """A reply of ours without a turn: it ends the stream the webhook opened, if any (at
        Teams' pace after `paced_after`, the chat's last stream request as the head knows it)."""
        if resume is None:
            return await self.delivery.text(activity, text)
        progress = self.delivery.progress(activity, resume=resume, updates=False,
                                          paced_after=paced_after)
        try:
            return await self.delivery.text(activity, text, progress=progress)
        finally:
            await progress.close()

    async def _run(self, messages: Sequence[_Message], progress: Progress, *,
                   kept: bool = False) -> TurnResult:
        """The turn of `messages`; `kept`: they are kept in the inbox (queued), and a turn whose
        messages were withdrawn meanwhile (a user's removal) stores nothing."""
        last = messages[-1]
        earlier = [UserInput(text=m.text, speaker=m.activity.speaker, sender=m.activity.user,
                             attachments=m.incoming, activity_id=m.activity.id)
                   for m in messages[:-1]]
        still_wanted = None
        if kept and self.inbox is not None:
            inbox, conversation = self.inbox, last.activity.conversation_id
            ids = [m.activity.id for m in messages]

            async def still_wanted() -> bool:
                return all(await asyncio.gather(*(inbox.load(conversation, i) for i in ids)))

        return await self.turns.run(last.activity, last.text,
                                    needed=sum(m.needed for m in messages),
                                    stream=progress.stream, attachments=last.incoming,
                                    earlier=earlier, still_wanted=still_wanted)

    async def _turn(self, messages: Sequence[_Message], reply_to: Activity, progress: Progress,
                    apologize: bool) -> tuple[dict[str, Any] | None, ConversationWindow | None]:
        """The inline turn: a failure is the apology, or raised."""
        try:
            result = await self._run(messages, progress)
        except ModelError as exc:
            # A setup problem (401/403/404) is told at once: a retry would fail the same way.
            setup = isinstance(exc, ModelMisconfigured)
            log.log(logging.ERROR if setup else logging.WARNING, "model failed (%s): %s",
                    type(exc).__name__, exc)
            if not (apologize or setup):
                raise
            return await self.delivery.text(reply_to, SETUP_PROBLEM if setup else APOLOGY,
                                             progress=progress), None
        if isinstance(result, Busy):
            raise Unanswered(f"other turns kept committing first ({result.attempts} attempts)")
        if isinstance(result, TurnPaused):  # only the turn queue can wait for a person
            log.info("a tool asks first, and inline answers cannot wait; nothing ran")
            return await self.delivery.text(reply_to, NO_APPROVALS, progress=progress), None
        return await self._deliver(result, reply_to, progress)

    async def answer_resumed(self, unit: Unit, activities: Sequence[Activity], resume: Resume,
                             needed: int) -> UnitOutcome:
        """Go on with a parked turn a person answered (`shared/approvals.py`): the held round as
        decided, then the model; the answer goes to the unit's last message."""
        reply_to = activities[-1]
        try:
            # The paused turn's stream was ended and forgotten (`Approvals.ask`): one kept now is
            # this resumed turn's, from an attempt that failed; else it opens its own, kept.
            stream = next((kept.stream for kept in unit.kept if kept.stream is not None), None)
            refused = False
            if stream is None and self.delivery.streams(reply_to):
                stream = await self.delivery.open_stream(reply_to, paced_after=unit.streamed_at)
                refused = stream is None  # not asked again in this turn
                if stream is not None:
                    await self._keep_stream(unit, reply_to, stream)
            progress = self.delivery.progress(reply_to, resume=stream, updates=not unit.retried,
                                              paced_after=unit.streamed_at, streams=not refused)
            try:
                outcome, window = await self._queued_turn(
                    lambda: self.turns.run(reply_to, "", needed=needed, stream=progress.stream,
                                           resume=resume), reply_to, progress,
                    first=unit.activity_ids[0])
            finally:
                await progress.close()
        except ConnectorError as exc:  # not delivered: the retry re-sends it
            log.warning("the reply was not delivered: %s", exc)
            return Failed(reason=type(exc).__name__)
        if window is not None:
            await self._after_reply(reply_to, window)
        return outcome

    async def _queued_turn(self, run: Callable[[], Awaitable[TurnResult]], reply_to: Activity,
                           progress: Progress, *,
                           first: str) -> tuple[UnitOutcome, ConversationWindow | None]:
        """The turn in the drain: a transient failure is `Failed` (the drain tries again); a
        turn that waits for a person is parked (`Paused`). `first`: the unit's first message
        (the one a turn found committed before answered)."""
        try:
            result = await run()
        except ModelMisconfigured as exc:
            log.error("model failed (%s): %s", type(exc).__name__, exc)
            await self.delivery.text(reply_to, SETUP_PROBLEM, progress=progress)
            return Answered(), None
        except ModelError as exc:
            log.warning("model failed (%s): %s", type(exc).__name__, exc)
            return Failed(reason=type(exc).__name__), None
        except ChatstateError as exc:
            log.warning("the turn failed (%s): %s", type(exc).__name__, exc)
            return Failed(reason=type(exc).__name__), None
        if isinstance(result, Busy):
            return Failed(reason="Busy"), None
        if isinstance(result, Withdrawn):
            if progress.stream is not None and progress.stream.start is not None:
                await self.delivery.text(reply_to, WITHDRAWN, progress=progress)  # end it
            return Answered(), None
        if isinstance(result, TurnPaused):
            return await self._pause(result, reply_to, progress), None
        if isinstance(result, Found):
            await self._redeliver(reply_to, result, progress)
            # Only what that earlier turn answered (its first message, when a clear has taken
            # the turn): the rest of the unit is answered next.
            answered = result.turn.answered if result.turn is not None else (first,)
            return Answered(activity_ids=answered), None
        outgoing, window = await self._deliver(result, reply_to, progress)
        del outgoing
        return Answered(), window

    async def _pause(self, paused: TurnPaused, reply_to: Activity,
                     progress: Progress) -> UnitOutcome:
        """Park a turn that waits for a person: its record and state for the drain; a stream
        open for it ends with a note (the card follows as its own message)."""
        waiter = self.waiters.get(paused.paused.held[0].reason)  # a held call's reason: its kind
        if waiter is None:
            await self.delivery.text(reply_to, NO_APPROVALS, progress=progress)
            return Answered()
        parked = await waiter.park(paused.paused, reply_to)
        if progress.stream is not None:  # the waiter's own words, or an approval's
            await self.delivery.text(reply_to, getattr(waiter, "note", PAUSE_NOTE),
                                     progress=progress)
        return parked

    async def _deliver(self, result: Committed | Found | Refused | Withdrawn, reply_to: Activity,
                       progress: Progress) -> tuple[dict[str, Any] | None, ConversationWindow | None]:
        if isinstance(result, Committed):
            return await self.delivery.reply(reply_to, result.turn, progress=progress,
                                             suggestions=result.suggestions), result.window
        if isinstance(result, Found):
            return await self._redeliver(reply_to, result, progress), None
        if isinstance(result, Refused):
            return await self.delivery.text(reply_to, result.text, progress=progress), None
        return None, None

    async def _redeliver(self, activity: Activity, found: Found,
                         progress: Progress) -> dict[str, Any] | None:
        """A retry of a committed activity: re-send its stored reply if it never went out."""
        if found.turn is not None and activity.expects_replies:
            return await self.delivery.reply(activity, found.turn)  # the response is the delivery
        if found.turn is None or found.turn.delivered or not found.send:
            log.info("duplicate activity acknowledged without a model call")
            return None
        log.info("re-sending the stored reply")
        return await self.delivery.reply(activity, found.turn, progress=progress)

    async def _after_reply(self, activity: Activity, window: ConversationWindow) -> None:
        """Prepare the summary a later turn will need, now that the reply is delivered."""
        if self.summarizer is None or not window.summary_due:
            return
        spend = None
        if self.settings.data.count_summary_tokens and self.turns.budgets is not None:
            spend = self.turns.budgets.for_turn(  # the summary's call, in the user's budgets
                activity, max_reply_tokens=self.summarizer.token_budget)
        work = asyncio.create_task(self.summarizer.after_turn(window, spend=spend))
        if not activity.expects_replies:
            await work
            return
        self._background.add(work)  # with expectReplies it runs after the response
        work.add_done_callback(self._background.discard)
