"""The randomized concurrency test: seeded random interleavings of every operation, checked.

    python -m tests.integration.torture [--seed N] [--rounds N | --duration SECONDS]
    (`make torture SEED=… ROUNDS=…` or `DURATION=…`; a short run is in tests/integration)

Each round: two bot instances (two `ChatBot`s, each on its own `TableConversationStore`) on one
Azurite table; a seeded random history of turns (new, duplicate deliveries, tool loops cut by the
round limit, replies over the daily token limit, replies streamed into a Teams personal chat
through the contract-enforcing Bot Connector stand-in, and streams the user stops midway), /reset,
DELETE conversation, a user's export and removal, retention purges, summary preparation and
feedback, and budgets (users' and tenants' daily tokens and users' turns a minute: turns whose tool
round is followed by a failing model call, and reservations left by dead workers; `BUDGET_KINDS`),
started at random moments so they overlap; storage calls delayed and failed at random
(a per-call policy on each real TableClient, `storage_faults.py`). Then the invariants
(`INVARIANTS`) are checked against a model of what was acknowledged, with moments taken from the
storage calls themselves: when a clear's hiding write was answered, when a turn's commit was sent.
A failing round prints its seed and the shortest history that still fails (operations dropped one
at a time and the round run again).
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
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import unquote

import httpx2
from azure.core.exceptions import ServiceRequestError
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import AsyncHTTPPolicy
from azure.data.tables.aio import TableClient

from devtools.azurite import STORAGE_ENV, given_or_started
from devtools.fake_channel import FakeConnector
from shared.bot import APOLOGY, RESET_DONE, ChatBot
from shared.errors import ChatstateError
from shared.keys import encode_key
from shared.ledger import Account, Reservation
from shared.limits import LIMIT_REPLIES
from shared.messages import Feedback, utc_day, utc_now
from shared.store import REMOVED_MARKER, TableConversationStore
from shared.tokens import count_request_tokens, count_text_tokens
from tests.unit.test_turns import make_bot

__all__ = ["INVARIANTS", "Op", "run_round", "torture"]

INVARIANTS = (
    "lost: no acknowledged message is lost, unless a clear (reset, DELETE, purge, a personal "
    "chat's removal) whose hiding write was answered after the message's commit was sent "
    "removed it",
    "visible: nothing is visible after the clear that hid it (acknowledged before the clear's "
    "hiding write was sent)",
    "once: each activity is stored at most once, and every delivery of it gets the same answer",
    "exportable: every stored message of a user is in their export, until removed; and gone or "
    "redacted after their removal if it was acknowledged before the removal's head write",
    "spend: the spend counters equal the tokens billed by the model, a stopped stream's as "
    "the request and the text the user read (conversations whose spend-carrying writes met no "
    "injected failure)",
    "stopped: a reply the user stopped midway is stored as the text they saw, marked stopped, "
    "and no stream broke Teams' streaming contract",
    "budgets: each user's and tenant's ledger counts the tokens the model billed for them (a "
    "failed call as its request; accounts whose ledger writes met no injected failure), and no "
    "ledger's settled tokens pass its limit (every call billed within its reservation)",
)

USERS = ("29:u1", "29:u2", "29:u3")
#: About what a call bills: its prompt as the code's estimate counts it (an upper bound of what a
#: provider counts) and `REPLY_TOKENS`.
TOKENS_PER_CALL = 400
REPLY_TOKENS = 100
DAILY_LIMIT = 40 * TOKENS_PER_CALL
#: The budgets: a call reserves its prompt and REPLY_MAX; a user has room for about 8 calls a
#: day and 8 turns a minute, a tenant for about 12 calls.
REPLY_MAX = 200
USER_DAILY_LIMIT = 8 * TOKENS_PER_CALL
USER_TURNS_PER_MINUTE = 8
TENANT_DAILY_LIMIT = 12 * TOKENS_PER_CALL
_tick = itertools.count()
#: A streamed answer: this many words, one SSE chunk each, `STREAM_PACE` seconds apart (the
#: reply stream sends at most one update a second: an answer of ~1.4 s shows the informative
#: update and one of text; one that is stopped lasts ~2.8 s, past its third update).
STREAM_WORDS = {"streamed": 5, "stopped": 12}
STREAM_PACE = 0.2
#: Stop is pressed once the stream has taken this many updates (the informative one and one of
#: text): the next update is refused as canceled, before the answer ends.
STOP_AFTER_UPDATES = 2
#: Replies that are not an answer the turn stored (the budget replies begin with these words).
_NOT_ANSWERS = {APOLOGY, RESET_DONE, *LIMIT_REPLIES.values()}
_BUDGET_REPLIES = ("You've reached your daily usage limit", "Your organization has reached",
                   "You're sending messages faster than I can answer across")


def _is_answer(reply: str | None) -> bool:
    return reply is not None and reply not in _NOT_ANSWERS and not reply.startswith(_BUDGET_REPLIES)


def tenant_of(conversation: str) -> str:
    """The round's tenants: the group chat and the first personal chat are tenant A's."""
    return "tenant-b" if conversation.endswith("-p2") else "tenant-a"
_current_op: contextvars.ContextVar[int] = contextvars.ContextVar("torture_op", default=-1)


@dataclass(frozen=True)
class Op:
    """One operation of a history: what, on which conversation, by whom, on which instance."""

    index: int
    kind: str
    conversation: str = ""
    user: str = ""
    activity_id: str = ""
    instance: int = 0
    delay: float = 0.0
    variant: str = ""

    def __str__(self) -> str:
        args = " ".join(f"{name}={value}" for name, value in (
            ("conv", self.conversation), ("user", self.user), ("activity", self.activity_id),
            ("on", self.instance), ("variant", self.variant)) if value != "")
        return f"#{self.index} +{self.delay * 1000:.0f}ms {self.kind} {args}"


@dataclass
class Call:
    op: int
    method: str
    url: str
    sent: int
    answered: int = -1
    status: int = 0
    injected: bool = False


@dataclass
class Outcome:
    start: int
    end: int = -1
    status: int = 0
    reply: str | None = None
    error: str | None = None
    #: A streamed turn the user stopped: `reply` is the text they saw.
    stopped: bool = False


class Recorder(AsyncHTTPPolicy):  # type: ignore[type-arg]
    """Records every storage call with its operation and moments; injects the seeded faults."""

    def __init__(self, calls: list[Call], rng: random.Random, *, fail_rate: float,
                 delay_rate: float, max_delay: float) -> None:
        super().__init__()
        self.calls, self.rng = calls, rng
        self.fail_rate, self.delay_rate, self.max_delay = fail_rate, delay_rate, max_delay
        self.on = False

    async def send(self, request: PipelineRequest) -> PipelineResponse:  # type: ignore[type-arg]
        http = request.http_request
        call = Call(op=_current_op.get(), method=http.method, url=http.url, sent=-1)
        self.calls.append(call)
        if self.on and self.rng.random() < self.delay_rate:
            await asyncio.sleep(self.rng.uniform(0, self.max_delay))
        call.sent = next(_tick)
        if self.on and self.rng.random() < self.fail_rate:
            call.injected, call.answered = True, next(_tick)
            raise ServiceRequestError("injected fault: not sent")
        response = await self.next.send(request)
        call.answered, call.status = next(_tick), response.http_response.status_code
        return response


@dataclass
class CutStream:
    """A streamed call the bot closed before its usage arrived (the user pressed Stop)."""

    conversation: str
    activity_id: str
    #: The request as shared/prompt.py estimates it (`count_request_tokens`).
    request_tokens: int
    user: str = ""


class _SSE(httpx2.AsyncByteStream):
    """A streamed completion's SSE chunks, paced; bills the call once its usage was read, or
    records it cut when the reader closes it first."""

    def __init__(self, model: ScriptedModel, chunks: list[bytes], done_at: int,
                 cut: CutStream, *, stop: Callable[[], None] | None) -> None:
        self.model, self.chunks, self.done_at, self.cut = model, chunks, done_at, cut
        self.stop = stop
        self.billed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for index, chunk in enumerate(self.chunks):
            if index == 2 and self.stop is not None:  # the user, reading the first words
                self.stop()
            if index == self.done_at:  # the reader asked past the usage chunk: it has it
                self.billed = True
                self.model.bill(self.cut.conversation, self.cut.user,
                                self.cut.request_tokens + REPLY_TOKENS)
            elif 0 < index < self.done_at - 1:
                await asyncio.sleep(STREAM_PACE)
            yield chunk

    async def aclose(self) -> None:
        if not self.billed:
            self.billed = True
            self.model.cut.append(self.cut)


class ScriptedModel:
    """The model at the transport: bills a call its prompt (as `count_request_tokens` counts it:
    a provider counts no more) and `REPLY_TOKENS`, by conversation; answers
    `re <activity> #<call>` (a tool call for a `loop` turn, until the round limit cuts it; for a
    `fail` turn, a tool call, then a 500 billed as its request, which is all a provider that
    reports nothing can be counted as). A streamed request is answered in SSE chunks,
    `STREAM_PACE` apart, usage last; a stream the bot closes before reading its usage is
    recorded in `cut` (billed as the code estimates it). `billed` is by conversation,
    `accounts` by user and tenant (`user:<id>`, `tenant:<id>`)."""

    def __init__(self) -> None:
        self.billed: dict[str, int] = defaultdict(int)
        self.accounts: dict[str, int] = defaultdict(int)
        self.cut: list[CutStream] = []
        #: Called as a `stopped` turn's answer begins to stream (conversation, activity).
        self.press_stop: Callable[[str, str], None] | None = None
        self.calls = 0

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.calls += 1
        body = json.loads(request.content)
        users = [m for m in body["messages"] if m.get("role") == "user"]
        conversation, activity_id, variant, user = str(users[-1]["content"]).split("|")[:4]
        prompt = count_request_tokens(body["messages"], body.get("tools"))
        usage = {"prompt_tokens": prompt, "completion_tokens": REPLY_TOKENS,
                 "total_tokens": prompt + REPLY_TOKENS}
        if variant == "fail" and body["messages"][-1]["role"] == "tool":
            self.bill(conversation, user, count_request_tokens(body["messages"], body.get("tools")))
            return httpx2.Response(500, json={"error": {"message": "down", "type": "server_error"}})
        if body.get("stream"):
            stop = None
            if variant == "stopped" and (press := self.press_stop) is not None:
                stop = functools.partial(press, conversation, activity_id)
            return self._streamed(body, conversation, activity_id, user, usage, stop=stop,
                                  words=STREAM_WORDS.get(variant, STREAM_WORDS["streamed"]))
        self.bill(conversation, user, prompt + REPLY_TOKENS)
        if variant in ("loop", "fail"):
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"c{self.calls}", "type": "function",
                "function": {"name": "lookup", "arguments": "{}"}}]}
        else:
            message = {"role": "assistant", "content": f"re {activity_id} #{self.calls}"}
        return httpx2.Response(200, json={"id": "x", "object": "chat.completion", "created": 0,
                                          "model": "m", "usage": usage, "choices": [{
                                              "index": 0, "finish_reason": "stop",
                                              "message": message}]})

    def bill(self, conversation: str, user: str, tokens: int) -> None:
        self.billed[conversation] += tokens
        self.accounts[f"user:{user}"] += tokens
        self.accounts[f"tenant:{tenant_of(conversation)}"] += tokens

    def _streamed(self, body: dict[str, Any], conversation: str, activity_id: str, user: str,
                  usage: dict[str, int], *, stop: Callable[[], None] | None,
                  words: int) -> httpx2.Response:
        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": choices, **extra}
            return f"data: {json.dumps(chunk)}\n\n".encode()

        pieces = [f"re {activity_id} #{self.calls}", *(f" w{i}" for i in range(words))]
        chunks = [event([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
        chunks += [event([{"index": 0, "delta": {"content": piece}}]) for piece in pieces]
        chunks.append(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        chunks.append(event([], usage=usage))
        chunks.append(b"data: [DONE]\n\n")
        request_tokens = count_request_tokens(body["messages"], body.get("tools"))
        stream = _SSE(self, chunks, len(chunks) - 1,  # billed as [DONE] is asked for
                      CutStream(conversation, activity_id, request_tokens, user), stop=stop)
        return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                               stream=stream)


#: The budgets' own operations: a turn whose tool round is followed by a failing model call, and
#: a reservation left in a user's or tenant's ledger by a worker that died (it expires).
BUDGET_KINDS = ("fail", "fail", "expire")
#: The operations a history draws from, as often as they are listed.
KINDS = ("turn",) * 10 + ("loop", "duplicate", "duplicate", "duplicate", "reset", "delete",
                          "export", "forget", "purge", "summary", "summary", "feedback",
                          "feedback", "streamed", "streamed", "stopped") + BUDGET_KINDS
#: Turns that stream into a Teams personal chat (`a:` conversations only), and the user's Stop.
STREAMED = ("streamed", "stopped")


def history(rng: random.Random, round_id: str, length: int,
            kinds: tuple[str, ...] = KINDS) -> list[Op]:
    """A random history of `length` operations on three conversations of one round."""
    conversations = {f"{round_id}-g": None, f"a:{round_id}-p1": USERS[0],
                     f"a:{round_id}-p2": USERS[1]}
    ops: list[Op] = []
    activities: list[tuple[str, str, str, str]] = []
    for index in range(length):
        kind = rng.choice(list(kinds))
        conversation = rng.choice(list(conversations))
        owner = conversations[conversation]
        user = owner or rng.choice(USERS)
        instance, delay = rng.randrange(2), rng.uniform(0, 0.4)
        if kind == "duplicate" and activities:  # delivered again the way it first came
            conversation, user, activity_id, variant = rng.choice(activities)
            ops.append(Op(index, "turn", conversation, user, activity_id, instance, delay,
                          variant if variant in STREAMED else ""))
            continue
        if kind in STREAMED and owner is None:  # Teams streams in personal chats only
            conversation = rng.choice([c for c, o in conversations.items() if o is not None])
            user = conversations[conversation] or user
        if kind in ("turn", "loop", "fail", "duplicate", "reset", *STREAMED):
            activity_id = uuid.UUID(int=rng.getrandbits(128)).hex[:12]
            variant = kind if kind in ("loop", "fail", *STREAMED) else ""
            if kind != "reset":
                activities.append((conversation, user, activity_id, variant))
            ops.append(Op(index, "reset" if kind == "reset" else "turn", conversation, user,
                          activity_id, instance, delay, variant))
        elif kind == "feedback" and activities:
            conversation, user, activity_id, _ = rng.choice(activities)
            ops.append(Op(index, "feedback", conversation, user, activity_id, instance, delay))
        elif kind in ("export", "forget"):
            ops.append(Op(index, kind, user=rng.choice(USERS), instance=instance, delay=delay))
        elif kind == "purge":
            ops.append(Op(index, "purge", instance=instance, delay=delay))
        elif kind in ("delete", "summary"):
            ops.append(Op(index, kind, conversation, instance=instance, delay=delay))
        elif kind == "expire":  # a dead worker's reservation, in the user's or the tenant's ledger
            ops.append(Op(index, "expire", conversation, user, instance=instance, delay=delay,
                          variant=rng.choice(("user", "tenant"))))
    return ops


#: The bots' budgets; one try a model call, so a failing call is one request.
BUDGET_SETTINGS = {"CHAT_USER_DAILY_TOKEN_LIMIT": str(USER_DAILY_LIMIT),
                   "CHAT_USER_TURNS_PER_MINUTE": str(USER_TURNS_PER_MINUTE),
                   "CHAT_TENANT_DAILY_TOKEN_LIMIT": str(TENANT_DAILY_LIMIT),
                   "CHAT_MAX_REPLY_TOKENS": str(REPLY_MAX), "CHAT_MODEL_MAX_RETRIES": "0"}


def _activity(op: Op, text: str, *, service_url: str) -> bytes:
    tenant = tenant_of(op.conversation)
    if op.variant in STREAMED:  # a Teams personal chat: the reply streams, then goes out
        return json.dumps({"type": "message", "id": op.activity_id, "text": text,
                           "channelId": "msteams", "serviceUrl": service_url,
                           "conversation": {"id": op.conversation, "conversationType": "personal",
                                            "tenantId": tenant},
                           "from": {"id": op.user}, "recipient": {"id": "28:bot"}}).encode()
    return json.dumps({"type": "message", "id": op.activity_id, "text": text,
                       "conversation": {"id": op.conversation, "tenantId": tenant,
                                        "isGroup": op.conversation.endswith("-g")},
                       "from": {"id": op.user}, "recipient": {"id": "28:bot"},
                       "deliveryMode": "expectReplies", "channelId": "test"}).encode()


@dataclass
class Round:
    connection_string: str
    seed: int
    ops: list[Op]
    fail_rate: float = 0.03
    delay_rate: float = 0.2
    max_delay: float = 0.05
    calls: list[Call] = field(default_factory=list)
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    model: ScriptedModel = field(default_factory=ScriptedModel)
    spend_checked: int = 0
    budgets_checked: int = 0
    connector: FakeConnector = field(default_factory=FakeConnector)
    #: Stop presses waiting for their stream to show.
    pressing: set[asyncio.Task[None]] = field(default_factory=set)


async def run_round(state: Round) -> list[str]:
    """Run `state.ops` on a fresh table; the invariants' violations (none: the round passed)."""
    table_name = "torture" + uuid.uuid4().hex[:12]
    rng = random.Random(state.seed)
    recorders: list[Recorder] = []
    stores: list[TableConversationStore] = []
    bots: list[ChatBot] = []
    for _ in range(2):
        recorder = Recorder(state.calls, random.Random(rng.getrandbits(64)),
                            fail_rate=state.fail_rate, delay_rate=state.delay_rate,
                            max_delay=state.max_delay)
        table = TableClient.from_connection_string(state.connection_string, table_name=table_name,
                                                   per_call_policies=[recorder])
        store = TableConversationStore(table=table, summaries=True)
        recorders.append(recorder)
        stores.append(store)
        bots.append(make_bot(store, state.model, CHAT_TURN_MAX_ATTEMPTS="4",
                             CHAT_DAILY_TOKEN_LIMIT=str(DAILY_LIMIT),
                             CHAT_MAX_TURNS_PER_MINUTE="10000",
                             CHAT_HISTORY_TOKEN_BUDGET="200", CHAT_ANSWER_MODE="inline",
                             **BUDGET_SETTINGS))
    day = utc_day(utc_now())
    await state.connector.__aenter__()
    state.model.press_stop = functools.partial(_press_stop, state)
    try:
        for store in stores:
            await store.ping()  # the table made, before any fault
        for recorder in recorders:
            recorder.on = True
        await asyncio.gather(*(_run_op(op, state, bots[op.instance], stores[op.instance])
                               for op in state.ops))
        for recorder in recorders:
            recorder.on = False
        return await check(state, stores[0], day=day)
    finally:
        for bot in bots:
            await bot.prompt.model.close()
            await bot.connector.close()
        for store in stores:
            await store.close()
        await state.connector.__aexit__(None, None, None)


