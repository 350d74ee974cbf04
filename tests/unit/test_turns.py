"""The turn logic on the in-memory store (no I/O): conflicts between workers, bounded retries,
dedupe."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx2

from shared.auth import BotAuthenticator
from shared.bot import MAX_REASKS, ChatBot
from shared.connector import BotConnector
from shared.errors import ConversationConflict
from shared.limits import Spend
from shared.messages import ChatMessage, StoredTurn, utc_now
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import load_settings
from shared.store import ConversationWindow, InMemoryConversationStore


class CountingModel:
    """An OpenAI-compatible handler at the transport layer; the real SDK runs on top."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.calls += 1
        await asyncio.sleep(0.001)
        body = json.loads(request.content)
        text = f"echo {body['messages'][-1]['content']}"
        return httpx2.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}]})


def make_bot(store: Any, handler: CountingModel, *, real_backoff: bool = False,
             clock: Callable[[], datetime] = utc_now, **env: str) -> ChatBot:
    settings = load_settings({"OPENAI_API_KEY": "sk-test", **env})
    model = build_model(settings.model, http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)))
    return ChatBot(settings=settings, store=store, prompt=ChatPrompt(model),
                   connector=BotConnector(credential=None),
                   authenticator=BotAuthenticator(settings.bot, http=httpx2.AsyncClient(), in_azure=False),
                   clock=clock, sleep=asyncio.sleep if real_backoff else (lambda _: asyncio.sleep(0)))


def activity(text: str, conversation: str, activity_id: str | None = None) -> bytes:
    return json.dumps({"type": "message", "id": activity_id or uuid.uuid4().hex, "text": text,
                       "conversation": {"id": conversation}, "deliveryMode": "expectReplies",
                       "channelId": "test"}).encode()


HEADERS = {"Content-Type": "application/json"}


async def test_two_workers_racing_on_one_conversation_store_every_turn_once() -> None:
    # GIVEN two bots (two workers: no shared lock) on one store, with the jittered backoff
    store, model = InMemoryConversationStore(), CountingModel()
    workers = [make_bot(store, model, real_backoff=True, CHAT_TURN_MAX_ATTEMPTS="8") for _ in range(2)]
    # WHEN 40 messages to one conversation are spread over both at once
    responses = await asyncio.gather(*(
        workers[i % 2].handle(body=activity(f"m{i}", "shared"), headers=HEADERS) for i in range(40)))
    # THEN every turn is stored once, whole, and conflicts cost bounded extra model calls
    assert [r.status for r in responses] == [200] * 40
    stored = await store.list_messages("shared")
    assert len(stored) == 80 and model.calls < 80
    users = [m.content for m in stored if m.role == "user"]
    assert len(users) == len(set(users))
    assert all(stored[i].role == "user" and stored[i + 1].content == f"echo {stored[i].content}"
               for i in range(0, len(stored), 2))


class AlwaysConflicting(InMemoryConversationStore):
    async def _commit_turn(self, window: ConversationWindow, *, activity_id: str,
                           activity_ids: tuple[str, ...], messages: list[ChatMessage],
                           tokens: list[int], spend: Spend) -> StoredTurn:
        raise ConversationConflict("someone else always wins")


async def test_when_attempts_run_out_the_answer_is_503_and_nothing_is_written() -> None:
    # GIVEN a store on which every commit loses the race, and 3 attempts a turn
    store, model = AlwaysConflicting(), CountingModel()
    bot = make_bot(store, model, CHAT_TURN_MAX_ATTEMPTS="3")
    # WHEN a message arrives
    response = await bot.handle(body=activity("hi", "busy"), headers=HEADERS)
    # THEN the channel is told to retry later, nothing is stored, and the model was asked twice:
    # once, and once more after the first lost race (later attempts commit that answer)
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    assert response.body is not None and response.body["error"] == "conversation_busy"
    assert model.calls == 1 + MAX_REASKS and await store.list_messages("busy") == []


async def test_one_worker_queues_turns_of_a_conversation_without_conflicts() -> None:
    # GIVEN one worker
    store, model = InMemoryConversationStore(), CountingModel()
    bot = make_bot(store, model)
    # WHEN 20 messages to one conversation arrive at once
    responses = await asyncio.gather(*(bot.handle(body=activity(f"q{i}", "queue"), headers=HEADERS)
                                       for i in range(20)))
    # THEN they queue behind the in-process lock: one model call each, every turn stored
    assert [r.status for r in responses] == [200] * 20 and model.calls == 20
    assert len(await store.list_messages("queue")) == 40


async def test_a_retried_activity_returns_the_stored_reply_without_a_model_call() -> None:
    # GIVEN an answered activity (expectReplies: the reply is the response body)
    store, model = InMemoryConversationStore(), CountingModel()
    bot = make_bot(store, model)
    first = await bot.handle(body=activity("once", "dup", "act-1"), headers=HEADERS)
    # WHEN the channel sends it again
    again = await bot.handle(body=activity("once", "dup", "act-1"), headers=HEADERS)
    # THEN the same reply comes back, and the model was asked once
    assert first.body is not None and first.body["activities"][0]["text"] == "echo once"
    assert again.body == first.body and model.calls == 1
