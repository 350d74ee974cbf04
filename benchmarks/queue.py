"""The turn queue as a Teams user feels it: the webhook's answer, "Thinking…", the queue's pickup,
and the first words, with a model that is slow to start and slow to finish.

The workers are dev hosts (the real app) in queue mode (`CHAT_ANSWER_MODE=queue`) with streaming
on, on Azurite's queue with host.json's queue settings; the Bot Connector stand-in enforces
Teams' streaming contract and notes when each request arrived; the model stand-in sends its first
token after 20 s and its answer over 20 s more. Clocks are this process's, except the pickup
delay, which the `answer` function logs (enqueue → start, from the ticket's enqueue time). Phases:

accept       ACCEPTS messages (after WARMUP untimed), one at a time, each to a new personal chat,
             while the turns of the earlier ones run in the worker: POST → 200, POST →
             informative update ("Thinking…", sent by the webhook before it answers).
latency      TURNS turns in their own personal chats, started 1.3 s apart (so the queue's polling
             is caught in different states of its backoff): the pickup delay; the model's first
             token → the first words on the channel, pickup included; model end → final message.
contention   20 messages at once to ONE personal chat over TWO workers: every message stored once,
             model calls per turn. This phase uses a quick model (its first token after 0.2 s, 60
             words over 1.5 s): with the slow one, twenty turns of one chat, answered one after the
             other, would take some 7 minutes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
import uuid
from typing import Any

import aiohttp
from aiohttp import web

from devtools.fake_channel import FakeConnector

from .common import code_version, machine, median, now_iso
from .streaming import _kind
from .webhook import (
    TimedModelServer,
    Worker,
    _history,
    _stored_once,
    message,
    percentile,
    post,
    worker_env,
    workers,
)

ACCEPTS = 100
#: Posts before the timed ones: the first creates the inbox table and the queue.
WARMUP = 3
TURNS = 4
FIRST_TOKEN_SECONDS = 20.0
WORDS = 200
REPLY_SECONDS = 20.0
CONTENTION_POSTS = 20
TARGETS = {"post_to_200_p99_ms": 100.0, "informative_s": 0.3,
           "first_words_after_first_token_s": 1.5, "model_calls_per_turn": 1.5}
ANSWER = " ".join(f"word{index}" for index in range(WORDS))
_PICKED_UP = re.compile(r"picked up after (\d+) ms \(dequeue 1 ")


#: The accept phase stops its worker with turns still streaming: the model stand-in's "cannot
#: write to closing transport" tracebacks that follow are expected, and not printed.
logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class ArrivalsByQuestion(TimedModelServer):
    """Notes when the model was asked each question (the newest user message)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.asked: dict[str, float] = {}

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        users = [m.get("content") for m in body.get("messages", []) if m.get("role") == "user"]
        if users:
            self.asked.setdefault(str(users[-1]), time.perf_counter())
        return await super()._handle(request)


def _queue_env(connection_string: str, table: str, model: TimedModelServer) -> dict[str, str]:
    return {**worker_env(connection_string, table, model), "CHAT_STREAMING": "on",
            "CHAT_ANSWER_MODE": "queue", "CHAT_TURN_QUEUE": f"bench-{uuid.uuid4().hex[:12]}",
            "CHAT_MODEL_TIMEOUT_SECONDS": "90"}


async def _accept(http: aiohttp.ClientSession, worker: Worker,
                  connector: FakeConnector) -> list[dict[str, float]]:
    accepted = []
    for number in range(WARMUP + ACCEPTS):
        conversation = f"a:accept-{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        result = await post(http, worker, message(f"question {number}", conversation_id=conversation,
                                                  service_url=connector.url))
        if result.status != 200:
            raise RuntimeError(f"not accepted: {result.status} {result.body[:200]!r}")
        informative = next(r for r in connector.requests if r["conversation_id"] == conversation
                           and _kind(r["activity"]) == "informative")
        accepted.append({"post_ms": result.ms, "informative_s": informative["at"] - started})
    return accepted[WARMUP:]


async def _latency(http: aiohttp.ClientSession, worker: Worker, model: ArrivalsByQuestion,
                   connector: FakeConnector) -> list[dict[str, float]]:
    async def one(number: int) -> dict[str, float]:
        await asyncio.sleep(number * 1.3)
        conversation = f"a:latency-{uuid.uuid4().hex[:8]}"
        text = f"tell me a long story {number}"
        started = time.perf_counter()
        result = await post(http, worker, message(text, conversation_id=conversation,
                                                  service_url=connector.url))
        if result.status != 200:
            raise RuntimeError(f"not accepted: {result.status} {result.body[:200]!r}")
        deadline = started + FIRST_TOKEN_SECONDS + REPLY_SECONDS + 30
        while not connector.messages(conversation):
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no answer in {conversation}")
            await asyncio.sleep(0.05)
        seen = [r for r in connector.requests if r["conversation_id"] == conversation]
        words = next(r for r in seen if _kind(r["activity"]) == "streaming")
        final = next(r for r in seen if r["activity"].get("type") == "message")
        first_token = model.asked[text] + FIRST_TOKEN_SECONDS
        return {"answered_ms": result.ms, "model_asked_after_200_s": model.asked[text] - started - result.ms / 1000,
                "first_words_after_first_token_s": words["at"] - first_token,
                "final_s": final["at"] - started}

    model.reply = lambda body: ANSWER
    return list(await asyncio.gather(*(one(number) for number in range(TURNS))))