async def _run_op(op: Op, state: Round, bot: ChatBot, store: TableConversationStore) -> None:
    await asyncio.sleep(op.delay)
    _current_op.set(op.index)
    outcome = state.outcomes[op.index] = Outcome(start=next(_tick))
    try:
        if op.kind in ("turn", "reset"):
            text = "/reset" if op.kind == "reset" else \
                f"{op.conversation}|{op.activity_id}|{op.variant or 'answer'}|{op.user}"
            response = await bot.handle(body=_activity(op, text, service_url=state.connector.url),
                                        headers={"Content-Type": "application/json"})
            outcome.status = response.status
            replies = (response.body or {}).get("activities") or []
            outcome.reply = replies[-1].get("text") if replies else None
            if op.variant in STREAMED:
                _streamed_reply(state, op, outcome)
        elif op.kind == "delete":
            await store.clear(op.conversation)
            outcome.status = 200
        elif op.kind == "export":
            await store.export_user(op.user)
            outcome.status = 200
        elif op.kind == "forget":
            await store.forget_user(op.user)
            outcome.status = 200
        elif op.kind == "purge":
            tomorrow = utc_day(utc_now() + timedelta(days=1))
            await store.purge_idle(before=tomorrow, deadline=time.monotonic() + 30)
            outcome.status = 200
        elif op.kind == "summary":
            job = await store.get_fold(op.conversation, token_budget=200)
            if job is not None:
                await store.update_summary(job, f"summary by op {op.index}")
            outcome.status = 200
        elif op.kind == "expire":
            await _dead_reservation(op, store)
            outcome.status = 200
        elif op.kind == "feedback":
            await store.mark_delivered(op.conversation, op.activity_id, reply_id=f"r-{op.activity_id}")
            await store.rate_reply(op.conversation, f"r-{op.activity_id}", Feedback(reaction="like"))
            outcome.status = 200
    except ChatstateError as exc:
        outcome.error, outcome.status = type(exc).__name__, 503
    finally:
        outcome.end = next(_tick)


