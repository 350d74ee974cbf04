"""What the production path did in a torture round, as observed, and the order invariants.

The randomized concurrency test (`torture.py`) drives the webhook, the inbox, the real queue and
the answer workers (`halves.py`). This module watches them without changing what they do: each
worker's `Inbox.accept` (the arrival number it gave: an `Arrival`), its `Answerer.answer_unit` and
`give_up` (each unit a drain answered, from when to when, and how it ended: a `UnitRun`), every
storage call (a `Call`, tagged with the operation, conversation and unit it served), and the
connector stand-in (`Channel`: the moment each request and message arrived). A message or a
stopped stream is then the deed of the latest unit of its conversation that holds the activity it
replies to and began before it arrived. From those records it checks what the conversation's
order promises (docs/operate.md, "One conversation, one order"): `ORDER_INVARIANTS`.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from devtools.fake_channel import FakeConnector
from devtools.teams_streams import Stream
from shared.answer import APOLOGY, INTERRUPTED, RESET_DONE
from shared.bot import ChatBot
from shared.errors import ConnectorError
from shared.keys import encode_key
from shared.messages import ChatMessage

__all__ = ["ORDER_INVARIANTS", "Arrival", "Call", "Channel", "Deed", "Observer", "UnitRun",
           "current_conversation", "current_op", "current_unit", "tick", "timeline"]

ORDER_INVARIANTS = (
    "order: a conversation's stored user messages are in arrival order (the number the inbox "
    "gave each), and its units are answered one at a time",
    "answered once: each acknowledged message is answered (alone or in a burst's one reply), or "
    "apologised for (with a text-free poison record), or withdrawn by its sender's removal, or "
    "cleared away by a clear that came after it was accepted, exactly once (the same reply sent "
    "again only where its worker died, or a storage call failed, before it was recorded; a "
    "channel's redelivery is never answered again, even after a clear); none is left waiting",
    "reset barrier: nothing accepted before a /reset is stored or answered after that reset's "
    "confirmation",
    "no open stream: at quiescence every stream opened has ended (its final message, or the "
    "user's Stop) and no request broke Teams' rules (malformed, overlapping, throttled)",
)

_TICKS = itertools.count()
#: What a storage call served: the operation of the history (-1: a worker's), the conversation,
#: and the unit being answered (its activity IDs; () outside one).
current_op: contextvars.ContextVar[int] = contextvars.ContextVar("torture_op", default=-1)
current_conversation: contextvars.ContextVar[str] = contextvars.ContextVar("torture_conv",
                                                                          default="")
current_unit: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("torture_unit",
                                                                              default=())


def tick() -> int:
    """The round's clock: every moment recorded is a number from one counter."""
    return next(_TICKS)


@dataclass
class Call:
    """One storage call: whose, what, and when it was sent and answered (ticks)."""

    op: int
    method: str
    url: str
    sent: int
    role: str = "store"
    slot: int = 0
    conversation: str = ""
    unit: tuple[str, ...] = ()
    answered: int = -1
    status: int = 0
    #: Failed on purpose (not sent, or its answer lost); `dead`: its worker had been killed.
    injected: bool = False
    dead: bool = False

    def on_head(self, pk: str) -> bool:
        """A call on the store's head row of partition `pk` (as `encode_key` makes it)."""
        url = unquote(self.url)
        quoted = pk.replace("'", "''")
        return f"PartitionKey='{quoted}'" in url and "RowKey='h'" in url

    @property
    def commit(self) -> bool:
        """A store transaction (a turn's commit, in a unit of messages)."""
        return self.role == "store" and self.method == "POST" and "$batch" in self.url


#: The place of an acceptance whose answer was lost (it may have been kept, or not).
UNKNOWN = -1


@dataclass(frozen=True)
class Arrival:
    """An accepted message: the place `Inbox.accept` gave it in its conversation's order
    (`UNKNOWN`: the accept failed, perhaps after keeping it)."""

    op: int
    conversation: str
    activity_id: str
    seq: int
    sender: str
    reset: bool
    tick: int


