"""The randomized concurrency test: seeded random interleavings of every operation, checked.

    python -m tests.integration.torture [--seed N] [--rounds N | --duration SECONDS]
    (`make torture SEED=… ROUNDS=…` or `DURATION=…`; a short run is in tests/integration)

Each round runs the production path on one Azurite table and one real queue (`halves.py`): the
webhook's code accepts each message (`ChatBot.handle`, queue mode) into the inbox with its place in
its conversation's order and queues a wake-up; two answer workers, each its own `ChatBot` and its
own stand-in of the Functions host's queue trigger, hold conversations and drain them, replying
through the contract-enforcing Bot Connector stand-in. A seeded random history, its operations
started at random moments so they overlap: turns (new, delivered again by the channel, bursts of
several messages from one sender, tool loops cut by the round limit, replies over the daily token
limit, replies streamed into a Teams personal chat and streams the user stops midway, turns whose
model call fails on every attempt: the apology and the poison record), /reset, DELETE
conversation, a user's export and removal (`shared/removal.py`, which covers messages still
waiting), retention purges, summary preparation and feedback, and budgets (users' and tenants'
daily tokens and users' turns a minute: turns whose tool round is followed by a failing model
call, and reservations left by dead workers; `BUDGET_KINDS`); and faults: workers killed at random
moments (a fresh one takes the slot; the dead one's hold stays until it expires), extra queue
messages (duplicate and delayed wake-ups), and storage calls delayed, failed or their answers lost
at random (a per-call policy on every table and queue client, the trigger's included). Once every
accepted message is seen to, the invariants (`INVARIANTS`) are checked against a model of what was
accepted and acknowledged, with moments taken from the storage calls, the units the workers
answered and the connector's requests (`torture_order.py`). A failing round prints its seed and
the shortest history that still fails (operations dropped one at a time and the round run again).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import functools
import itertools
import json
import logging
import os
import random
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import unquote

from azure.core.exceptions import ServiceRequestError, ServiceResponseError
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import AsyncHTTPPolicy
from azure.data.tables.aio import TableClient

from devtools.azurite import STORAGE_ENV, given_or_started
from shared.answer import APOLOGY, INTERRUPTED, RESET_DONE, WITHDRAWN
from shared.errors import ChatstateError
from shared.inbox import Inbox, TurnTicket, inbox_table_name
from shared.keys import encode_key
from shared.ledger import Account, Reservation
from shared.limits import LIMIT_REPLIES
from shared.messages import ChatMessage, Feedback, utc_day, utc_now
from shared.removal import forget_user
from shared.store import REMOVED_MARKER, TableConversationStore
from shared.tokens import count_text_tokens
from tests.integration.halves import HEADERS, Halves, halves
from tests.integration.queue_host import queue_client
from tests.integration.torture_model import (
    STREAMED,
    TOKENS_PER_CALL,
    CutStream,
    ScriptedModel,
    tenant_of,
)
from tests.integration.torture_order import (
    ORDER_INVARIANTS,
    Call,
    Channel,
    Deed,
    Excuses,
    Observer,
    check_answered_once,
    check_order,
    check_poisoned,
    check_reset_barrier,
    check_streams,
    current_conversation,
    current_op,
    current_unit,
    hiding_moment,
    tick,
    timeline,
)

__all__ = ["INVARIANTS", "Op", "run_round", "torture"]

INVARIANTS = (
    "lost: no answered message (a reply sent, or a stream the user stopped in a turn that was "
    "answered) is lost, unless a clear (reset, DELETE, purge, a personal chat's removal) whose "
    "hiding write was answered after the message's commit was sent removed it",
    "visible: nothing is visible after the clear that hid it (answered before the clear's "
    "hiding write was sent)",
    "once: each activity is stored at most once, and every reply sent for it is the same answer",
    "exportable: every stored message of a user is in their export, until removed; and gone or "
    "redacted after their removal if it was answered before the removal's head write, or "
    "accepted before the removal began",
    "spend: the spend counters equal the tokens billed by the model, a stopped stream's as "
    "the request and the text the user read (conversations whose storage calls met no "
    "injected failure and whose workers were not killed)",
    "stopped: a reply the user stopped midway is stored as the text they saw, marked stopped",
    "budgets: each user's and tenant's ledger counts the tokens the model billed for them (a "
    "failed call as its request; accounts whose ledger writes met no injected failure and whose "
    "calls no killed worker made), and no ledger's settled tokens pass its limit (every call "
    "billed within its reservation)",
    *ORDER_INVARIANTS,
)

USERS = ("29:u1", "29:u2", "29:u3")
DAILY_LIMIT = 40 * TOKENS_PER_CALL
#: The budgets: a call reserves its prompt and REPLY_MAX; a user has room for about 8 calls a
#: day and 8 turns a minute, a tenant for about 12 calls.
REPLY_MAX = 200
USER_DAILY_LIMIT = 8 * TOKENS_PER_CALL
USER_TURNS_PER_MINUTE = 8
TENANT_DAILY_LIMIT = 12 * TOKENS_PER_CALL
#: Stop is pressed once the stream has taken this many updates (the informative one and one of
#: text): the next update is refused as canceled, before the answer ends.
STOP_AFTER_UPDATES = 2
#: The operations of a round start within this many seconds of its beginning.
SPREAD_SECONDS = 3.0
#: A worker's hold, its drain's turn, and the lease of a queue message it took (seconds): short,
#: so a killed worker's conversation is taken over within the round.
HOLD_SECONDS = 5
DRAIN_SECONDS = 5
LEASE_SECONDS = 4
#: Quiescence: every accepted message seen to and the workers idle, within this long.
SETTLE_SECONDS = 90.0
#: The channel sends a message again when the webhook answered 5xx, this many times.
CHANNEL_RETRIES = 2
#: Replies that are not an answer the turn stored (the budget replies begin with these words).
_NOT_ANSWERS = {APOLOGY, INTERRUPTED, RESET_DONE, WITHDRAWN, *LIMIT_REPLIES.values()}
_BUDGET_REPLIES = ("You've reached your daily usage limit", "Your organization has reached",
                   "You're sending messages faster than I can answer across")


def _is_answer(reply: str | None) -> bool:
    return reply is not None and reply not in _NOT_ANSWERS and not reply.startswith(_BUDGET_REPLIES)


@dataclass(frozen=True)
class Op:
    """One operation of a history: what, on which conversation, by whom, on which worker."""

    index: int
    kind: str
    conversation: str = ""
    user: str = ""
    activity_id: str = ""
    instance: int = 0
    delay: float = 0.0
    variant: str = ""
    #: A burst's number of messages.
    count: int = 0
    #: A queue message's visibility delay (seconds).
    after: float = 0.0

    def __str__(self) -> str:
        args = " ".join(f"{name}={value}" for name, value in (
            ("conv", self.conversation), ("user", self.user), ("activity", self.activity_id),
            ("on", self.instance), ("variant", self.variant), ("count", self.count or ""),
            ("after", f"{self.after:.1f}s" if self.after else "")) if value != "")
        return f"#{self.index} +{self.delay * 1000:.0f}ms {self.kind} {args}"


@dataclass
class Outcome:
    start: int
    end: int = -1
    status: int = 0
    error: str | None = None


class Recorder(AsyncHTTPPolicy):  # type: ignore[type-arg]
    """Records every storage call of one client with what it served and its moments; injects
    the seeded faults (not sent, or sent and its answer lost); a dead worker's calls all fail."""

    def __init__(self, state: Round, rng: random.Random, *, role: str, slot: int) -> None:
        super().__init__()
        self.state, self.rng, self.role, self.slot = state, rng, role, slot
        self.dead = False

    async def send(self, request: PipelineRequest) -> PipelineResponse:  # type: ignore[type-arg]
        http, state = request.http_request, self.state
        call = Call(op=current_op.get(), method=http.method, url=http.url, sent=-1,
                    role=self.role, slot=self.slot, conversation=current_conversation.get(),
                    unit=current_unit.get())
        state.calls.append(call)
        if self.dead:
            call.dead, call.sent = True, tick()
            raise ServiceRequestError("the worker died")
        on = state.faults_on
        if on and self.rng.random() < state.delay_rate:
            await asyncio.sleep(self.rng.uniform(0, state.max_delay))
        call.sent = tick()
        fail = on and self.rng.random() < state.fail_rate
        if fail and self.rng.random() < 0.5:
            call.injected, call.answered = True, tick()
            raise ServiceRequestError("injected fault: not sent")
        response = await self.next.send(request)
        call.answered, call.status = tick(), response.http_response.status_code
        if fail:  # it was done; the caller cannot know
            call.injected = True
            raise ServiceResponseError("injected fault: the answer was lost")
        return response


