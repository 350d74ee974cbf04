"""A conversation's order: one worker at a time answers its accepted messages, oldest first.

    queue ticket → the order head → held by a live worker? a wake-up at the hold's end; done
                                  → take the hold → drain: plan a unit → answer it → forget it → …
                                  → release (if nothing arrived meanwhile; else drain on)

The queue message is a wake-up, not the unit of order: whichever worker takes the conversation's
hold (a conditional write of the inbox's order head, `shared/inbox.py`) answers everything the
conversation has waiting, in arrival order, one unit at a time (`plan`), renewing the hold in
the background. A worker that finds the conversation held completes its message after queueing a
wake-up for when the hold would expire: if the holder dies, that wake-up takes over; if it lives,
it will have answered the message. The release is conditioned on the head's ETag, and every
arrival writes the head, so a message accepted while the holder was about to let go is never
stranded: the release fails and the drain goes on.

A unit (`plan`): a burst (consecutive messages of one sender, answered in one turn; `CHAT_BURST`
each: one message a unit), a `/reset` (a barrier: everything before it is answered first), or a
parked turn (a person's decision: resumed when decided, closed when expired or superseded by a
newer message, else left waiting with the hold released). A unit that fails is tried again after
`retry_seconds`; after `max_attempts` the user gets one apology (recorded on its rows, so a retry
of what follows neither asks nor apologises again) and a text-free record goes to the poison
queue. A drain that has run `drain_seconds` hands the rest to a fresh wake-up, so one
invocation stays inside the function timeout. A drain that fails (storage) lets its hold expire
at once, before its wake-up is retried: the next drain takes over as from a worker that died.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from .errors import ChatstateError
from .inbox import Inbox, Kept, OrderHead, TurnTicket
from .pending import Pending

__all__ = ["Answered", "Conductor", "Failed", "Paused", "Unit", "UnitAnswerer", "UnitOutcome", "Wait",
           "plan"]

log = logging.getLogger(__name__)

UnitKind = Literal["messages", "reset", "parked"]


@dataclass(frozen=True, kw_only=True)
class Unit:
    """What one turn of the drain answers: kept activities of one conversation, oldest first."""

    conversation_id: str
    kind: UnitKind
    kept: tuple[Kept, ...]
    #: A parked unit's record; `superseded`: newer messages wait behind it.
    parked: Pending | None = None
    superseded: bool = False
    #: When (epoch s) the conversation's last stream request may have gone out (pacing).
    streamed_at: float = 0.0
    #: The first unit after a dead worker's hold expired: it may have been started already.
    resumed: bool = False

    @property
    def activity_ids(self) -> tuple[str, ...]:
        return tuple(kept.activity_id for kept in self.kept)

    @property
    def retried(self) -> bool:
        """An earlier attempt at this unit may have shown something (send only the final)."""
        return self.resumed or any(kept.attempts for kept in self.kept)


@dataclass(frozen=True, kw_only=True)
class Wait:
    """Nothing to answer before `until` (a retry's backoff; a parked turn's expiry)."""

    until: float
    #: Queue a wake-up for `until` (a parked turn's own was queued when it was parked).
    wake: bool = True


def plan(kept: Sequence[Kept], head: OrderHead, *, now: float, burst: bool,
         max_burst: int) -> Unit | Wait | None:
    """The next unit of a conversation's waiting activities (arrival order), or what to wait for,
    or None: nothing waits. Pure: the drain's one decision, tested on its own."""
    if not kept:
        return None
    first = kept[0]
    parked = head.parked
    if parked is not None and first.activity_id in parked.activity_ids:
        unit = tuple(k for k in kept if k.activity_id in parked.activity_ids)
        behind = len(kept) > len(unit)
        if parked.waiting and not behind and not parked.expired(now):
            return Wait(until=parked.expires_at, wake=False)
        return Unit(conversation_id=head.conversation_id, kind="parked", kept=unit, parked=parked,
                    superseded=behind and parked.waiting, streamed_at=head.streamed_at)
    if first.not_before > now:
        return Wait(until=first.not_before)
    if first.reset:
        return Unit(conversation_id=head.conversation_id, kind="reset", kept=(first,),
                    streamed_at=head.streamed_at)
    taken = [first]
    for item in kept[1:max_burst if burst else 1]:
        if item.reset or item.sender != first.sender or item.not_before > now or \
                item.given_up != first.given_up or item.withdrawn != first.withdrawn:
            break
        taken.append(item)
    return Unit(conversation_id=head.conversation_id, kind="messages", kept=tuple(taken),
                streamed_at=head.streamed_at)