async def _dead_reservation(op: Op, store: TableConversationStore) -> None:
    """What a worker that died mid-call leaves: a reservation of a call's worst case in a ledger,
    never settled; it holds the room for a second, then expires."""
    account = Account("user", op.user) if op.variant == "user" else \
        Account("tenant", tenant_of(op.conversation))
    now = utc_now()
    dead = Reservation(f"dead-{op.index}", 2 * TOKENS_PER_CALL, int(now.timestamp()) + 1)
    await store.update_ledger(account, utc_day(now),
                              lambda ledger: ledger.reserve(dead, limit=None, now=0))  # type: ignore[arg-type, return-value]


def _press_stop(state: Round, conversation: str, activity_id: str) -> None:
    """The user presses Stop on this turn's stream once it shows (a stream keeps a second from
    the chat's previous one, so it may start after the answer did), to take effect after
    `STOP_AFTER_UPDATES` updates; not if the turn never streams (one stream a chat at a time:
    another turn's may hold the chat, and this one answers with a message)."""
    async def press() -> None:
        for _ in range(40):
            streams = _streams_of(state, activity_id)
            if any(not s.finished for s in streams):
                state.connector.streams.cancel(conversation, after_updates=STOP_AFTER_UPDATES)
                return
            if streams:
                return
            await asyncio.sleep(0.05)

    task = asyncio.get_running_loop().create_task(press())
    state.pressing.add(task)
    task.add_done_callback(state.pressing.discard)