#: The budgets' own operations: a turn whose tool round is followed by a failing model call, and
#: a reservation left in a user's or tenant's ledger by a worker that died (it expires).
BUDGET_KINDS = ("fail", "fail", "expire")
#: The order's own: bursts, a model that fails a turn on every attempt, extra wake-ups, kills.
ORDER_KINDS = ("burst", "burst", "poison", "ticket", "ticket", "kill")
#: The operations a history draws from, as often as they are listed.
KINDS = ("turn",) * 8 + ("loop", "duplicate", "duplicate", "duplicate", "reset", "delete",
                         "export", "forget", "purge", "summary", "summary", "feedback",
                         "feedback", "streamed", "streamed", "stopped") + BUDGET_KINDS + ORDER_KINDS


def history(rng: random.Random, round_id: str, length: int,
            kinds: tuple[str, ...] = KINDS) -> list[Op]:
    """A random history of `length` operations on three conversations of one round."""
    conversations = {f"{round_id}-g": None, f"a:{round_id}-p1": USERS[0],
                     f"a:{round_id}-p2": USERS[1]}
    ops: list[Op] = []
    activities: list[tuple[str, str, str, str]] = []

    def new_id() -> str:
        return uuid.UUID(int=rng.getrandbits(128)).hex[:12]

    for index in range(length):
        kind = rng.choice(list(kinds))
        conversation = rng.choice(list(conversations))
        owner = conversations[conversation]
        user = owner or rng.choice(USERS)
        instance, delay = rng.randrange(2), rng.uniform(0, SPREAD_SECONDS)
        if kind == "duplicate" and activities:  # delivered again the way it first came
            conversation, user, activity_id, variant = rng.choice(activities)
            ops.append(Op(index, "turn", conversation, user, activity_id, instance, delay, variant))
            continue
        if kind in STREAMED and owner is None:  # Teams streams in personal chats only
            conversation = rng.choice([c for c, o in conversations.items() if o is not None])
            user = conversations[conversation] or user
        if kind in ("turn", "loop", "fail", "duplicate", "reset", "poison", *STREAMED):
            activity_id = new_id()
            variant = kind if kind in ("loop", "fail", "poison", *STREAMED) else ""
            if kind != "reset":
                activities.append((conversation, user, activity_id, variant))
            ops.append(Op(index, "reset" if kind == "reset" else "turn", conversation, user,
                          activity_id, instance, delay, variant))
        elif kind == "burst":  # one thought in several messages; in Teams, streamed
            base, count = new_id()[:9], rng.randint(2, 4)
            variant = "streamed" if owner is not None and rng.random() < 0.5 else ""
            activities += [(conversation, user, f"{base}b{i}", variant) for i in range(count)]
            ops.append(Op(index, "burst", conversation, user, base, instance, delay, variant,
                          count=count))
        elif kind == "ticket" and activities:  # the queue hands out a wake-up again, or late
            conversation, _, activity_id, _ = rng.choice(activities)
            ops.append(Op(index, "ticket", conversation, activity_id=activity_id,
                          delay=delay, variant=rng.choice(("arrival", "wake")),
                          after=rng.choice((0.0, rng.uniform(0.5, 3.0)))))
        elif kind == "feedback":
            ops.append(Op(index, "feedback", conversation, instance=instance, delay=delay))
        elif kind in ("export", "forget"):
            ops.append(Op(index, kind, user=rng.choice(USERS), instance=instance, delay=delay))
        elif kind in ("purge", "kill"):
            ops.append(Op(index, kind, instance=instance, delay=delay))
        elif kind in ("delete", "summary"):
            ops.append(Op(index, kind, conversation, instance=instance, delay=delay))
        elif kind == "expire":  # a dead worker's reservation, in the user's or the tenant's ledger
            ops.append(Op(index, "expire", conversation, user, instance=instance, delay=delay,
                          variant=rng.choice(("user", "tenant"))))
    return ops