@dataclass(frozen=True, kw_only=True)
class Answered:
    """The unit is done (answered, refused, or given up): forget `activity_ids` (None: all)."""

    activity_ids: tuple[str, ...] | None = None


@dataclass(frozen=True, kw_only=True)
class Failed:
    """The unit failed; try it again later. `reason` is ours (a kind), never outside text."""

    reason: str


@dataclass(frozen=True, kw_only=True)
class Paused:
    """The turn waits for a person: park it with `pending`, its state `saved`."""

    pending: Pending
    saved: bytes


UnitOutcome = Answered | Failed | Paused


class UnitAnswerer(Protocol):
    """The answer side of the drain (`shared/answer.py`)."""

    async def answer_unit(self, unit: Unit) -> UnitOutcome: ...

    async def give_up(self, unit: Unit) -> bool: ...

    async def parked(self, unit: Unit, pending: Pending) -> Pending: ...


class HoldLost(Exception):
    """Another worker took the conversation (this one's hold expired under it)."""


class Conductor:
    def __init__(self, *, inbox: Inbox, answerer: UnitAnswerer, burst: bool = True,
                 max_burst: int = 8, hold_seconds: float = 30.0, drain_seconds: float = 60.0,
                 retry_seconds: float = 5.0, max_attempts: int = 5,
                 clock: Callable[[], float] = time.time) -> None:
        """`hold_seconds`: how long a hold lasts unless renewed (what a crashed worker costs its
        conversation); `drain_seconds`: after this long, hand the rest to a fresh wake-up."""
        self.inbox = inbox
        self.answerer = answerer
        self.burst = burst
        self.max_burst = max_burst
        self.hold_seconds = hold_seconds
        self.drain_seconds = drain_seconds
        self.retry_seconds = retry_seconds
        self.max_attempts = max_attempts
        self.clock = clock

    async def wake(self, ticket: TurnTicket) -> None:
        """Answer what `ticket`'s conversation has waiting, unless another worker does."""
        look = await self.inbox.look(ticket.conversation_id, ticket.activity_id)
        if not look.kept and not (look.head is not None and look.head.waiting):
            log.info("nothing kept for this activity: answered already; nothing to do")
            return
        # (Its own activity answered, others waiting: a drain let go and could not queue their
        # wake-up; this one, retried, answers them.)
        me = secrets.token_hex(8)
        now = self.clock()
        head = look.head or OrderHead(conversation_id=ticket.conversation_id)
        if head.held(now) and head.holder != me:
            return await self._later(ticket, head)
        crashed: list[bool] = []

        def take(current: OrderHead) -> OrderHead | None:
            if current.held(self.clock()):
                return None
            # An expired hold: its worker died (or failed) mid-drain.
            crashed[:] = [bool(current.holder)]
            return replace(current, holder=me, held_until=self.clock() + self.hold_seconds)

        taken = await self.inbox.change_head(ticket.conversation_id, take, read=look.head)
        if taken is None:
            current = await self.inbox.read_head(ticket.conversation_id)
            return await self._later(ticket, current or head)
        log.info("holding the conversation%s", " (taken over from a worker that stopped)"
                 if crashed and crashed[0] else "")
        await self._drain(taken, me, after_crash=bool(crashed and crashed[0]))

    async def _later(self, ticket: TurnTicket, head: OrderHead) -> None:
        """Another worker holds the conversation: it answers this message, or, if it dies, the
        wake-up queued here (at the hold's end) takes over."""
        delay = max(1.0, head.held_until - self.clock()) + random.uniform(0.0, 1.0)
        log.info("the conversation is being answered elsewhere; waking again in %.0f s", delay)
        await self.inbox.enqueue(replace(ticket, kind="wake", enqueued_at=time.time()),
                                 delay=delay)

    async def _drain(self, head: OrderHead, me: str, *, after_crash: bool) -> None:
        """Answer the conversation's units in order while holding it. `head`: as the take wrote it."""
        started = self.clock()
        hold = _Hold(self, head, me)
        renewing = asyncio.create_task(hold.renew_until_done())
        try:
            while True:
                # The head first: every activity up to its `last_seq` is in the listing after it
                # (an arrival writes its row and the head in one transaction); later ones wait
                # for the next round, and make the release fail. The first round plans with the
                # head the take just wrote; the others read it again.
                kept = [k for k in await self.inbox.waiting(head.conversation_id)
                        if k.seq <= head.last_seq]
                step = plan(kept, head, now=self.clock(), burst=self.burst,
                            max_burst=self.max_burst)
                if step is None or isinstance(step, Wait) or \
                        self.clock() - started > self.drain_seconds:
                    if await hold.release(kept, step, planned_with=head):
                        return
                    head = await hold.current()
                    continue  # something arrived as we let go: drain on
                if after_crash:  # its stream may have gone further than the row says
                    step, after_crash = replace(step, resumed=True), False
                finished = await self._answer(step, hold)
                # Everything listed is answered: let go now, unless the head changed since it
                # was read (an arrival), saving the read and the listing that would find nothing.
                if finished and len(step.kept) == len(kept) and \
                        await hold.release((), None, planned_with=head):
                    return
                head = await hold.current()
        except HoldLost:
            log.warning("another worker took the conversation over; stopping here")
        except Exception:
            # The queue retries this wake-up: let go now rather than make it wait for the hold
            # to expire (a transient storage error would otherwise stall the conversation).
            await hold.abandon()
            raise
        finally:
            hold.done = True
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)

    async def _answer(self, unit: Unit, hold: _Hold) -> bool:
        """Answer `unit`; True when every activity of it is answered and forgotten."""
        if any(kept.given_up for kept in unit.kept):  # told already; forgetting it failed
            await self._forget(unit, "given up", hold)
            return False
        try:
            outcome = await self.answerer.answer_unit(unit)
        except Exception as exc:
            log.error("answering failed unexpectedly (%s); counted as a failed attempt",
                      type(exc).__name__)
            outcome = Failed(reason=type(exc).__name__)
        hold.check()
        if isinstance(outcome, Answered):
            ids = outcome.activity_ids if outcome.activity_ids is not None else unit.activity_ids
            await self.inbox.remove(unit.conversation_id, ids)
            if unit.parked is not None:
                await hold.change(lambda head: replace(head, parked=None))
            return set(unit.activity_ids) <= set(ids)
        if isinstance(outcome, Paused):
            await self._park(unit, outcome, hold)
        else:
            await self._failed(unit, outcome, hold)
        return False

    async def _park(self, unit: Unit, paused: Paused, hold: _Hold) -> None:
        """Keep the turn so far with its last activity, the question on the head; then ask."""
        pending = replace(paused.pending, activity_ids=unit.activity_ids)
        await self.inbox.save_turn(unit.conversation_id, unit.activity_ids[-1], paused.saved)
        await hold.change(lambda head: replace(head, parked=pending))
        asked = await self.answerer.parked(unit, pending)
        if asked != pending:  # the card's ID, to refresh it later
            await hold.change(lambda head: replace(head, parked=asked)
                              if head.parked is not None and head.parked.id == asked.id else None)
        ticket = TurnTicket(conversation_id=unit.conversation_id,
                            activity_id=unit.activity_ids[-1], enqueued_at=time.time(), kind="wake")
        await self.inbox.enqueue(ticket, delay=max(0.0, pending.expires_at - self.clock()) + 1.0)
        log.info("the turn waits for a person (%s)", pending.kind)

    async def _failed(self, unit: Unit, failed: Failed, hold: _Hold) -> None:
        attempts = max(k.attempts for k in unit.kept) + 1
        if attempts < self.max_attempts:
            log.warning("the turn failed (%s), attempt %d of %d; trying again in %.0f s",
                        failed.reason, attempts, self.max_attempts, self.retry_seconds)
            await self.inbox.mark_attempt(unit.conversation_id, unit.kept,
                                          not_before=self.clock() + self.retry_seconds)
            return
        log.error("the turn failed on its last attempt (%d: %s); apologising; a record goes to "
                  "the poison queue", attempts, failed.reason)
        if await self.answerer.give_up(await self._as_kept_now(unit)):
            await self.inbox.remove(unit.conversation_id, unit.activity_ids)  # answered after all
            if unit.parked is not None:
                await hold.change(lambda head: replace(head, parked=None))
            return
        # Recorded before it is forgotten: if that fails, the retry neither asks the model nor
        # apologises again.
        await self.inbox.mark_given_up(unit.conversation_id, unit.activity_ids)
        await self._forget(unit, failed.reason, hold)

    async def _as_kept_now(self, unit: Unit) -> Unit:
        """`unit` with its rows as its last attempt left them: the plan was listed before that
        attempt, which may have opened its stream and kept it with a message since (a message
        that waited behind another turn), and the apology must end that stream."""
        now = {kept.activity_id: kept for kept in await self.inbox.waiting(unit.conversation_id)}
        return replace(unit, kept=tuple(now.get(kept.activity_id, kept) for kept in unit.kept))

    async def _forget(self, unit: Unit, reason: str, hold: _Hold) -> None:
        """A given-up unit: a text-free record of each message in the poison queue, then gone."""
        for kept in unit.kept:
            await self.inbox.poison(TurnTicket(conversation_id=unit.conversation_id,
                                               activity_id=kept.activity_id, enqueued_at=time.time()),
                                    reason=reason)
        await self.inbox.remove(unit.conversation_id, unit.activity_ids)
        if unit.parked is not None:
            await hold.change(lambda head: replace(head, parked=None))


