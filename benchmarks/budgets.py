"""What users' and tenants' budgets cost a turn: storage operations (counted at the HTTP layer) and
milliseconds, budgets off and on; and one tenant's row under many calls at once.

`python -m benchmarks.run --only budgets`. In this process: the real `ChatBot` (inline turns,
expectReplies) on the real Table store over Azurite, each storage request counted by an azure-core
per-call policy on its `TableClient`; the model at the transport (the real openai SDK over an
httpx2 mock: no latency, 1,000 tokens billed a call). Modes, each on its own table, TURNS turns
one after the other by USERS users of one tenant in CONVERSATIONS conversations:

off       no ledgers at all: the turn as it was before budgets (the baseline)
usage     no limit set: each turn's usage recorded in its user's and tenant's ledgers once, at
          the turn's end (a read and a conditional write each, at once)
limits    CHAT_USER_DAILY_TOKEN_LIMIT, CHAT_USER_TURNS_PER_MINUTE, CHAT_TENANT_DAILY_TOKEN_LIMIT:
          each model call reserved in the user's, then the tenant's ledger before it, settled in
          both after it

A turn's figures: storage requests by method, and the wall time from the message to the reply
(median, p90). Then `contention`: CONTENDED first calls at once of one tenant over three
instances with limits on: how many were answered, and the wall time of the whole burst.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter
from typing import Any

import httpx2
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import AsyncHTTPPolicy
from azure.data.tables.aio import TableClient

from shared.auth import BotAuthenticator
from shared.bot import ChatBot
from shared.connector import BotConnector
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import load_settings
from shared.store import TableConversationStore

from .common import code_version, machine, median, now_iso, p90

TURNS = 300
WARMUP = 20
USERS = 5
CONVERSATIONS = 20
CONTENDED = 50
MODES: dict[str, dict[str, str]] = {
    "off": {},
    "usage": {},
    "limits": {"CHAT_USER_DAILY_TOKEN_LIMIT": "100000000", "CHAT_USER_TURNS_PER_MINUTE": "10000",
               "CHAT_TENANT_DAILY_TOKEN_LIMIT": "100000000000"},
}


class Counting(AsyncHTTPPolicy):  # type: ignore[type-arg]
    """Counts the storage requests a store sends, by method."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: Counter[str] = Counter()

    async def send(self, request: PipelineRequest) -> PipelineResponse:  # type: ignore[type-arg]
        self.requests[request.http_request.method] += 1
        return await self.next.send(request)


async def _model(request: httpx2.Request) -> httpx2.Response:
    body = json.loads(request.content)
    return httpx2.Response(200, json={
        "id": "x", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
        "usage": {"prompt_tokens": 900, "completion_tokens": 100, "total_tokens": 1_000},
        "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": f"re {len(body['messages'])}"}}]})


def _bot(store: TableConversationStore, mode: str) -> ChatBot:
    settings = load_settings({"OPENAI_API_KEY": "sk-bench", "CHAT_ANSWER_MODE": "inline",
                              "CHAT_SUMMARY": "off", "CHAT_SUGGESTED_REPLIES": "off",
                              **MODES[mode]})
    model = build_model(settings.model,
                        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(_model)))
    bot = ChatBot(settings=settings, store=store, prompt=ChatPrompt(model),
                  connector=BotConnector(credential=None),
                  authenticator=BotAuthenticator(settings.bot, http=httpx2.AsyncClient(),
                                                 in_azure=False))
    if mode == "off":
        bot.answerer.turns.budgets = None
    return bot


def _activity(index: int, *, user: str | None = None) -> bytes:
    return json.dumps({"type": "message", "id": uuid.uuid4().hex, "text": f"question {index}",
                       "channelId": "test", "deliveryMode": "expectReplies",
                       "conversation": {"id": f"c{index % CONVERSATIONS}", "tenantId": "contoso"},
                       "from": {"id": user or f"29:u{index % USERS}"}}).encode()