#: The bots' budgets (a failing model call is one request: halves has the SDK try once).
BUDGET_SETTINGS = {"CHAT_USER_DAILY_TOKEN_LIMIT": str(USER_DAILY_LIMIT),
                   "CHAT_USER_TURNS_PER_MINUTE": str(USER_TURNS_PER_MINUTE),
                   "CHAT_TENANT_DAILY_TOKEN_LIMIT": str(TENANT_DAILY_LIMIT),
                   "CHAT_MAX_REPLY_TOKENS": str(REPLY_MAX)}


def _activity(op: Op, activity_id: str, text: str, *, service_url: str) -> bytes:
    """A message as the channel posts it: Teams in a personal chat for a streamed turn (the reply
    streams), else a channel that does not stream (the reply is one message)."""
    tenant = tenant_of(op.conversation)
    if op.variant in STREAMED:
        return json.dumps({"type": "message", "id": activity_id, "text": text,
                           "channelId": "msteams", "serviceUrl": service_url,
                           "conversation": {"id": op.conversation, "conversationType": "personal",
                                            "tenantId": tenant},
                           "from": {"id": op.user}, "recipient": {"id": "28:bot"}}).encode()
    return json.dumps({"type": "message", "id": activity_id, "text": text,
                       "channelId": "test", "serviceUrl": service_url,
                       "conversation": {"id": op.conversation, "tenantId": tenant,
                                        "isGroup": op.conversation.endswith("-g")},
                       "from": {"id": op.user}, "recipient": {"id": "28:bot"}}).encode()


@dataclass
class Round:
    connection_string: str
    seed: int
    ops: list[Op]
    fail_rate: float = 0.03
    delay_rate: float = 0.2
    max_delay: float = 0.05
    #: `CHAT_BURST` of the round's workers.
    burst: str = "together"
    calls: list[Call] = field(default_factory=list)
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    model: ScriptedModel = field(default_factory=lambda: ScriptedModel(random.Random(0)))
    channel: Channel = field(default_factory=Channel)
    observer: Observer | None = None
    faults_on: bool = False
    #: Each worker slot's storage recorders (marked dead when the worker is killed).
    recorders: dict[int, list[Recorder]] = field(default_factory=lambda: defaultdict(list))
    #: (conversation, activity) the webhook answered 200 for.
    acknowledged: set[tuple[str, str]] = field(default_factory=set)
    #: Activities still kept when the round settled (or gave up waiting).
    waiting: list[tuple[str, str]] = field(default_factory=list)
    #: The poison queue's records at quiescence.
    poisoned: list[bytes] = field(default_factory=list)
    kills: int = 0
    tickets: int = 0
    spend_checked: int = 0
    budgets_checked: int = 0
    #: Stop presses waiting for their stream to show.
    pressing: set[asyncio.Task[None]] = field(default_factory=set)


async def run_round(state: Round) -> list[str]:
    """Run `state.ops` on a fresh table and queue; the invariants' violations (none: passed)."""
    table_name = "torture" + uuid.uuid4().hex[:12]
    rng = random.Random(state.seed)
    state.model = ScriptedModel(random.Random(rng.getrandbits(64)))
    state.observer = observer = Observer(state.channel, state.calls)

    def policies(slot: int, role: str) -> list[Recorder]:
        recorder = Recorder(state, random.Random(rng.getrandbits(64)), role=role, slot=slot)
        state.recorders[slot].append(recorder)
        return [recorder]

    day = utc_day(utc_now())
    state.model.press_stop = functools.partial(_press_stop, state)
    async with state.channel, halves(
            state.connection_string, table_name, state.model, state.channel, workers=2,
            lease=LEASE_SECONDS, policies=policies, on_bot=observer.attach, summaries=True,
            CHAT_HOLD_SECONDS=str(HOLD_SECONDS), CHAT_DRAIN_SECONDS=str(DRAIN_SECONDS),
            CHAT_BURST=state.burst, CHAT_TURN_MAX_ATTEMPTS="4",
            CHAT_DAILY_TOKEN_LIMIT=str(DAILY_LIMIT), CHAT_MAX_TURNS_PER_MINUTE="10000",
            CHAT_HISTORY_TOKEN_BUDGET="200", **BUDGET_SETTINGS) as running:
        store = TableConversationStore(table=TableClient.from_connection_string(
            state.connection_string, table_name=table_name), summaries=True)
        queue = running.workers[0].bot.settings.storage.turn_queue
        inbox = Inbox(table=TableClient.from_connection_string(
                          state.connection_string, table_name=inbox_table_name(table_name)),
                      queue=queue_client(state.connection_string, queue),
                      poison=queue_client(state.connection_string, f"{queue}-poison"))
        try:
            await store.ping()  # the tables made, before any fault
            await inbox.read_head("~ping")
            state.faults_on = True
            await asyncio.gather(*(_run_op(op, state, running, inbox) for op in state.ops))
            state.waiting = await _settle(running, inbox)
            state.faults_on = False
            assert inbox._poison is not None  # (the torture reads the queue it made)
            state.poisoned = [bytes(m.content) async for m in inbox._poison.receive_messages(
                messages_per_page=32, visibility_timeout=300)]
            await asyncio.gather(*state.pressing, return_exceptions=True)
            return await check(state, store, day=day)
        finally:
            state.faults_on = False
            await store.close()
            await inbox.close()