@dataclass
class UnitRun:
    """One call of a worker's `answer_unit` (or `give_up`) for a unit of a conversation."""

    slot: int
    conversation: str
    #: The unit's kind (`messages`, `reset`, `parked`), or `give_up` (its last attempt failed).
    kind: str
    activity_ids: tuple[str, ...]
    start: int
    end: int = -1
    #: The `UnitOutcome`'s class name, `killed` (its worker died), or the exception's kind.
    outcome: str = ""
    #: What it answered: its outcome's activities (a turn found committed before answers only
    #: what that turn did), else all of its own.
    answered: tuple[str, ...] = ()

    @property
    def covered(self) -> tuple[str, ...]:
        """The activities what it sent answers."""
        return self.answered or self.activity_ids


@dataclass(frozen=True)
class Deed:
    """Something the user saw for a unit: a message (`index` in `Channel.activities`), or a
    stream they stopped (`stream`; its text is what they read)."""

    run: UnitRun
    text: str
    tick: int
    index: int = -1
    stream: Stream | None = None


#: The key each request a worker sends carries its worker's number in (`Observer.attach`).
WORKER_KEY = "torture_worker"


class Channel(FakeConnector):
    """The connector stand-in, with the moment (tick) each request and each message arrived, and
    each second stream refused while one was open."""

    def __init__(self) -> None:
        super().__init__()
        self.ticks: list[int] = []  # of `activities` (the messages taken)
        self.request_ticks: list[int] = []  # of `requests`
        self.overlap_ticks: list[int] = []  # of `streams.overlapping`

    async def _post(self, request: web.Request) -> web.Response:
        try:
            return await super()._post(request)
        finally:  # (before this handler's answer, after its request and message were recorded)
            for ticks, seen in ((self.request_ticks, self.requests), (self.ticks, self.activities),
                                (self.overlap_ticks, self.streams.overlapping)):
                ticks += [tick() for _ in range(len(seen) - len(ticks))]

    def stream_ticks(self, stream: Stream) -> list[int]:
        """When each request naming `stream` arrived (all but its first update)."""
        return [self.request_ticks[i] for i, record in enumerate(self.requests[:len(self.request_ticks)])
                if any(isinstance(e, dict) and e.get("streamId") == stream.id
                       for e in record["activity"].get("entities") or [])]