async def _store(connection_string: str, table: str) -> tuple[TableConversationStore, Counting]:
    counting = Counting()
    store = TableConversationStore(table=TableClient.from_connection_string(
        connection_string, table_name=table, per_call_policies=[counting]))
    await store.ping()
    return store, counting


async def _mode(connection_string: str, mode: str) -> dict[str, Any]:
    store, counting = await _store(connection_string, f"budgets{mode}{uuid.uuid4().hex[:8]}")
    bot = _bot(store, mode)
    headers = {"Content-Type": "application/json"}
    try:
        for index in range(WARMUP):
            await bot.handle(body=_activity(index), headers=headers)
        counting.requests.clear()
        elapsed = []
        for index in range(TURNS):
            started = time.perf_counter()
            response = await bot.handle(body=_activity(index), headers=headers)
            elapsed.append((time.perf_counter() - started) * 1000)
            assert response.status == 200 and response.body is not None, response
    finally:
        await bot.prompt.model.close()
        await store.close()
    per_turn = {method: round(count / TURNS, 2) for method, count in sorted(counting.requests.items())}
    return {"storage_requests_per_turn": round(sum(counting.requests.values()) / TURNS, 2),
            "by_method": per_turn, "turn_ms_p50": round(median(elapsed), 2),
            "turn_ms_p90": round(p90(elapsed), 2)}


async def _contention(connection_string: str) -> dict[str, Any]:
    table = f"budgetsburst{uuid.uuid4().hex[:8]}"
    stores = [await _store(connection_string, table) for _ in range(3)]
    bots = [_bot(store, "limits") for store, _ in stores]
    headers = {"Content-Type": "application/json"}
    try:
        started = time.perf_counter()
        responses = await asyncio.gather(*(
            bots[i % 3].handle(body=_activity(i, user=f"29:burst{i}"), headers=headers)
            for i in range(CONTENDED)))
        seconds = time.perf_counter() - started
    finally:
        for bot in bots:
            await bot.prompt.model.close()
        for store, _ in stores:
            await store.close()
    answered = sum(1 for r in responses if r.status == 200 and r.body is not None)
    return {"turns": CONTENDED, "instances": 3, "answered": answered,
            "burst_seconds": round(seconds, 2),
            "storage_requests": sum(sum(c.requests.values()) for _, c in stores)}


async def run(connection_string: str) -> dict[str, Any]:
    logging.getLogger("shared").setLevel(logging.ERROR)
    modes = {mode: await _mode(connection_string, mode) for mode in MODES}
    contention = await _contention(connection_string)
    off = modes["off"]
    for mode in ("usage", "limits"):
        modes[mode]["added_requests_per_turn"] = round(
            modes[mode]["storage_requests_per_turn"] - off["storage_requests_per_turn"], 2)
        modes[mode]["added_ms_p50"] = round(modes[mode]["turn_ms_p50"] - off["turn_ms_p50"], 2)
    section = {"measured_at": now_iso(), "code": code_version(), "machine": machine(),
               "turns": TURNS, "users": USERS, "conversations": CONVERSATIONS, **modes,
               "contention": contention}
    print(f"\nbudgets ({TURNS} turns one after the other, {USERS} users of one tenant, model "
          f"latency 0; storage requests counted at the HTTP layer)")
    print(f"  {'mode':<8} {'requests/turn':>14} {'added':>7} {'p50 ms':>8} {'added':>7} "
          f"{'p90 ms':>8}  by method")
    for mode, figures in modes.items():
        print(f"  {mode:<8} {figures['storage_requests_per_turn']:>14.2f} "
              f"{figures.get('added_requests_per_turn', 0):>7.2f} {figures['turn_ms_p50']:>8.2f} "
              f"{figures.get('added_ms_p50', 0):>7.2f} {figures['turn_ms_p90']:>8.2f}  "
              f"{figures['by_method']}")
    print(f"  contention: {CONTENDED} first calls at once of one tenant over 3 instances, limits "
          f"on: {contention['answered']} answered in {contention['burst_seconds']} s")
    return section