async def _settle(running: Halves, inbox: Inbox) -> list[tuple[str, str]]:
    """Wait until every accepted message is seen to and the workers are idle; what is still
    kept (partition, activity) if that does not happen within `SETTLE_SECONDS` (stranded)."""
    try:
        await running.settled(within=SETTLE_SECONDS, inbox=inbox)
        return []
    except TimeoutError:
        return await running.kept(inbox=inbox)


async def _run_op(op: Op, state: Round, running: Halves, inbox: Inbox) -> None:
    await asyncio.sleep(op.delay)
    current_op.set(op.index)
    current_conversation.set(op.conversation)
    outcome = state.outcomes[op.index] = Outcome(start=tick())
    worker = running.workers[op.instance]
    try:
        if op.kind == "turn":
            await _post(state, running, op, op.activity_id,
                        f"{op.conversation}|{op.activity_id}|{op.variant or 'answer'}|{op.user}",
                        outcome)
        elif op.kind == "reset":
            await _post(state, running, op, op.activity_id, "/reset", outcome)
        elif op.kind == "burst":  # one after the other, a moment apart, as a person types
            for i in range(op.count):
                activity_id = f"{op.activity_id}b{i}"
                await _post(state, running, op, activity_id,
                            f"{op.conversation}|{activity_id}|{op.variant or 'answer'}|{op.user}",
                            outcome)
                await asyncio.sleep(random.Random(f"{op.index}{i}").uniform(0.02, 0.2))
        elif op.kind == "ticket":
            await inbox.enqueue(TurnTicket(conversation_id=op.conversation,
                                           activity_id=op.activity_id, enqueued_at=time.time(),
                                           kind=op.variant), delay=op.after)  # type: ignore[arg-type]
            state.tickets += 1
            outcome.status = 200
        elif op.kind == "kill":
            await _kill(state, running, op.instance)
            outcome.status = 200
        elif op.kind == "delete":
            await worker.store.clear(op.conversation)
            outcome.status = 200
        elif op.kind == "export":
            await worker.store.export_user(op.user)
            outcome.status = 200
        elif op.kind == "forget":
            await forget_user(worker.store, worker.inbox, op.user)
            outcome.status = 200
        elif op.kind == "purge":
            tomorrow = utc_day(utc_now() + timedelta(days=1))
            await worker.store.purge_idle(before=tomorrow, deadline=time.monotonic() + 30)
            outcome.status = 200
        elif op.kind == "summary":
            job = await worker.store.get_fold(op.conversation, token_budget=200)
            if job is not None:
                await worker.store.update_summary(job, f"summary by op {op.index}")
            outcome.status = 200
        elif op.kind == "expire":
            await _dead_reservation(op, worker.store)
            outcome.status = 200
        elif op.kind == "feedback":
            await _feedback(state, worker.store, op)
            outcome.status = 200
    except ChatstateError as exc:
        outcome.error, outcome.status = type(exc).__name__, 503
    finally:
        outcome.end = tick()


async def _post(state: Round, running: Halves, op: Op, activity_id: str, text: str,
                outcome: Outcome) -> None:
    """The channel posts a message to the webhook of `op`'s worker slot, and again (to the same
    slot: a killed worker has been replaced by then) while it is answered 5xx."""
    body = _activity(op, activity_id, text, service_url=state.channel.url)
    for attempt in range(CHANNEL_RETRIES + 1):
        if attempt:
            await asyncio.sleep(0.2 * attempt)
        response = await running.workers[op.instance].bot.handle(body=body, headers=HEADERS)
        outcome.status = response.status
        if response.status == 200:
            state.acknowledged.add((op.conversation, activity_id))
            return
        if response.status < 500:
            return


async def _kill(state: Round, running: Halves, slot: int) -> None:
    """The worker of `slot` dies where it is: its storage calls fail from now on (a dead process
    sends nothing), its handlers stop; a fresh worker takes the slot."""
    for recorder in state.recorders.pop(slot, []):
        recorder.dead = True
    assert state.observer is not None
    state.observer.kill(slot)
    state.kills += 1
    # A fresh context: the new worker's calls are its own, not this operation's.
    await asyncio.create_task(running.restart(slot), context=contextvars.Context())