def _streamed_reply(state: Round, op: Op, outcome: Outcome) -> None:
    """What the user saw of a streamed turn: the message sent in reply to it (a stream's final,
    or an ordinary message), else the text of its stream that they stopped."""
    sent = [a for a in state.connector.messages(op.conversation)
            if a.get("replyToId") == op.activity_id]
    if sent:
        outcome.reply = str(sent[-1].get("text"))
        return
    stopped = [s for s in _streams_of(state, op.activity_id) if s.cancel]
    if stopped:
        outcome.reply, outcome.stopped = stopped[-1].text, True


def _streams_of(state: Round, activity_id: str) -> list[Any]:
    return [s for s in state.connector.streams.streams.values()
            if s.updates and s.updates[0].get("replyToId") == activity_id]


def _on_head(call: Call, pk: str) -> bool:
    url = unquote(call.url)
    return f"PartitionKey='{pk}'" in url and "RowKey='h'" in url


def _moment_of_hiding(state: Round, op: Op, pk: str) -> int | None:
    """When op's hiding write of conversation `pk` was answered (its first successful head write;
    none: the head it read, if it read one and wrote none)."""
    mine = [c for c in state.calls if c.op == op.index and _on_head(c, pk.replace("'", "''"))]
    for call in mine:
        if call.method in ("PUT", "MERGE", "PATCH") and 200 <= call.status < 300:
            return call.answered
    return None