async def _contention(http: aiohttp.ClientSession, pair: list[Worker], model: TimedModelServer,
                      connector: FakeConnector) -> dict[str, Any]:
    conversation = f"a:contention-{uuid.uuid4().hex[:8]}"
    model.reply = lambda body: " ".join(["a short answer"] * 20)
    activities = [message(f"race {k}", conversation_id=conversation, service_url=connector.url)
                  for k in range(CONTENTION_POSTS)]
    calls_before = model.calls
    results = await asyncio.gather(*(post(http, pair[k % 2], a) for k, a in enumerate(activities)))
    deadline = time.perf_counter() + 300
    while len(connector.messages(conversation)) < CONTENTION_POSTS:
        if time.perf_counter() > deadline:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # a duplicate would come now
    history = await _history(http, pair[0], conversation)
    calls = model.calls - calls_before
    return {"posted": CONTENTION_POSTS,
            "statuses": {str(s): sum(1 for r in results if r.status == s) for s in {r.status for r in results}},
            "post_ms_max": round(max(r.ms for r in results), 1),
            "stored_once": _stored_once(history, activities),
            "replies": len(connector.messages(conversation)),
            "model_calls": calls,
            "model_calls_per_turn": round(calls / CONTENTION_POSTS, 3),
            "violations": list(connector.streams.violations)}


def _pickups(worker: Worker) -> list[float]:
    return [int(found) / 1000 for found in _PICKED_UP.findall(worker.host.log_text())]


async def run(connection_string: str) -> dict[str, Any]:
    _log(f"queue: first token after {FIRST_TOKEN_SECONDS:.0f} s, {WORDS} words over {REPLY_SECONDS:.0f} s; "
         f"{ACCEPTS} accepted, {TURNS} turns timed, contention {CONTENTION_POSTS} posts over two workers")
    model = ArrivalsByQuestion(first_token_after=FIRST_TOKEN_SECONDS,
                               word_interval=REPLY_SECONDS / WORDS)
    model.reply = lambda body: ANSWER
    connector = FakeConnector()
    await model.start()
    await connector.start()
    results: dict[str, Any] = {"measured_at": now_iso(), "code": code_version(), "machine": machine()}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
            table = f"q{uuid.uuid4().hex[:16]}"
            async with workers([_queue_env(connection_string, table, model)]) as (worker,):
                _log("queue: accept phase")
                accepted = await _accept(http, worker, connector)
            async with workers([_queue_env(connection_string, table, model)]) as (worker,):
                _log("queue: latency phase (about a minute)")
                turns = await _latency(http, worker, model, connector)
                pickups = _pickups(worker)
            model.first_token_after, model.word_interval = 0.2, 0.025  # 60 words in 1.5 s
            env = _queue_env(connection_string, table, model)
            async with workers([env, env]) as pair:
                _log("queue: contention phase")
                contention = await _contention(http, pair, model, connector)
    finally:
        await connector.stop()
        await model.stop()
    posts = [a["post_ms"] for a in accepted]
    figures = {
        "post_to_200_p50_ms": percentile(posts, 50),
        "post_to_200_p99_ms": percentile(posts, 99),
        "informative_s": median([a["informative_s"] for a in accepted]),
        "informative_max_s": max(a["informative_s"] for a in accepted),
        "pickup_median_s": median(pickups) if pickups else float("nan"),
        "pickup_max_s": max(pickups) if pickups else float("nan"),
        "first_words_after_first_token_s": median([t["first_words_after_first_token_s"] for t in turns]),
        "first_words_after_first_token_max_s": max(t["first_words_after_first_token_s"] for t in turns),
        "model_asked_after_200_s": median([t["model_asked_after_200_s"] for t in turns]),
        "final_s": median([t["final_s"] for t in turns]),
    }
    results |= {"figures": {k: round(v, 3) for k, v in figures.items()}, "targets": TARGETS,
                "model": {"first_token_s": FIRST_TOKEN_SECONDS, "reply_s": REPLY_SECONDS, "words": WORDS},
                "accepted": len(accepted), "turns": turns, "pickups_s": pickups,
                "contention": contention}
    _print(results)
    return results


def _print(r: dict[str, Any]) -> None:
    f, c = r["figures"], r["contention"]
    rows = [
        ("POST → 200, message activities (p50)", f"{f['post_to_200_p50_ms']:.1f} ms", "", None),
        ("POST → 200, message activities (p99)", f"{f['post_to_200_p99_ms']:.1f} ms", "≤ 100 ms",
         f["post_to_200_p99_ms"] <= 100),
        ("POST → informative update (median)", f"{f['informative_s']:.3f} s", "≤ 0.3 s",
         f["informative_s"] <= 0.3),
        ("queue pickup delay (median / max)", f"{f['pickup_median_s']:.3f} / {f['pickup_max_s']:.3f} s",
         "", None),
        ("200 → the model asked: pickup + window (median)", f"{f['model_asked_after_200_s']:.3f} s",
         "", None),
        ("model's first token → first words (median)", f"{f['first_words_after_first_token_s']:.3f} s",
         "≤ 1.5 s", f["first_words_after_first_token_s"] <= 1.5),
        ("POST → final message (median)", f"{f['final_s']:.1f} s", "", None),
        ("contention: stored exactly once", f"{c['stored_once']}/{c['posted']}", "all",
         c["stored_once"] == c["posted"]),
        ("contention: replies sent", f"{c['replies']}", f"{c['posted']}", c["replies"] == c["posted"]),
        ("contention: model calls per turn", f"{c['model_calls_per_turn']:.2f}", "≤ 1.5",
         c["model_calls_per_turn"] <= 1.5),
    ]
    print("\n| figure | measured | target | |\n| --- | --- | --- | --- |")
    for name, value, target, ok in rows:
        print(f"| {name} | {value} | {target} | {'' if ok is None else 'met' if ok else 'NOT met'} |")
    print(f"contention: statuses {c['statuses']}, slowest POST {c['post_ms_max']} ms; "
          f"contract violations {c['violations']}")