async def _dead_reservation(op: Op, store: TableConversationStore) -> None:
    """What a worker that died mid-call leaves: a reservation of a call's worst case in a ledger,
    never settled; it holds the room for a second, then expires."""
    account = Account("user", op.user) if op.variant == "user" else \
        Account("tenant", tenant_of(op.conversation))
    now = utc_now()
    dead = Reservation(f"dead-{op.index}", 2 * TOKENS_PER_CALL, int(now.timestamp()) + 1)
    await store.update_ledger(account, utc_day(now),
                              lambda ledger: ledger.reserve(dead, limit=None, now=0))  # type: ignore[arg-type, return-value]


async def _feedback(state: Round, store: TableConversationStore, op: Op) -> None:
    """The user rates a reply they have seen in the conversation (the latest answer sent)."""
    seen = [a for a in state.channel.messages(op.conversation)
            if str(a.get("text", "")).startswith("re ") and a.get("replyToId")]
    if not seen:
        return
    activity_id = str(seen[-1]["replyToId"])
    await store.mark_delivered(op.conversation, activity_id, reply_id=f"r-{activity_id}")
    await store.rate_reply(op.conversation, f"r-{activity_id}", Feedback(reaction="like"))


def _press_stop(state: Round, conversation: str, activity_id: str) -> None:
    """The user presses Stop on the conversation's stream once it shows (a stream keeps a second
    from the chat's previous one, so it may start after the answer did), to take effect after
    `STOP_AFTER_UPDATES` updates; not if no stream shows (another turn's may hold the chat, and
    this one answers with a message)."""
    async def press() -> None:
        for _ in range(60):
            if state.channel.streams.open(conversation):
                state.channel.streams.cancel(conversation, after_updates=STOP_AFTER_UPDATES)
                return
            await asyncio.sleep(0.05)

    task = asyncio.get_running_loop().create_task(press())
    state.pressing.add(task)
    task.add_done_callback(state.pressing.discard)


# -- the invariants ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answered:
    """An activity's first answer the user saw (a reply or a stream they stopped), and when its
    turn's commit was first sent."""

    deed: Deed
    commit_sent: int


def _answered(state: Round, deeds: list[Deed]) -> dict[tuple[str, str], Answered]:
    first: dict[tuple[str, str], Answered] = {}
    for deed in sorted(deeds, key=lambda d: d.tick):
        if deed.run.kind != "messages" or not _is_answer(deed.text):
            continue
        if deed.stream is not None and deed.run.outcome != "Answered":
            # Stopped during an attempt that then failed: like any failed attempt's stream, what
            # it showed is not kept; the retry answers anew, or refuses (docs/operate.md).
            continue
        for activity in deed.run.covered:
            key = (deed.run.conversation, activity)
            if key not in first:
                commits = [c.sent for c in state.calls if c.commit and activity in c.unit
                           and c.conversation == deed.run.conversation]
                first[key] = Answered(deed, min(commits, default=deed.run.start))
    return first


@dataclass(frozen=True)
class Clear:
    """An operation that hides a conversation's messages: when its hiding write was sent and
    answered, and whether it finished."""

    label: str
    kind: str
    calls: list[Call]
    done: bool

    def hidden(self, conversation: str) -> int | None:
        return hiding_moment(self.calls, conversation)

    def hide_sent(self, conversation: str) -> list[int]:
        pk = encode_key(conversation)
        return [c.sent for c in self.calls if c.role == "store" and c.on_head(pk)
                and c.method in ("PUT", "MERGE")]


def _clears(state: Round, deeds: list[Deed], conversation: str) -> list[Clear]:
    clears = [Clear(f"op #{op.index}", op.kind, [c for c in state.calls if c.op == op.index],
                    state.outcomes[op.index].status == 200)
              for op in state.ops if op.kind in ("delete", "purge", "forget")
              and op.conversation in ("", conversation)]
    assert state.observer is not None
    for run in state.observer.runs:
        if run.kind == "reset" and run.conversation == conversation:
            confirmed = any(d.run is run and d.text == RESET_DONE for d in deeds)
            clears.append(Clear(f"/reset {run.activity_ids[0]}", "reset",
                                [c for c in state.calls if c.unit == run.activity_ids
                                 and c.conversation == conversation], confirmed))
    return clears


