"""The randomized concurrency test: seeded random interleavings of every operation, checked.

    python -m tests.integration.torture [--seed N] [--rounds N | --duration SECONDS]
    (`make torture SEED=… ROUNDS=…` or `DURATION=…`; a short run is in tests/integration)

Each round: two bot instances (two `ChatBot`s, each on its own `TableConversationStore`) on one
Azurite table; a seeded random history of turns (new, duplicate deliveries, tool loops cut by the
round limit, replies over the daily token limit), /reset, DELETE conversation, a user's export and
removal, retention purges, summary preparation and feedback, started at random moments so they
overlap; storage calls delayed and failed at random (a per-call policy on each real TableClient,
`storage_faults.py`). Then the invariants (`INVARIANTS`) are checked against a model of what was
acknowledged, with moments taken from the storage calls themselves: when a clear's hiding write
was answered, when a turn's commit was sent. A failing round prints its seed and the shortest
history that still fails (operations dropped one at a time and the round run again).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import itertools
import json
import logging
import os
import random
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx2
from azure.core.exceptions import ServiceRequestError
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import AsyncHTTPPolicy
from azure.data.tables.aio import TableClient

from devtools.azurite import STORAGE_ENV, given_or_started
from shared.bot import APOLOGY, RESET_DONE, ChatBot
from shared.errors import ChatstateError
from shared.keys import encode_key
from shared.limits import LIMIT_REPLIES
from shared.messages import Feedback, utc_day, utc_now
from shared.store import REMOVED_MARKER, TableConversationStore
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
    "spend: the spend counters equal the tokens billed by the model (conversations whose "
    "spend-carrying writes met no injected failure)",
)

USERS = ("29:u1", "29:u2", "29:u3")
TOKENS_PER_CALL = 400
DAILY_LIMIT = 40 * TOKENS_PER_CALL
_tick = itertools.count()
#: Replies that are not an answer the turn stored.
_NOT_ANSWERS = {APOLOGY, RESET_DONE, *LIMIT_REPLIES.values()}
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


class ScriptedModel:
    """The model at the transport: bills `TOKENS_PER_CALL` a call, by conversation; answers
    `re <activity> #<call>` (a tool call for a `loop` turn, until the round limit cuts it)."""

    def __init__(self) -> None:
        self.billed: dict[str, int] = defaultdict(int)
        self.calls = 0

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.calls += 1
        body = json.loads(request.content)
        users = [m for m in body["messages"] if m.get("role") == "user"]
        conversation, activity_id, variant = str(users[-1]["content"]).split("|")[:3]
        self.billed[conversation] += TOKENS_PER_CALL
        usage = {"prompt_tokens": 300, "completion_tokens": 100, "total_tokens": TOKENS_PER_CALL}
        if variant == "loop":
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"c{self.calls}", "type": "function",
                "function": {"name": "lookup", "arguments": "{}"}}]}
        else:
            message = {"role": "assistant", "content": f"re {activity_id} #{self.calls}"}
        return httpx2.Response(200, json={"id": "x", "object": "chat.completion", "created": 0,
                                          "model": "m", "usage": usage, "choices": [{
                                              "index": 0, "finish_reason": "stop",
                                              "message": message}]})


#: The operations a history draws from, as often as they are listed.
KINDS = ("turn",) * 10 + ("loop", "duplicate", "duplicate", "duplicate", "reset", "delete",
                          "export", "forget", "purge", "summary", "summary", "feedback",
                          "feedback")


def history(rng: random.Random, round_id: str, length: int,
            kinds: tuple[str, ...] = KINDS) -> list[Op]:
    """A random history of `length` operations on three conversations of one round."""
    conversations = {f"{round_id}-g": None, f"{round_id}-p1": USERS[0], f"{round_id}-p2": USERS[1]}
    ops: list[Op] = []
    activities: list[tuple[str, str, str]] = []
    for index in range(length):
        kind = rng.choice(list(kinds))
        conversation = rng.choice(list(conversations))
        owner = conversations[conversation]
        user = owner or rng.choice(USERS)
        instance, delay = rng.randrange(2), rng.uniform(0, 0.4)
        if kind == "duplicate" and activities:
            conversation, user, activity_id = rng.choice(activities)
            ops.append(Op(index, "turn", conversation, user, activity_id, instance, delay))
            continue
        if kind in ("turn", "loop", "duplicate", "reset"):
            activity_id = uuid.UUID(int=rng.getrandbits(128)).hex[:12]
            if kind != "reset":
                activities.append((conversation, user, activity_id))
            ops.append(Op(index, "reset" if kind == "reset" else "turn", conversation, user,
                          activity_id, instance, delay, "loop" if kind == "loop" else ""))
        elif kind == "feedback" and activities:
            conversation, user, activity_id = rng.choice(activities)
            ops.append(Op(index, "feedback", conversation, user, activity_id, instance, delay))
        elif kind in ("export", "forget"):
            ops.append(Op(index, kind, user=rng.choice(USERS), instance=instance, delay=delay))
        elif kind == "purge":
            ops.append(Op(index, "purge", instance=instance, delay=delay))
        elif kind in ("delete", "summary"):
            ops.append(Op(index, kind, conversation, instance=instance, delay=delay))
    return ops


def _activity(op: Op, text: str) -> bytes:
    return json.dumps({"type": "message", "id": op.activity_id, "text": text,
                       "conversation": {"id": op.conversation, "isGroup": op.conversation.endswith("-g")},
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
                             CHAT_HISTORY_TOKEN_BUDGET="200"))
    day = utc_day(utc_now())
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


async def _run_op(op: Op, state: Round, bot: ChatBot, store: TableConversationStore) -> None:
    await asyncio.sleep(op.delay)
    _current_op.set(op.index)
    outcome = state.outcomes[op.index] = Outcome(start=next(_tick))
    try:
        if op.kind in ("turn", "reset"):
            text = "/reset" if op.kind == "reset" else \
                f"{op.conversation}|{op.activity_id}|{op.variant or 'answer'}"
            response = await bot.handle(body=_activity(op, text), headers={
                "Content-Type": "application/json"})
            outcome.status = response.status
            replies = (response.body or {}).get("activities") or []
            outcome.reply = replies[-1].get("text") if replies else None
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
        elif op.kind == "feedback":
            await store.mark_delivered(op.conversation, op.activity_id, reply_id=f"r-{op.activity_id}")
            await store.rate_reply(op.conversation, f"r-{op.activity_id}", Feedback(reaction="like"))
            outcome.status = 200
    except ChatstateError as exc:
        outcome.error, outcome.status = type(exc).__name__, 503
    finally:
        outcome.end = next(_tick)


def _on_head(call: Call, pk: str) -> bool:
    return f"PartitionKey='{pk}'" in call.url and "RowKey='h'" in call.url


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
        if op.kind == "turn" and outcome.status == 200 and outcome.reply is not None \
                and outcome.reply not in _NOT_ANSWERS:
            if outcome.reply != REMOVED_MARKER:  # the answer, redacted by the user's removal
                answers[op.activity_id].add(str(outcome.reply))
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
    now = utc_now()
    if utc_day(now) == day:
        faulted = {ops[c.op].conversation for c in state.calls if c.injected and c.op in ops}
        for conversation in conversations:
            if conversation in faulted:
                continue  # a failed spend write may have lost tokens: logged, not counted here
            state.spend_checked += 1
            window = await store.load_window(conversation, token_budget=100, max_messages=1)
            counted, billed = window.spend.tokens_on_day(now), state.model.billed[conversation]
            if counted != billed:
                problems.append(f"spend: {conversation} counts {counted} tokens, the model "
                                f"billed {billed}")
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
        acknowledged += sum(1 for o in state.outcomes.values() if o.reply is not None
                            and o.reply not in _NOT_ANSWERS)
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
          f"acknowledged), {calls} storage calls ({injected} failed on purpose), spend checked "
          f"in {spend_checked} conversations, {time.monotonic() - started:.0f} s", file=out)
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