async def check(state: Round, store: TableConversationStore, *, day: str) -> list[str]:
    """The invariants, checked on the stored state against what the history acknowledged."""
    problems: list[str] = []
    ops = {op.index: op for op in state.ops}
    answers: dict[str, set[str]] = defaultdict(set)
    acknowledged: dict[str, tuple[Op, Outcome]] = {}
    for op in state.ops:
        outcome = state.outcomes[op.index]
        if op.kind == "turn" and outcome.status == 200 and _is_answer(outcome.reply):
            if outcome.reply != REMOVED_MARKER and not outcome.stopped:
                answers[op.activity_id].add(str(outcome.reply))  # (else redacted, or cut)
            first = acknowledged.get(op.activity_id)
            if first is None or outcome.end < first[1].end:
                acknowledged[op.activity_id] = (op, outcome)
    for activity_id, texts in answers.items():
        if len(texts) > 1:
            problems.append(f"once: activity {activity_id} was answered {len(texts)} ways: "
                            f"{sorted(texts)}")
    conversations = sorted({op.conversation for op in state.ops if op.conversation})
    visible: dict[str, list[Any]] = {c: await store.list_messages(c) for c in conversations}
    for conversation in conversations:
        pk = encode_key(conversation)
        rows = visible[conversation]
        users = [m for m in rows if m.role == "user"]
        counts = defaultdict(int)
        for message in users:
            counts[message.activity_id] += 1
        problems += [f"once: activity {a} is stored {n} times in {conversation}"
                     for a, n in counts.items() if n > 1]
        present = set(counts)
        clears = [(op, _moment_of_hiding(state, op, pk)) for op in state.ops
                  if op.kind in ("reset", "delete", "purge", "forget")
                  and (op.conversation in ("", conversation))]
        for activity_id, (op, outcome) in acknowledged.items():
            if op.conversation != conversation:
                continue
            sent = [c.sent for c in state.calls if c.op in _ops_of(state, activity_id)
                    and c.method == "POST" and "$batch" in c.url]
            commit_sent = min(sent) if sent else outcome.start
            if activity_id not in present and not any(
                    hidden is not None and commit_sent < hidden for _, hidden in clears):
                problems.append(f"lost: acknowledged activity {activity_id} (op #{op.index}) "
                                f"is gone from {conversation} and no clear hid it")
            for clear, _ in clears:
                if clear.kind not in ("reset", "delete") or state.outcomes[clear.index].status != 200:
                    continue
                hide_sent = [c.sent for c in state.calls if c.op == clear.index
                             and _on_head(c, pk) and c.method in ("PUT", "MERGE")]
                if activity_id in present and hide_sent and outcome.end < min(hide_sent):
                    problems.append(f"visible: activity {activity_id} (op #{op.index}) is "
                                    f"visible after clear op #{clear.index} hid it")
    problems += await _check_users(state, store, visible, acknowledged)
    faulted = {ops[c.op].conversation for c in state.calls if c.injected and c.op in ops}
    problems += _check_stopped(state, visible, answers, faulted)
    now = utc_now()
    if utc_day(now) == day:
        billed = dict(state.model.billed)
        for cut in state.model.cut:  # shared/prompt.py's rule: the request and the text read
            shown = [s.text for s in _streams_of(state, cut.activity_id) if s.cancel]
            billed[cut.conversation] = billed.get(cut.conversation, 0) + cut.request_tokens + \
                count_text_tokens(shown[-1] if shown else "")
        for conversation in conversations:
            if conversation in faulted:
                continue  # a failed spend write may have lost tokens: logged, not counted here
            state.spend_checked += 1
            window = await store.load_window(conversation, token_budget=100, max_messages=1)
            counted, paid = window.spend.tokens_on_day(now), billed.get(conversation, 0)
            if counted != paid:
                problems.append(f"spend: {conversation} counts {counted} tokens, the model "
                                f"billed {paid}")
        problems += await _check_budgets(state, store, now)
    return problems