async def check(state: Round, store: TableConversationStore, *, day: str) -> list[str]:
    """The invariants, checked on the stored state against what the history acknowledged."""
    observer = state.observer
    assert observer is not None
    problems: list[str] = []
    deeds = observer.deeds()
    answered = _answered(state, deeds)
    conversations = sorted({op.conversation for op in state.ops if op.conversation})
    visible: dict[str, list[ChatMessage]] = {c: await store.list_messages(c)
                                             for c in conversations}
    texts: dict[tuple[str, str], set[str]] = defaultdict(set)
    for deed in deeds:
        if deed.run.kind == "messages" and deed.stream is None and _is_answer(deed.text) \
                and deed.text != REMOVED_MARKER:
            for activity in deed.run.covered:
                texts[(deed.run.conversation, activity)].add(deed.text)
    problems += [f"once: activity {a} was answered {len(t)} ways: {sorted(t)}"
                 for (_, a), t in texts.items() if len(t) > 1]
    withdrawn = _withdrawn(state)
    for conversation in conversations:
        rows = visible[conversation]
        counts = Counter(m.activity_id for m in rows if m.role == "user")
        problems += [f"once: activity {a} is stored {n} times in {conversation}"
                     for a, n in counts.items() if n > 1]
        clears = _clears(state, deeds, conversation)
        for (where, activity_id), first in answered.items():
            if where != conversation:
                continue
            if activity_id not in counts and activity_id not in withdrawn and not any(
                    (hidden := clear.hidden(conversation)) is not None
                    and first.commit_sent < hidden for clear in clears):
                problems.append(f"lost: answered activity {activity_id} is gone from "
                                f"{conversation} and no clear hid it")
            for clear in clears:
                if clear.kind not in ("reset", "delete") or not clear.done:
                    continue
                sent = clear.hide_sent(conversation)
                if activity_id in counts and sent and first.deed.run.end < min(sent):
                    problems.append(f"visible: activity {activity_id} is visible after "
                                    f"{clear.label} hid it")
    problems += await _check_users(state, store, visible, answered)
    faulted = {c.conversation for c in state.calls if c.injected or c.dead} | \
        {run.conversation for run in observer.runs if run.outcome == "killed"}
    problems += _check_stopped(deeds, visible, texts, faulted)
    now = utc_now()
    if utc_day(now) == day:
        billed = dict(state.model.billed)
        for cut in state.model.cut:  # shared/prompt.py's rule: the request and the text read
            billed[cut.conversation] = billed.get(cut.conversation, 0) + _cut_tokens(cut, deeds)
        for conversation in conversations:
            if conversation in faulted:
                continue  # a failed spend write may have lost tokens: logged, not counted here
            state.spend_checked += 1
            window = await store.load_window(conversation, token_budget=100, max_messages=1)
            counted, paid = window.spend.tokens_on_day(now), billed.get(conversation, 0)
            if counted != paid:
                problems.append(f"spend: {conversation} counts {counted} tokens, the model "
                                f"billed {paid}")
        problems += await _check_budgets(state, store, now, deeds)
    problems += check_order(observer, visible)
    problems += check_answered_once(observer, _excuses(state, deeds), visible, state.waiting)
    problems += check_poisoned(observer, state.poisoned)
    problems += check_reset_barrier(observer, state.calls, visible)
    problems += check_streams(observer)
    return problems


def _cut_tokens(cut: CutStream, deeds: list[Deed]) -> int:
    """A stream cut before its usage arrived, as the code counts it: the request and the text
    the user read (the stream they stopped, of the unit that asked)."""
    shown = [d.text for d in deeds if d.stream is not None
             and d.run.conversation == cut.conversation and cut.activity_id in d.run.covered]
    return cut.request_tokens + count_text_tokens(shown[-1] if shown else "")


async def _check_budgets(state: Round, store: TableConversationStore, now: Any,
                         deeds: list[Deed]) -> list[str]:
    """The ledgers against what the model stand-in billed each user and tenant (cut streams as
    the code estimates them), where no ledger write met an injected failure and no killed
    worker made a call for the account; and their limits."""
    assert state.observer is not None
    billed = dict(state.model.accounts)
    for cut in state.model.cut:
        for key in (f"user:{cut.user}", f"tenant:{tenant_of(cut.conversation)}"):
            billed[key] = billed.get(key, 0) + _cut_tokens(cut, deeds)
    senders = {(a.conversation, a.activity_id): a.sender for a in state.observer.arrivals}
    killed = {key for run in state.observer.runs if run.outcome == "killed"
              for key in (f"tenant:{tenant_of(run.conversation)}",
                          *(f"user:{senders.get((run.conversation, a), '')}"
                            for a in run.activity_ids))}
    problems: list[str] = []
    accounts = [Account("user", u) for u in USERS] + \
        [Account("tenant", t) for t in ("tenant-a", "tenant-b")]
    for account in accounts:
        ledgers = await store.list_ledgers(account, since=utc_day(now))
        counted = ledgers[0].tokens if ledgers else 0
        limit = USER_DAILY_LIMIT if account.level == "user" else TENANT_DAILY_LIMIT
        if counted > limit:
            problems.append(f"budgets: the {account.level} {account.id} settled {counted} "
                            f"tokens, past its limit of {limit}")
        name = f"{account.level}:{account.id}"
        faulted = name in killed or any(
            (c.injected or c.dead) and f"PartitionKey='{account.key}'" in unquote(c.url)
            for c in state.calls)
        paid = billed.get(name, 0)
        if not faulted:
            state.budgets_checked += 1
            if counted != paid:
                problems.append(f"budgets: the {account.level} {account.id} counts {counted} "
                                f"tokens, the model billed {paid}")
    return problems


def _withdrawn(state: Round) -> set[str]:
    """Activities a user's removal withdrew while they waited or were being answered (its stub
    written: the turn then stores nothing, even if the removal failed later on)."""
    removals = {op.index for op in state.ops if op.kind == "forget"}
    return {unquote(c.url).split("RowKey='a", 1)[1].split("'", 1)[0] for c in state.calls
            if c.op in removals and c.role == "inbox" and c.method == "PUT"
            and "RowKey='a" in unquote(c.url) and 200 <= c.status < 300}


def _excuses(state: Round, deeds: list[Deed]) -> Excuses:
    removals: dict[str, list[tuple[int, int]]] = defaultdict(list)
    clears: dict[str, list[int]] = defaultdict(list)
    conversations = {op.conversation for op in state.ops if op.conversation}
    for op in state.ops:
        outcome = state.outcomes[op.index]
        if op.kind == "forget" and outcome.status == 200:
            removals[op.user].append((outcome.start, outcome.end))
        if op.kind in ("delete", "purge", "forget"):
            for conversation in ([op.conversation] if op.conversation else conversations):
                clears[conversation].append(outcome.start)
    assert state.observer is not None
    for run in state.observer.runs:
        if run.kind == "reset":
            clears[run.conversation].append(run.start)
    return Excuses(removals=removals, clears=clears, acknowledged=state.acknowledged,
                   calls=state.calls, withdrawn=_withdrawn(state), same_reply=_same_reply)