class _Hold:
    """One drain's hold on a conversation: renewed in the background, changed and released
    through the inbox's one head-change path (each write conditioned on the head's ETag)."""

    def __init__(self, conductor: Conductor, head: OrderHead, me: str) -> None:
        self._conductor = conductor
        self._inbox = conductor.inbox
        self._head = head
        self._me = me
        self._lock = asyncio.Lock()
        self.lost = False
        self.done = False

    def check(self) -> None:
        if self.lost:
            raise HoldLost()

    async def current(self) -> OrderHead:
        """The head as now stored (read after the rows it plans with were listed)."""
        async with self._lock:
            head = await self._inbox.read_head(self._head.conversation_id)
            if head is None or head.holder != self._me:
                self.lost = True
                raise HoldLost()
            self._head = head
            return head

    async def change(self, change: Callable[[OrderHead], OrderHead | None]) -> None:
        """Change the head while holding it (the hold renewed with it)."""
        async with self._lock:
            written = await self._inbox.change_head(
                self._head.conversation_id, lambda head: self._mine(head, change), read=self._head)
            if written is None:
                self.lost = True
                raise HoldLost()
            self._head = written

    def _mine(self, head: OrderHead, change: Callable[[OrderHead], OrderHead | None]) -> OrderHead | None:
        if head.holder != self._me:
            return None
        changed = change(head) or head
        return replace(changed, held_until=self._conductor.clock() + self._conductor.hold_seconds)

    async def renew_until_done(self) -> None:
        interval = self._conductor.hold_seconds / 3
        while not self.done:
            await asyncio.sleep(interval)
            try:
                await self.change(lambda head: head)
            except HoldLost:
                log.warning("the hold on the conversation was lost")
                return
            except ChatstateError as exc:
                log.warning("the hold was not renewed (trying again): %s", exc)

    async def abandon(self) -> None:
        """Let the conversation go after a failure, leaving its order as it is: the hold expires
        now, its holder named, so the next drain takes it over as from a worker that died (its
        first unit may have been begun: a stream resumed sends only its final). Best effort: if
        this fails too, the hold expires in its time."""
        def let_go(head: OrderHead) -> OrderHead | None:
            if head.holder != self._me:
                return None
            # (a stream of ours may have sent its last request a moment ago: Teams' pace)
            return replace(head, held_until=0.0, streamed_at=time.time())

        self.done = True
        try:
            async with self._lock:
                await self._inbox.change_head(self._head.conversation_id, let_go, read=self._head)
        except ChatstateError as exc:
            log.warning("the hold was not let go (it expires): %s", exc)

    async def release(self, kept: Sequence[Kept], step: Unit | Wait | None, *,
                      planned_with: OrderHead) -> bool:
        """Let the conversation go, unless the head changed since `planned_with`, the head read
        before `kept` was listed: an activity arrived, or a parked turn was answered (a person's
        decision, a sign-in). True when released. A wait's wake-up is queued; an unfinished
        drain's rest gets one now."""
        waiting = [k.seq for k in kept]

        def release(head: OrderHead) -> OrderHead | None:
            # Drain on rather than leave the change to a wake-up that waits for this hold.
            if head.holder != self._me or head.last_seq != planned_with.last_seq or \
                    head.parked != planned_with.parked:
                return None
            done = min(waiting) - 1 if waiting else head.last_seq
            # `streamed_at`: a stream of ours may have ended a moment ago; the next one (the
            # webhook's) keeps Teams' pace of one streaming request a second per chat.
            return replace(head, holder="", held_until=0.0, done_seq=max(head.done_seq, done),
                           streamed_at=time.time())

        async with self._lock:
            released = await self._inbox.change_head(self._head.conversation_id, release,
                                                     read=self._head)
        if released is None:
            return False  # an arrival (or a lost hold: the next read says which)
        self.done = True
        if kept:
            delay = 0.0
            if isinstance(step, Wait):
                if not step.wake:
                    log.info("released; a turn waits for a person")
                    return True
                delay = max(0.0, step.until - self._conductor.clock())
            await self._inbox.enqueue(TurnTicket(
                conversation_id=self._head.conversation_id, activity_id=kept[0].activity_id,
                enqueued_at=time.time(), kind="wake"), delay=delay)
        log.info("released the conversation")
        return True