class Observer:
    """Watches every worker of a round (`attach` is `halves`' `on_bot`)."""

    def __init__(self, channel: Channel, calls: list[Call]) -> None:
        self.channel = channel
        self.calls = calls
        self.arrivals: list[Arrival] = []
        self.runs: list[UnitRun] = []
        #: Each worker a slot has had (numbered from 0), and when each killed one died.
        self.workers: dict[int, int] = {}
        self.killed: dict[int, int] = {}
        self._numbers = itertools.count()

    def kill(self, slot: int) -> None:
        """The slot's worker dies now: from here it sends nothing to the connector."""
        self.killed[self.workers[slot]] = tick()

    def attach(self, slot: int, bot: ChatBot) -> None:
        """Observe `bot`'s accepts and the units its drains answer (instance attributes over its
        methods: the code under test runs unchanged); number its requests to the connector."""
        inbox, answerer = bot.inbox, bot.answerer
        assert inbox is not None
        number = self.workers[slot] = next(self._numbers)
        accept, ticket, answer_unit, give_up = (inbox.accept, answerer.answer_ticket,
                                                answerer.answer_unit, answerer.give_up)
        send = bot.connector.send

        async def sending(*, service_url: str, conversation_id: str,
                          activity: dict[str, Any]) -> str | None:
            if number in self.killed:
                raise ConnectorError("the worker died")
            return await send(service_url=service_url, conversation_id=conversation_id,
                              activity={**activity, WORKER_KEY: number})

        async def accepting(body: bytes, **options: Any) -> Any:
            def arrived(seq: int) -> None:
                self.arrivals.append(Arrival(
                    op=current_op.get(), conversation=options["conversation_id"],
                    activity_id=options["activity_id"], seq=seq,
                    sender=options.get("sender", ""), reset=options.get("reset", False),
                    tick=tick()))

            try:
                place = await accept(body, **options)
            except Exception:
                arrived(UNKNOWN)  # its answer may have been lost after it was kept
                raise
            if place is not None:
                arrived(place.seq)
            return place

        async def waking(message: str | bytes) -> None:
            current_op.set(-1)
            try:
                current_conversation.set(str(json.loads(message)["conversationId"]))
            except (ValueError, KeyError, TypeError):
                pass  # a bad ticket: the answerer says so
            await ticket(message)

        async def answering(unit: Any) -> Any:
            return await self._run(slot, unit, unit.kind, answer_unit)

        async def giving_up(unit: Any) -> Any:
            return await self._run(slot, unit, "give_up", give_up)

        bot.connector.send = sending  # type: ignore[method-assign]
        inbox.accept = accepting  # type: ignore[method-assign]
        answerer.answer_ticket = waking  # type: ignore[method-assign]
        answerer.answer_unit = answering  # type: ignore[method-assign]
        answerer.give_up = giving_up  # type: ignore[method-assign]

    async def _run(self, slot: int, unit: Any, kind: str,
                   work: Callable[[Any], Awaitable[Any]]) -> Any:
        run = UnitRun(slot=slot, conversation=unit.conversation_id, kind=kind,
                      activity_ids=tuple(unit.activity_ids), start=tick())
        self.runs.append(run)
        token = current_unit.set(run.activity_ids)
        try:
            outcome = await work(unit)
        except asyncio.CancelledError:
            run.outcome = "killed"
            raise
        except Exception as exc:
            run.outcome = type(exc).__name__
            raise
        finally:
            current_unit.reset(token)
            run.end = tick()
        run.outcome = type(outcome).__name__ if outcome is not None else "done"
        if (reason := getattr(outcome, "reason", None)) is not None:
            run.outcome += f"({reason})"  # a kind of ours, never outside text
        answered = getattr(outcome, "activity_ids", None)
        if answered is not None:
            run.answered = tuple(answered)
        return outcome

    # -- what each unit did --------------------------------------------------------------------

    def deeds(self) -> list[Deed]:
        """Every message sent and every stream stopped, each with the unit that did it."""
        deeds: list[Deed] = []
        for index, activity in enumerate(self.channel.activities):
            if activity.get("type") != "message":
                continue  # a typing indicator
            if activity.get("text") == INTERRUPTED:
                continue  # a failed attempt ended its unkept stream: the next one answers
            at = self.channel.ticks[index] if index < len(self.channel.ticks) else tick()
            run = self._doer(activity, at)
            if run is not None:
                deeds.append(Deed(run=run, text=str(activity.get("text") or ""), tick=at,
                                  index=index))
        for stream in self.channel.streams.streams.values():
            if not stream.cancel or not stream.updates:
                continue
            at = max(self.channel.stream_ticks(stream), default=-1)
            run = self._doer(stream.updates[0], at)
            if run is not None:
                deeds.append(Deed(run=run, text=stream.text, tick=at, stream=stream))
        return deeds

    def unattributed(self) -> list[dict[str, Any]]:
        """Messages no unit sent (none should be: the webhook only opens streams)."""
        return [a for i, a in enumerate(self.channel.activities) if a.get("type") == "message"
                and self._doer(a, self.channel.ticks[i] if i < len(self.channel.ticks) else tick())
                is None]

    def _doer(self, activity: dict[str, Any], at: int) -> UnitRun | None:
        conversation = str((activity.get("conversation") or {}).get("id", ""))
        reply_to = str(activity.get("replyToId") or "")
        runs = [r for r in self.runs if r.conversation == conversation
                and reply_to in r.activity_ids and r.start < at]
        return max(runs, key=lambda r: r.start, default=None)

    def stored_arrivals(self) -> dict[tuple[str, str], Arrival]:
        """(conversation, activity) → the acceptance whose turn stored it: the latest before
        the last unit holding it that sent a commit and was answered began (one the webhook let
        go of when it could not queue its wake-up is sent again by the channel, and takes a later
        place; so does a redelivery after its first turn was withdrawn or cleared)."""
        committing: dict[tuple[str, str], int] = {}
        for run in sorted(self.runs, key=lambda r: r.start):
            if run.outcome == "Answered" and any(
                    c.commit and c.unit == run.activity_ids and c.conversation == run.conversation
                    and run.start <= c.sent <= run.end for c in self.calls):
                for activity in run.activity_ids:
                    committing[(run.conversation, activity)] = run.start
        found: dict[tuple[str, str], Arrival] = {}
        for arrival in sorted(self.arrivals, key=lambda a: a.tick):
            key = (arrival.conversation, arrival.activity_id)
            if key in committing and arrival.tick < committing[key]:
                found[key] = arrival
        return found

    def first_seq(self) -> dict[tuple[str, str], int]:
        """(conversation, activity) → the first place it was given."""
        seqs: dict[tuple[str, str], int] = {}
        for arrival in self.arrivals:
            if arrival.seq == UNKNOWN:
                continue
            key = (arrival.conversation, arrival.activity_id)
            seqs[key] = min(seqs.get(key, arrival.seq), arrival.seq)
        return seqs