def _same_reply(one: str, other: str) -> bool:
    """The same reply: the same text, or the same reply of ours (a budget's refusal names the
    wait, which differs when it is worded again)."""
    return one == other or any(one.startswith(p) and other.startswith(p) for p in _BUDGET_REPLIES)


def _check_stopped(deeds: list[Deed], visible: dict[str, list[ChatMessage]],
                   texts: dict[tuple[str, str], set[str]], faulted: set[str]) -> list[str]:
    """A stopped reply is stored as what the user saw, marked stopped (where no other delivery
    of it got a whole answer and no storage call of its conversation failed on purpose)."""
    problems: list[str] = []
    for deed in deeds:
        conversation, ids = deed.run.conversation, deed.run.covered
        if deed.stream is None or conversation in faulted or \
                any(texts.get((conversation, a)) for a in ids):
            continue
        rows = visible.get(conversation, [])
        at = [i for i, m in enumerate(rows) if m.role == "user" and m.activity_id in ids]
        if not at:
            continue  # not stored, or cleared: the other invariants judge that
        following = list(itertools.takewhile(lambda m: m.role != "user", rows[at[-1] + 1:]))
        reply = following[-1] if following else None
        if reply is None or reply.content == REMOVED_MARKER:
            continue
        if (reply.content, reply.stopped) != (deed.text, True):
            problems.append(f"stopped: {list(ids)} showed {deed.text!r} and was stopped; "
                            f"stored {reply.content!r}, stopped={reply.stopped}")
    return problems


async def _check_users(state: Round, store: TableConversationStore,
                       visible: dict[str, list[ChatMessage]],
                       answered: dict[tuple[str, str], Answered]) -> list[str]:
    problems: list[str] = []
    assert state.observer is not None
    accepted = {key: a.tick for key, a in state.observer.stored_arrivals().items()}
    for user in USERS:
        data = await store.export_user(user)
        exported = {(c.conversation_id, m.activity_id) for c in data.conversations
                    for m in c.messages if m.role == "user"}
        forgets = [op for op in state.ops if op.kind == "forget" and op.user == user
                   and state.outcomes[op.index].status == 200]
        for conversation, rows in visible.items():
            pk = encode_key(conversation)
            for message in rows:
                if message.role != "user" or message.content == REMOVED_MARKER:
                    continue
                sender = message.sender.ids if message.sender else ()
                if user not in sender:
                    continue
                key = (conversation, str(message.activity_id))
                if key not in exported:
                    problems.append(f"exportable: {user}'s message {message.activity_id} in "
                                    f"{conversation} is stored but not in their export")
                first = answered.get(key)
                for forget in forgets:
                    writes = [c.sent for c in state.calls if c.op == forget.index
                              and c.role == "store" and c.on_head(pk)
                              and c.method in ("PUT", "MERGE") and 200 <= c.status < 300]
                    if first is not None and writes and first.deed.run.end < max(writes):
                        problems.append(f"exportable: {user}'s message {message.activity_id} in "
                                        f"{conversation} survived their removal (op "
                                        f"#{forget.index})")
                    elif key in accepted and accepted[key] < state.outcomes[forget.index].start:
                        problems.append(f"exportable: {user}'s message {message.activity_id} in "
                                        f"{conversation}, accepted before their removal (op "
                                        f"#{forget.index}) began, is stored after it")
    return problems


# -- the run -------------------------------------------------------------------------------------


async def shrink(connection_string: str, seed: int, ops: list[Op], *, fail_rate: float,
                 burst: str, budget_seconds: float,
                 checks: tuple[str, ...] | None = None) -> list[Op]:
    """The shortest history found that still fails: drop one operation at a time (each
    candidate run up to three times: timing varies), within `budget_seconds`."""
    deadline = time.monotonic() + budget_seconds
    current = list(ops)
    index = len(current) - 1
    while index >= 0 and time.monotonic() < deadline:
        candidate = current[:index] + current[index + 1:]
        for _ in range(3):
            problems = await run_round(Round(connection_string, seed, candidate,
                                             fail_rate=fail_rate, burst=burst))
            if any(_checked(p, checks) for p in problems):
                current = candidate
                break
        index -= 1
    return current


def _checked(problem: str, checks: tuple[str, ...] | None) -> bool:
    return checks is None or problem.split(":")[0] in checks


@dataclass
class Figures:
    """What a run did, summed over its rounds."""

    rounds: int = 0
    operations: int = 0
    accepted: int = 0
    answers: int = 0
    bursts: int = 0
    apologies: int = 0
    resets: int = 0
    streamed: int = 0
    stopped: int = 0
    kills: int = 0
    tickets: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    injected: int = 0
    spend_checked: int = 0
    budgets_checked: int = 0
    budget_replies: int = 0

    def add(self, state: Round) -> None:
        assert state.observer is not None
        deeds = state.observer.deeds()
        self.rounds += 1
        self.operations += len(state.ops)
        self.accepted += len(state.observer.arrivals)
        self.answers += sum(1 for d in deeds if d.run.kind == "messages"
                            and _is_answer(d.text))
        self.bursts += sum(1 for d in deeds if d.run.kind == "messages"
                           and len(d.run.covered) > 1 and _is_answer(d.text))
        self.apologies += sum(1 for d in deeds if d.text == APOLOGY)
        self.resets += sum(1 for d in deeds if d.text == RESET_DONE)
        self.streamed += len(state.channel.streams.streams)
        self.stopped += sum(1 for d in deeds if d.stream is not None)
        self.kills += state.kills
        self.tickets += state.tickets
        self.calls.update(c.role for c in state.calls)
        self.injected += sum(c.injected for c in state.calls)
        self.spend_checked += state.spend_checked
        self.budgets_checked += state.budgets_checked
        self.budget_replies += sum(1 for d in deeds if d.text.startswith(_BUDGET_REPLIES))

    def __str__(self) -> str:
        calls = ", ".join(f"{n} {role}" for role, n in sorted(self.calls.items()))
        return (f"{self.rounds} rounds, {self.operations} operations; {self.accepted} messages "
                f"accepted, {self.answers} answers ({self.bursts} to bursts), {self.resets} "
                f"resets confirmed, {self.apologies} apologies; {self.streamed} replies "
                f"streamed, {self.stopped} stopped by the user; {self.kills} workers killed, "
                f"{self.tickets} extra queue messages; {sum(self.calls.values())} storage calls "
                f"({calls}; {self.injected} failed on purpose); spend checked in "
                f"{self.spend_checked} conversations, budgets checked in {self.budgets_checked} "
                f"accounts ({self.budget_replies} budget replies)")