async def _check_budgets(state: Round, store: TableConversationStore, now: Any) -> list[str]:
    """The ledgers against what the model stand-in billed each user and tenant (cut streams as
    the code estimates them), where no ledger write met an injected failure; and their limits."""
    billed = dict(state.model.accounts)
    for cut in state.model.cut:
        shown = [s.text for s in _streams_of(state, cut.activity_id) if s.cancel]
        tokens = cut.request_tokens + count_text_tokens(shown[-1] if shown else "")
        for key in (f"user:{cut.user}", f"tenant:{tenant_of(cut.conversation)}"):
            billed[key] = billed.get(key, 0) + tokens
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
        faulted = any(c.injected and f"PartitionKey='{account.key}'" in unquote(c.url)
                      for c in state.calls)
        paid = billed.get(f"{account.level}:{account.id}", 0)
        if not faulted:
            state.budgets_checked += 1
            if counted != paid:
                problems.append(f"budgets: the {account.level} {account.id} counts {counted} "
                                f"tokens, the model billed {paid}")
    return problems


def _check_stopped(state: Round, visible: dict[str, list[Any]], answers: dict[str, set[str]],
                   faulted: set[str]) -> list[str]:
    """A stopped reply is stored as what the user saw, marked stopped (where no other delivery
    of it got a whole answer and no storage call of its conversation failed on purpose)."""
    problems = [f"stopped: the stream broke the contract: {v}"
                for v in state.connector.streams.violations]
    for op in state.ops:
        outcome = state.outcomes[op.index]
        if not outcome.stopped or answers.get(op.activity_id) or op.conversation in faulted:
            continue
        rows = visible.get(op.conversation, [])
        at = [i for i, m in enumerate(rows) if m.role == "user" and m.activity_id == op.activity_id]
        if not at:
            continue  # not stored, or cleared: the other invariants judge that
        following = list(itertools.takewhile(lambda m: m.role != "user", rows[at[0] + 1:]))
        reply = following[-1] if following else None
        if reply is None or reply.content == REMOVED_MARKER:
            continue
        if (reply.content, reply.stopped) != (outcome.reply, True):
            problems.append(f"stopped: activity {op.activity_id} (op #{op.index}) showed "
                            f"{outcome.reply!r} and was stopped; stored {reply.content!r}, "
                            f"stopped={reply.stopped}")
    return problems


