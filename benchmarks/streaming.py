"""Streamed replies as a Teams user feels them: time to the informative update, to the first model
words on the channel and to the final message, against the same turn unstreamed.

The worker is the dev host (the real app) with streaming on; the Bot Connector stand-in enforces
Teams' streaming contract (devtools/teams_streams.py) and notes when each request arrived; the model
stand-in sends its first token after 0.5 s and a 300-word reply over 5 s. All clocks are this
process's (the stand-ins run in its event loop). Phases:

latency      TURNS turns, each in a new personal chat, one at a time: POST → informative update,
             → first streaming update, → final message; model end (its last word) → final.
unstreamed   the same turns with CHAT_STREAMING=off: POST → the one message.
contention   20 messages at once to ONE personal chat over TWO workers, a model that streams 60
             words in 1.5 s: every message stored once; model calls per streamed turn (one whose
             words the user read before it ended). Teams allows one stream per chat at a time, so
             turns that find the chat streaming fall back to one message; those, not yet shown,
             may be asked again after a conflict.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
import uuid
from typing import Any

import aiohttp

from devtools.fake_channel import FakeConnector

from .common import code_version, machine, median, now_iso
from .webhook import (
    TimedModelServer,
    Worker,
    _history,
    _stored_once,
    message,
    post,
    worker_env,
    workers,
)

TURNS = 5
FIRST_TOKEN_SECONDS = 0.5
WORDS = 300
REPLY_SECONDS = 5.0
CONTENTION_POSTS = 20
TARGETS = {"informative_s": 0.3, "first_words_after_first_token_s": 1.2,
           "final_after_model_end_s": 1.2, "max_updates_per_second": 1.0,
           "model_calls_per_streamed_turn": 1.0}
ANSWER = " ".join(f"word{index}" for index in range(WORDS))


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _kind(activity: dict[str, Any]) -> str | None:
    info = next((e for e in activity.get("entities", []) if e.get("type") == "streaminfo"), None)
    return info.get("streamType") if info else None


async def _latency(http: aiohttp.ClientSession, worker: Worker, model: TimedModelServer,
                   connector: FakeConnector, *, streamed: bool) -> list[dict[str, float]]:
    turns = []
    for number in range(TURNS):
        conversation = f"a:stream-{uuid.uuid4().hex[:8]}"
        model.reply = lambda body: ANSWER
        ends = len(model.stream_ends)
        started = time.perf_counter()
        result = await post(http, worker, message(f"tell me a story {number}", conversation_id=conversation,
                                                  service_url=connector.url))
        seen = [r for r in connector.requests if r["conversation_id"] == conversation]
        if result.status != 200 or not seen:
            raise RuntimeError(f"turn failed: {result.status} {result.body[:200]!r}")
        final = next(r for r in reversed(seen) if r["activity"].get("type") == "message")
        turn = {"final_s": final["at"] - started}
        if streamed:
            informative = next(r for r in seen if _kind(r["activity"]) == "informative")
            words = next((r for r in seen if _kind(r["activity"]) == "streaming"), final)
            gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(seen)]
            model_end = model.stream_ends[ends]
            turn |= {"informative_s": informative["at"] - started,
                     "first_words_s": words["at"] - started,
                     "first_words_after_first_token_s": words["at"] - started - FIRST_TOKEN_SECONDS,
                     "final_after_model_end_s": final["at"] - model_end,
                     "updates": len(seen), "min_gap_s": min(gaps) if gaps else 0.0}
        turns.append(turn)
    return turns


async def _contention(http: aiohttp.ClientSession, pair: list[Worker], model: TimedModelServer,
                      connector: FakeConnector) -> dict[str, Any]:
    conversation = f"a:contention-{uuid.uuid4().hex[:8]}"
    model.reply = lambda body: " ".join(["a short answer"] * 20)
    activities = [message(f"race {k}", conversation_id=conversation, service_url=connector.url)
                  for k in range(CONTENTION_POSTS)]
    calls_before = model.calls
    results = await asyncio.gather(*(post(http, pair[k % 2], a) for k, a in enumerate(activities)))
    history = await _history(http, pair[0], conversation)
    streams = connector.streams.of(conversation)
    # A streamed turn: the user read words of it (an accepted streaming update) before its end.
    finals = {s.id for s in streams if s.finished and s.text}
    streamed_ids = {r["activity"].get("replyToId") for r in connector.requests
                    if r["conversation_id"] == conversation and r["activity"].get("type") == "message"
                    and any(e.get("streamId") in finals for e in r["activity"].get("entities", []))}
    texts = {a["id"]: a["text"] for a in activities}
    asked = [request["messages"][-1]["content"] for request in model.requests[calls_before:]]
    streamed_calls = sum(asked.count(texts[activity_id]) for activity_id in streamed_ids)
    calls = model.calls - calls_before
    return {"posted": CONTENTION_POSTS,
            "statuses": {str(s): sum(1 for r in results if r.status == s) for s in {r.status for r in results}},
            "stored_once": _stored_once(history, activities),
            "streamed_turns": len(streamed_ids),
            "model_calls": calls,
            "model_calls_per_turn": round(calls / max(1, CONTENTION_POSTS), 3),
            "model_calls_per_streamed_turn": round(streamed_calls / max(1, len(streamed_ids)), 3),
            "violations": list(connector.streams.violations)}


async def run(connection_string: str) -> dict[str, Any]:
    _log(f"streaming: first token after {FIRST_TOKEN_SECONDS} s, {WORDS} words over {REPLY_SECONDS} s, "
         f"{TURNS} turns streamed and {TURNS} unstreamed; contention {CONTENTION_POSTS} posts over two workers")
    model = TimedModelServer(first_token_after=FIRST_TOKEN_SECONDS, word_interval=REPLY_SECONDS / WORDS)
    connector = FakeConnector()
    await model.start()
    await connector.start()
    results: dict[str, Any] = {"measured_at": now_iso(), "code": code_version(), "machine": machine()}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            table = f"s{uuid.uuid4().hex[:16]}"
            env = {**worker_env(connection_string, table, model), "CHAT_STREAMING": "on"}
            async with workers([env]) as (worker,):
                streamed = await _latency(http, worker, model, connector, streamed=True)
            async with workers([{**env, "CHAT_STREAMING": "off"}]) as (worker,):
                plain = await _latency(http, worker, model, connector, streamed=False)
            model.first_token_after, model.word_interval = 0.2, 0.025  # 60 words in 1.5 s
            async with workers([env, env]) as pair:
                contention = await _contention(http, pair, model, connector)
    finally:
        await connector.stop()
        await model.stop()
    figures = {
        "informative_s": median([t["informative_s"] for t in streamed]),
        "first_words_s": median([t["first_words_s"] for t in streamed]),
        "first_words_after_first_token_s": median([t["first_words_after_first_token_s"] for t in streamed]),
        "final_s": median([t["final_s"] for t in streamed]),
        "final_after_model_end_s": median([t["final_after_model_end_s"] for t in streamed]),
        "max_updates_per_second": round(1 / min(t["min_gap_s"] for t in streamed), 3),
        "unstreamed_final_s": median([t["final_s"] for t in plain]),
        "updates_per_turn": median([t["updates"] for t in streamed]),
    }
    results |= {"figures": {k: round(v, 3) for k, v in figures.items()}, "targets": TARGETS,
                "turns": streamed, "unstreamed_turns": plain, "contention": contention}
    _print(results)
    return results


def _print(r: dict[str, Any]) -> None:
    f, c = r["figures"], r["contention"]
    rows = [
        ("POST → informative update (median)", f"{f['informative_s']:.3f} s", "≤ 0.3 s",
         f["informative_s"] <= 0.3),
        ("first token → first model words on the channel", f"{f['first_words_after_first_token_s']:.3f} s",
         "≤ 1.2 s", f["first_words_after_first_token_s"] <= 1.2),
        ("model end → final message", f"{f['final_after_model_end_s']:.3f} s", "≤ 1.2 s",
         f["final_after_model_end_s"] <= 1.2),
        ("highest update rate seen", f"{f['max_updates_per_second']:.2f} /s", "≤ 1 /s",
         f["max_updates_per_second"] <= 1.0),
        ("POST → final, streamed", f"{f['final_s']:.2f} s", "", None),
        ("POST → the one message, unstreamed", f"{f['unstreamed_final_s']:.2f} s", "", None),
        ("contention: stored exactly once", f"{c['stored_once']}/{c['posted']}", "all",
         c["stored_once"] == c["posted"]),
        ("contention: model calls per streamed turn", f"{c['model_calls_per_streamed_turn']:.2f}",
         "1.00", c["model_calls_per_streamed_turn"] <= 1.0),
        ("contention: model calls per turn, all", f"{c['model_calls_per_turn']:.2f}", "", None),
    ]
    print("\n| figure | measured | target | |\n| --- | --- | --- | --- |")
    for name, value, target, ok in rows:
        print(f"| {name} | {value} | {target} | {'' if ok is None else 'met' if ok else 'NOT met'} |")
    print(f"contention: {c['streamed_turns']} turns streamed, the rest fell back to one message "
          f"(one stream per chat at a time); statuses {c['statuses']}; contract violations {c['violations']}")