# -- the invariants ------------------------------------------------------------------------------


def check_order(observer: Observer, visible: dict[str, list[ChatMessage]]) -> list[str]:
    """Stored user messages in arrival order; a conversation's units never overlap in time."""
    problems: list[str] = []
    seqs = {key: arrival.seq for key, arrival in observer.stored_arrivals().items()}
    for conversation, rows in visible.items():
        stored = [(m.activity_id, seqs.get((conversation, str(m.activity_id))))
                  for m in rows if m.role == "user"]
        placed = [(a, s) for a, s in stored if s is not None and s != UNKNOWN]
        for (before, seq_before), (after, seq_after) in itertools.pairwise(placed):
            if seq_after <= seq_before:
                problems.append(f"order: in {conversation}, {after} (arrival {seq_after}) is "
                                f"stored after {before} (arrival {seq_before})")
    by_conversation: dict[str, list[UnitRun]] = defaultdict(list)
    for run in observer.runs:
        by_conversation[run.conversation].append(run)
    for conversation, runs in by_conversation.items():
        runs.sort(key=lambda r: r.start)
        for earlier, later in itertools.pairwise(runs):
            if later.start < earlier.end:
                problems.append(f"order: in {conversation}, unit {list(later.activity_ids)} "
                                f"(worker {later.slot}) began while unit "
                                f"{list(earlier.activity_ids)} (worker {earlier.slot}) ran")
    return problems


@dataclass(frozen=True)
class Excuses:
    """What the torture knows beside the observation: when users' removals and conversations'
    clears ran, which activities a POST acknowledged, and which calls failed."""

    #: user → (start, end) ticks of each removal that completed.
    removals: dict[str, list[tuple[int, int]]]
    #: conversation → start ticks of the clears run on it (DELETE, purge, removal, /reset).
    clears: dict[str, list[int]]
    #: Activities a POST was answered 200 for (the channel was told they were taken).
    acknowledged: set[tuple[str, str]]
    calls: list[Call]
    #: Activities a user's removal withdrew (their text-free stub written), even if it failed
    #: later on.
    withdrawn: set[str]
    #: Whether two replies are the same reply (one of ours worded anew, as a limit's wait).
    same_reply: Callable[[str, str], bool]


def check_answered_once(observer: Observer, excuses: Excuses,
                        visible: dict[str, list[ChatMessage]], waiting: Iterable[tuple[str, str]],
                        ) -> list[str]:
    """Each acknowledged message seen to once: answered, apologised for, or withdrawn; an
    answer sent again only as the same stored reply, after its sender died or a call failed."""
    problems = [f"answered once: {conversation} still keeps {activity} at quiescence (stranded)"
                for conversation, activity in waiting]
    seen: dict[tuple[str, str], list[Deed]] = defaultdict(list)
    for deed in observer.deeds():
        for activity in deed.run.covered:
            seen[(deed.run.conversation, activity)].append(deed)
    problems += [f"answered once: a message no unit sent: {a.get('text')!r} replying to "
                 f"{a.get('replyToId')}" for a in observer.unattributed()]
    stored = {(c, str(m.activity_id)) for c, rows in visible.items() for m in rows
              if m.role == "user"}
    senders = {(a.conversation, a.activity_id): (a.sender, a.tick) for a in observer.arrivals}
    for key in sorted({(a.conversation, a.activity_id) for a in observer.arrivals}):
        conversation, activity = key
        deeds = sorted(seen.get(key, []), key=lambda d: d.tick)
        sender, accepted = senders[key]
        if not deeds:
            if key not in excuses.acknowledged:
                continue  # the webhook failed: the channel was told to send it again
            withdrawn = activity in excuses.withdrawn or \
                any(end > accepted for _, end in excuses.removals.get(sender, []))
            cleared = key not in stored and any(at > accepted for at in
                                                excuses.clears.get(conversation, []))
            if not (withdrawn or cleared):
                problems.append(f"answered once: {activity} in {conversation} (arrival "
                                f"{observer.first_seq().get(key, '?')}) was never answered")
            continue
        first, *again = deeds
        for deed in again:
            if excuses.same_reply(first.text, deed.text) and \
                    _unmarked(first, observer.runs, excuses.calls):
                continue  # the same reply sent again: what records it as sent may have failed
            problems.append(f"answered once: {activity} in {conversation} was answered "
                            f"{len(deeds)} times: {[d.text[:60] for d in deeds]}")
            break
    return problems