def _ops_of(state: Round, activity_id: str) -> set[int]:
    return {op.index for op in state.ops if op.activity_id == activity_id}


async def _check_users(state: Round, store: TableConversationStore, visible: dict[str, list[Any]],
                       acknowledged: dict[str, tuple[Op, Outcome]]) -> list[str]:
    problems: list[str] = []
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
                if (conversation, message.activity_id) not in exported:
                    problems.append(f"exportable: {user}'s message {message.activity_id} in "
                                    f"{conversation} is stored but not in their export")
                ack = acknowledged.get(str(message.activity_id))
                for forget in forgets:
                    writes = [c.sent for c in state.calls if c.op == forget.index
                              and _on_head(c, pk) and c.method in ("PUT", "MERGE")
                              and 200 <= c.status < 300]
                    if ack is not None and writes and ack[1].end < max(writes):
                        problems.append(f"exportable: {user}'s message {message.activity_id} in "
                                        f"{conversation} survived their removal (op "
                                        f"#{forget.index})")
    return problems


async def shrink(connection_string: str, seed: int, ops: list[Op], *, fail_rate: float,
                 budget_seconds: float, checks: tuple[str, ...] | None = None) -> list[Op]:
    """The shortest history found that still fails: drop one operation at a time (each
    candidate run up to three times: timing varies), within `budget_seconds`."""
    deadline = time.monotonic() + budget_seconds
    current = list(ops)
    index = len(current) - 1
    while index >= 0 and time.monotonic() < deadline:
        candidate = current[:index] + current[index + 1:]
        for _ in range(3):
            problems = await run_round(Round(connection_string, seed, candidate,
                                             fail_rate=fail_rate))
            if any(checks is None or p.split(":")[0] in checks for p in problems):
                current = candidate
                break
        index -= 1
    return current


