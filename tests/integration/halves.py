"""The two halves over a real queue, for the integration tests: the webhook (`ChatBot`) on Azurite's
table and queue services, a local model, the contract-enforcing Bot Connector stand-in, and a
stand-in of the Functions host's queue trigger (`queue_host.py`) with host.json's limits."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from azure.core.exceptions import ResourceNotFoundError

from devtools.fake_channel import FakeConnector
from devtools.fake_model import FakeModelServer
from shared.auth import BotAuthenticator
from shared.bot import ChatBot
from shared.connector import BotConnector
from shared.inbox import Inbox, max_dequeue_count
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import load_settings
from shared.store import TableConversationStore
from shared.summary import Summarizer
from tests.integration.queue_host import QueueHost

HEADERS = {"Content-Type": "application/json"}
MAX_DEQUEUE = max_dequeue_count(Path(__file__).parents[2] / "host.json")
#: A failed turn's retry waits this long here (host.json's visibilityTimeout, 5 s, in Azure).
RETRY_SECONDS = 0.3


@dataclass
class Worker:
    """One instance: its own clients (the webhook, the answer) and its own queue trigger."""

    bot: ChatBot
    store: TableConversationStore
    inbox: Inbox
    host: QueueHost


@dataclass
class Halves:
    workers: list[Worker]
    model: FakeModelServer
    connector: FakeConnector

    @property
    def bot(self) -> ChatBot:
        return self.workers[0].bot

    @property
    def store(self) -> TableConversationStore:
        return self.workers[0].store

    @property
    def inbox(self) -> Inbox:
        return self.workers[0].inbox

    @property
    def host(self) -> QueueHost:
        return self.workers[0].host

    async def settled(self, *, within: float = 30.0) -> None:
        """Wait until every accepted activity is answered (the inbox keeps none) and the queue
        hosts are idle (a wake-up for later may still wait in the queue: it finds nothing)."""
        async with asyncio.timeout(within):
            while True:
                for worker in self.workers:
                    await worker.host.idle(visible_only=True, within=within)
                if not await self.kept() and not any(w.host.busy for w in self.workers):
                    return
                await asyncio.sleep(0.05)

    async def kept(self) -> list[str]:
        """The activity rows the inbox keeps, in any conversation."""
        table = self.inbox._table  # the test peeks at the table it made
        try:
            return [str(row["RowKey"]) async for row in table.query_entities(
                "RowKey ge 'a' and RowKey lt 'b'", select=["RowKey"])]
        except ResourceNotFoundError:  # nothing was ever accepted
            return []

    async def post(self, body: bytes, *, worker: int = 0) -> tuple[int, float]:
        """The webhook's status and how long it took (s), on `worker`'s instance."""
        started = time.perf_counter()
        response = await self.workers[worker].bot.handle(body=body, headers=HEADERS)
        return response.status, time.perf_counter() - started

    def message(self, text: str, conversation_id: str, **fields: Any) -> bytes:
        return json.dumps({
            "type": "message", "id": fields.pop("id", uuid.uuid4().hex), "text": text,
            "channelId": "msteams", "serviceUrl": self.connector.url,
            "from": fields.pop("sender", {"id": "29:u", "name": "Ada"}), "recipient": {"id": "28:bot"},
            "conversation": {"id": conversation_id, "conversationType": "personal"},
            **fields}).encode()

    def user_texts(self, conversation_id: str) -> list[str]:
        """What the connector saw sent to the conversation, as text, in order."""
        return [m["text"] for m in self.connector.messages(conversation_id)]


@pytest.fixture
async def servers() -> AsyncIterator[tuple[FakeModelServer, FakeConnector]]:
    async with FakeModelServer(word_interval=0.02) as model, FakeConnector() as connector:
        yield model, connector


@asynccontextmanager
async def halves(connection_string: str, table_name: str, model: FakeModelServer,
                 connector: FakeConnector, *, workers: int = 1, lease: int = 600,
                 **env: str) -> AsyncIterator[Halves]:
    """`workers` instances on one table and queue; `lease`: how long a message a worker took
    stays hidden if the worker dies with it (the host's lease)."""
    queue = f"q{uuid.uuid4().hex[:12]}"
    settings = load_settings({"OPENAI_BASE_URL": model.base_url, "OPENAI_MODEL": "m",
                              "CHAT_MODEL_MAX_RETRIES": "0", "CHAT_TURN_QUEUE": queue,
                              "CHAT_SUMMARY": "off", **env})
    async with AsyncExitStack() as stack:
        built: list[Worker] = []
        for _ in range(workers):
            store = TableConversationStore.from_connection_string(
                connection_string, table_name=table_name, summaries=settings.summary.enabled)
            stack.push_async_callback(store.close)
            inbox = Inbox.from_connection_string(connection_string, table_name=table_name,
                                                 queue_name=queue)
            stack.push_async_callback(inbox.close)
            chat = build_model(settings.model)
            stack.push_async_callback(chat.close)
            summarizer = Summarizer(store=store, model=chat, token_budget=200,
                                    history_token_budget=settings.model.history_token_budget,
                                    history_max_messages=settings.model.history_max_messages) \
                if settings.summary.enabled else None
            bot = ChatBot(settings=settings, store=store, prompt=ChatPrompt(chat),
                          summarizer=summarizer, connector=BotConnector(credential=None),
                          inbox=inbox, authenticator=BotAuthenticator(
                              settings.bot, http=httpx2.AsyncClient(), in_azure=False),
                          max_attempts=MAX_DEQUEUE, retry_seconds=RETRY_SECONDS)
            stack.push_async_callback(bot.connector.close)

            async def answer(body: bytes, dequeue_count: int, bot: ChatBot = bot) -> None:
                await bot.answerer.answer_ticket(body)

            host = await stack.enter_async_context(QueueHost(
                connection_string=connection_string, queue_name=queue, handler=answer,
                max_dequeue_count=MAX_DEQUEUE, lease=lease))
            built.append(Worker(bot=bot, store=store, inbox=inbox, host=host))
        yield Halves(workers=built, model=model, connector=connector)


async def eventually(check: Any, *, within: float = 20.0) -> None:
    for _ in range(int(within / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {within} s")