def check_poisoned(observer: Observer, records: list[bytes]) -> list[str]:
    """Each message apologised for has a record in the poison queue, and no record holds text
    from outside (the torture's messages are `<conversation>|<activity>|<variant>`)."""
    problems = [f"answered once: a poison record holds a message's text: {r[:80]!r}"
                for r in records if b"|" in r]
    recorded = set()
    for record in records:
        try:
            data = json.loads(record)
            recorded.add((str(data["conversationId"]), str(data["activityId"])))
        except (ValueError, KeyError, TypeError):
            problems.append(f"answered once: an unreadable poison record {record[:80]!r}")
    for deed in observer.deeds():
        if deed.run.kind == "give_up" and deed.text == APOLOGY:
            problems += [f"answered once: {a} in {deed.run.conversation} was apologised for "
                         f"but has no poison record" for a in deed.run.covered
                         if (deed.run.conversation, a) not in recorded]
    return problems


def _unmarked(deed: Deed, runs: list[UnitRun], calls: list[Call]) -> bool:
    """What records `deed` as done may have failed: its worker was killed, or a storage call of
    that worker in its conversation failed after it was sent and before the conversation's next
    unit began (the delivered mark, the removal of the answered rows, the given-up mark)."""
    run = deed.run
    after = [r.start for r in runs if r.conversation == run.conversation and r.start > deed.tick]
    until = min(after, default=1 << 62)
    return run.outcome == "killed" or any(
        (c.injected or c.dead) and c.conversation == run.conversation and c.slot == run.slot
        and deed.tick < c.sent < until for c in calls)


def check_reset_barrier(observer: Observer, calls: list[Call],
                        visible: dict[str, list[ChatMessage]]) -> list[str]:
    """Nothing accepted before a confirmed /reset (and not accepted again after it) is stored
    or answered after the confirmation."""
    problems: list[str] = []
    deeds = observer.deeds()
    arrivals: dict[tuple[str, str], list[int]] = defaultdict(list)
    for arrival in observer.arrivals:
        arrivals[(arrival.conversation, arrival.activity_id)].append(arrival.seq)
    seqs = observer.first_seq()
    unknown = {key for key, places in arrivals.items() if UNKNOWN in places}
    for confirmation in (d for d in deeds if d.run.kind == "reset" and d.text == RESET_DONE):
        conversation, reset = confirmation.run.conversation, confirmation.run.activity_ids[0]
        barrier = seqs.get((conversation, reset))
        if barrier is None:
            continue
        before = {a for (c, a), places in arrivals.items() if c == conversation and a != reset
                  and max(places) < barrier and (c, a) not in unknown}
        for deed in deeds:
            if deed.run.conversation == conversation and deed.tick > confirmation.tick and \
                    before.intersection(deed.run.covered) and deed.run.kind != "reset":
                problems.append(f"reset barrier: in {conversation}, {sorted(before & set(deed.run.covered))} "
                                f"accepted before /reset {reset} was answered after its "
                                f"confirmation: {deed.text[:60]!r}")
        for call in calls:
            if call.commit and call.conversation == conversation and \
                    call.sent > confirmation.tick and before.intersection(call.unit):
                problems.append(f"reset barrier: in {conversation}, a commit of "
                                f"{sorted(before & set(call.unit))} was sent after /reset "
                                f"{reset} was confirmed")
                break
        for message in visible.get(conversation, []):
            if message.role == "user" and message.activity_id in before:
                problems.append(f"reset barrier: in {conversation}, {message.activity_id}, "
                                f"accepted before /reset {reset}, is still stored")
    return problems