async def torture(connection_string: str, *, seed: int, rounds: int | None,
                  duration: float | None, length: int = 40, out: Any = sys.stdout,
                  shrink_seconds: float = 120.0, kinds: tuple[str, ...] = KINDS,
                  checks: tuple[str, ...] | None = None) -> bool:
    """Run rounds until `rounds` or `duration`; True when every invariant held in every round."""
    invariants = [i for i in INVARIANTS if checks is None or i.split(":")[0] in checks]
    print("invariants checked:", file=out)
    for invariant in invariants:
        print(f"  - {invariant}", file=out)
    started = time.monotonic()
    master = random.Random(seed)
    done = operations = calls = injected = acknowledged = spend_checked = 0
    streamed = stopped = budgets_checked = budget_replies = 0
    while (rounds is None or done < rounds) and (duration is None or
                                                 time.monotonic() - started < duration):
        round_seed = master.getrandbits(32)
        ops = history(random.Random(round_seed), f"r{done}", length, kinds)
        # A third of the rounds fail no storage call (delays only): spend is checked everywhere.
        state = Round(connection_string, round_seed, ops,
                      fail_rate=random.Random(round_seed).choice((0.0, 0.02, 0.05)))
        problems = [p for p in await run_round(state)
                    if checks is None or p.split(":")[0] in checks]
        done += 1
        operations += len(ops)
        calls += len(state.calls)
        injected += sum(c.injected for c in state.calls)
        spend_checked += state.spend_checked
        streamed += len(state.connector.streams.streams)
        stopped += sum(1 for o in state.outcomes.values() if o.stopped)
        acknowledged += sum(1 for o in state.outcomes.values() if _is_answer(o.reply))
        budgets_checked += state.budgets_checked
        budget_replies += sum(1 for o in state.outcomes.values()
                              if (o.reply or "").startswith(_BUDGET_REPLIES))
        if problems:
            print(f"FAILED: seed {seed}, round {done - 1} (round seed {round_seed}):", file=out)
            for problem in problems:
                print(f"  {problem}", file=out)
            shortest = await shrink(connection_string, round_seed, ops,
                                    fail_rate=state.fail_rate, budget_seconds=shrink_seconds,
                                    checks=checks)
            print(f"shortest failing history ({len(shortest)} of {len(ops)} operations; "
                  f"re-run: --seed {seed}):", file=out)
            for op in shortest:
                print(f"  {op}", file=out)
            return False
    print(f"passed: seed {seed}, {done} rounds, {operations} operations ({acknowledged} answers "
          f"acknowledged; {streamed} replies streamed, {stopped} stopped by the user), {calls} "
          f"storage calls ({injected} failed on purpose), spend checked "
          f"in {spend_checked} conversations, budgets checked in {budgets_checked} accounts "
          f"({budget_replies} budget replies), {time.monotonic() - started:.0f} s", file=out)
    return True


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
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2 ** 32)
    rounds = args.rounds if args.rounds is not None or args.duration is not None else 5
    logging.disable(logging.ERROR)  # the bot's complaints under faults are expected here
    print(f"seed {seed}", flush=True)
    with given_or_started(os.environ.get(STORAGE_ENV)) as connection_string:
        ok = asyncio.run(torture(connection_string, seed=seed, rounds=rounds,
                                 duration=args.duration, length=args.length,
                                 kinds=tuple(args.kinds.split(",")) if args.kinds else KINDS,
                                 checks=tuple(args.check.split(",")) if args.check else None))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