async def torture(connection_string: str, *, seed: int, rounds: int | None,
                  duration: float | None, length: int = 40, out: Any = sys.stdout,
                  shrink_seconds: float = 120.0, kinds: tuple[str, ...] = KINDS,
                  checks: tuple[str, ...] | None = None, trace: str | None = None) -> bool:
    """Run rounds until `rounds` or `duration`; True when every invariant held in every round.
    `trace`: a file the timelines of a failing round's conversations are written to."""
    invariants = [i for i in INVARIANTS if _checked(i, checks)]
    print("invariants checked:", file=out)
    for invariant in invariants:
        print(f"  - {invariant}", file=out)
    started = time.monotonic()
    master = random.Random(seed)
    figures = Figures()
    while (rounds is None or figures.rounds < rounds) and (duration is None or
                                                           time.monotonic() - started < duration):
        round_seed = master.getrandbits(32)
        choices = random.Random(round_seed)
        # A third of the rounds fail no storage call and kill no worker (delays only): spend
        # and budgets are checked everywhere.
        fail_rate = choices.choice((0.0, 0.02, 0.05))
        calm = tuple(k for k in kinds if k != "kill") if not fail_rate else kinds
        ops = history(random.Random(round_seed), f"r{figures.rounds}", length, calm)
        state = Round(connection_string, round_seed, ops, fail_rate=fail_rate,
                      burst=choices.choice(("together", "together", "each")))
        began = time.monotonic()
        problems = [p for p in await run_round(state) if _checked(p, checks)]
        number = figures.rounds
        figures.add(state)
        print(f"round {number}: {len(ops)} operations, faults {state.fail_rate:.0%}, "
              f"CHAT_BURST={state.burst}: {'FAILED' if problems else 'ok'} "
              f"({time.monotonic() - began:.0f} s)", file=out, flush=True)
        if problems:
            print(f"FAILED: seed {seed}, round {number} (round seed {round_seed}):", file=out)
            for problem in problems:
                print(f"  {problem}", file=out)
            if trace is not None:
                _trace(state, problems, trace)
                print(f"the failing conversations' timelines are in {trace}", file=out)
            shortest = await shrink(connection_string, round_seed, ops,
                                    fail_rate=state.fail_rate, burst=state.burst,
                                    budget_seconds=shrink_seconds, checks=checks)
            print(f"shortest failing history ({len(shortest)} of {len(ops)} operations; "
                  f"re-run: --seed {seed}):", file=out)
            for op in shortest:
                print(f"  {op}", file=out)
            print(f"figures: {figures}", file=out)
            return False
    print(f"passed: seed {seed}, {figures}, {time.monotonic() - started:.0f} s", file=out)
    return True


def _trace(state: Round, problems: list[str], path: str) -> None:
    assert state.observer is not None
    named = {c for c in {op.conversation for op in state.ops if op.conversation}
             if any(c in problem for problem in problems)}
    named |= {run.conversation for run in state.observer.runs
              if any(a in problem for a in run.activity_ids for problem in problems)}
    with open(path, "w", encoding="utf-8") as file:
        for problem in problems:
            print(problem, file=file)
        for conversation in sorted(named):
            print(f"\n== {conversation}", file=file)
            print("\n".join(timeline(state.observer, conversation)), file=file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds")
    parser.add_argument("--length", type=int, default=40, help="operations per round")
    parser.add_argument("--kinds", default=None,
                        help=f"comma-separated operations to draw from (default: all of "
                             f"{','.join(sorted(set(KINDS)))})")
    parser.add_argument("--check", default=None,
                        help="comma-separated invariants to check (default: all of "
                             f"{','.join(i.split(':')[0] for i in INVARIANTS)})")
    parser.add_argument("--shrink-seconds", type=float, default=300.0)
    parser.add_argument("--trace", default=None,
                        help="a file for the timelines of a failing round's conversations")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2 ** 32)
    rounds = args.rounds if args.rounds is not None or args.duration is not None else 5
    logging.disable(logging.ERROR)  # the bot's complaints under faults are expected here
    print(f"seed {seed}", flush=True)
    with given_or_started(os.environ.get(STORAGE_ENV)) as connection_string:
        ok = asyncio.run(torture(connection_string, seed=seed, rounds=rounds,
                                 duration=args.duration, length=args.length,
                                 shrink_seconds=args.shrink_seconds,
                                 kinds=tuple(args.kinds.split(",")) if args.kinds else KINDS,
                                 checks=tuple(args.check.split(",")) if args.check else None,
                                 trace=args.trace))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