def check_streams(observer: Observer) -> list[str]:
    """Teams' rules, as the connector stand-in saw them, once everything is answered. A stream
    whose worker was killed before anyone else could end it (between opening it and keeping its
    start) stays open, as it would in Teams until its two minutes run out, and later streams of
    that chat are refused meanwhile: what a crash costs, not a broken rule."""
    channel = observer.channel
    contract = channel.streams
    orphans: dict[str, int] = {}  # conversation → when its first orphan opened
    problems = [f"no open stream: violation: {v}" for v in contract.violations]
    problems += [f"no open stream: throttled: {t}" for t in contract.throttled]
    for stream in contract.open():
        requests = [(channel.request_ticks[i], record["activity"].get(WORKER_KEY))
                    for i, record in enumerate(channel.requests[:len(channel.request_ticks)])
                    if record["conversation_id"] == stream.conversation_id
                    and _names(record["activity"], stream)]
        last_tick, worker = max(requests, key=lambda r: r[0], default=(-1, None))
        died = observer.killed.get(worker) if isinstance(worker, int) else None
        if died is not None and died > last_tick:
            first = min(t for t, _ in requests)
            orphans[stream.conversation_id] = min(orphans.get(stream.conversation_id, first), first)
            continue
        problems.append(f"no open stream: never ended: {stream.id} in {stream.conversation_id}")
    for conversation, at in zip(contract.overlapping, channel.overlap_ticks, strict=False):
        if not (conversation in orphans and at > orphans[conversation]):
            problems.append(f"no open stream: overlapping stream in {conversation}")
    return problems


def _names(activity: dict[str, Any], stream: Stream) -> bool:
    """`activity` is one of `stream`'s requests (its first update, or one naming its ID)."""
    if stream.updates and activity is stream.updates[0]:
        return True
    return any(isinstance(e, dict) and e.get("streamId") == stream.id
               for e in activity.get("entities") or [])


def hiding_moment(calls: Iterable[Call], conversation: str) -> int | None:
    """When the first successful write of `conversation`'s store head among `calls` was
    answered (a clear's hiding write); None: it wrote none."""
    pk = encode_key(conversation)
    for call in calls:
        if call.role == "store" and call.on_head(pk) and call.method in ("PUT", "MERGE", "PATCH") \
                and 200 <= call.status < 300:
            return call.answered
    return None


def timeline(observer: Observer, conversation: str) -> list[str]:
    """What happened in `conversation`, moment by moment (to read a failure by): acceptances,
    units, messages and stream requests, and the writes of the inbox and the store."""
    channel = observer.channel
    events: list[tuple[int, str]] = []
    for a in observer.arrivals:
        if a.conversation == conversation:
            events.append((a.tick, f"accepted #{a.seq} {a.activity_id} (op #{a.op})"
                                   f"{' /reset' if a.reset else ''}"))
    for r in observer.runs:
        if r.conversation == conversation:
            events.append((r.start, f"worker {r.slot}: {r.kind} {list(r.activity_ids)} begins"))
            events.append((r.end, f"worker {r.slot}: {r.kind} {list(r.activity_ids)} -> "
                                  f"{r.outcome}"))
    for number, at in observer.killed.items():
        events.append((at, f"worker #{number} killed"))
    for i, record in enumerate(channel.requests[:len(channel.request_ticks)]):
        activity = record["activity"]
        if record["conversation_id"] != conversation:
            continue
        info = next((e for e in activity.get("entities") or [] if isinstance(e, dict)
                     and e.get("type") == "streaminfo"), {})
        kind = info.get("streamType") or activity.get("type")
        events.append((channel.request_ticks[i],
                       f"connector <- {kind} (worker #{activity.get(WORKER_KEY)}) replying to "
                       f"{activity.get('replyToId')} stream={info.get('streamId')} "
                       f"{str(activity.get('text') or '')[:50]!r}"))
    for c in observer.calls:
        if c.conversation == conversation and c.role in ("store", "inbox") and \
                c.method not in ("GET",):
            where = unquote(c.url.split("?")[0]).rsplit("/", 1)[-1][-60:]
            events.append((c.sent, f"{c.role} {c.method} {where} op={c.op} unit="
                                   f"{list(c.unit)} -> {c.status}"
                                   f"{' INJECTED' if c.injected else ''}{' DEAD' if c.dead else ''}"))
    return [f"{at:7d} {text}" for at, text in sorted(events)]
