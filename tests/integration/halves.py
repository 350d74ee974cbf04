"""The two halves over a real queue, for the integration tests: the webhook (`ChatBot`) on Azurite's
table and queue services, a local model, the contract-enforcing Bot Connector stand-in, and a
stand-in of the Functions host's queue trigger (`queue_host.py`) with host.json's limits."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables.aio import TableClient

from devtools.fake_channel import FakeConnector
from devtools.fake_model import FakeModelServer
from shared.auth import BotAuthenticator
from shared.bot import ChatBot
from shared.connector import BotConnector
from shared.inbox import Inbox, inbox_table_name, max_dequeue_count
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import load_settings
from shared.store import TableConversationStore
from shared.summary import Summarizer
from tests.integration.queue_host import QueueHost, queue_client

HEADERS = {"Content-Type": "application/json"}
MAX_DEQUEUE = max_dequeue_count(Path(__file__).parents[2] / "host.json")
#: A failed turn's retry waits this long here (host.json's visibilityTimeout, 5 s, in Azure).
RETRY_SECONDS = 0.3
#: The model at the transport (`httpx2.MockTransport`'s handler), in place of a model server.
ModelHandler = Callable[[httpx2.Request], Awaitable[httpx2.Response]]
#: Per-call azure-core policies for a worker's storage clients: (worker slot, client) → policies,
#: the client being "store", "inbox" (its table), "queue" (its queues) or "host" (the trigger's).
Policies = Callable[[int, str], Sequence[Any]]



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
    model: FakeModelServer | ModelHandler
    connector: FakeConnector
    #: Builds the worker of a slot, with its own clients, and starts its queue trigger.
    start: Callable[[int], Awaitable[Worker]]

    async def restart(self, slot: int) -> Worker:
        """The worker of `slot` dies (`QueueHost.kill`: what it was doing stops where it is, its
        hold stays until it expires); a fresh one, with its own clients, takes its place. The
        dead one's clients close with the others at the end."""
        await self.workers[slot].host.kill()
        self.workers[slot] = await self.start(slot)
        return self.workers[slot]

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

    async def settled(self, *, within: float = 30.0, inbox: Inbox | None = None) -> None:
        """Wait until every accepted activity is answered (the inbox keeps none) and the queue
        hosts are idle (a wake-up for later may still wait in the queue: it finds nothing).
        `inbox`: the one to look through (default: the first worker's)."""
        async with asyncio.timeout(within):
            while True:
                for worker in self.workers:
                    await worker.host.idle(visible_only=True, within=within)
                if not await self.kept(inbox=inbox) and not any(w.host.busy for w in self.workers):
                    return
                await asyncio.sleep(0.05)

    async def kept(self, *, inbox: Inbox | None = None) -> list[tuple[str, str]]:
        """The activities the inbox keeps, in any conversation: (partition, activity ID)."""
        table = (inbox or self.inbox)._table  # the test peeks at the table it made
        try:
            return [(str(row["PartitionKey"]), str(row["activity_id"]))
                    async for row in table.query_entities(
                        "RowKey ge 'a' and RowKey lt 'b'", select=["PartitionKey", "activity_id"])]
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
async def halves(connection_string: str, table_name: str, model: FakeModelServer | ModelHandler,
                 connector: FakeConnector, *, workers: int = 1, lease: int = 600,
                 policies: Policies | None = None, on_bot: Callable[[int, ChatBot], None] | None = None,
                 summaries: bool = False, **env: str) -> AsyncIterator[Halves]:
    """`workers` instances on one table and queue; `lease`: how long a message a worker took
    stays hidden if the worker dies with it (the host's lease). `model`: a model server, or a
    handler at the transport. `policies`: per-call policies on each worker's storage clients;
    `on_bot`: called with each worker's bot before its queue trigger starts (a restarted one's
    too). `summaries`: the store keeps rolling summaries even when the bots prepare none
    (`CHAT_SUMMARY=off`, the default here)."""
    queue = f"q{uuid.uuid4().hex[:12]}"
    base_url = model.base_url if isinstance(model, FakeModelServer) else "http://model.invalid/v1"
    settings = load_settings({"OPENAI_BASE_URL": base_url, "OPENAI_MODEL": "m",
                              "CHAT_MODEL_MAX_RETRIES": "0", "CHAT_TURN_QUEUE": queue,
                              "CHAT_SUMMARY": "off", **env})
    async with AsyncExitStack() as stack:
        async def start(slot: int) -> Worker:
            def policies_of(client: str) -> list[Any]:
                return list(policies(slot, client)) if policies is not None else []

            store = TableConversationStore(table=TableClient.from_connection_string(
                connection_string, table_name=table_name, per_call_policies=policies_of("store")),
                summaries=summaries or settings.summary.enabled)
            stack.push_async_callback(store.close)
            inbox = Inbox(table=TableClient.from_connection_string(
                              connection_string, table_name=inbox_table_name(table_name),
                              per_call_policies=policies_of("inbox")),
                          queue=queue_client(connection_string, queue,
                                             policies=policies_of("queue")),
                          poison=queue_client(connection_string, f"{queue}-poison",
                                              policies=policies_of("queue")))
            stack.push_async_callback(inbox.close)
            http = None if isinstance(model, FakeModelServer) else \
                httpx2.AsyncClient(transport=httpx2.MockTransport(model))
            chat = build_model(settings.model, http_client=http)
            stack.push_async_callback(chat.close)
            summarizer = Summarizer(store=store, model=chat, token_budget=200,
                                    history_token_budget=settings.model.history_token_budget,
                                    history_max_messages=settings.model.history_max_messages) \
                if settings.summary.enabled else None
            bot = ChatBot(settings=settings, store=store, prompt=ChatPrompt(chat),
                          summarizer=summarizer, connector=BotConnector(credential=None),
                          inbox=inbox,
                          authenticator=BotAuthenticator(settings.bot, http=httpx2.AsyncClient(),
                                                         in_azure=False),
                          max_attempts=MAX_DEQUEUE, retry_seconds=RETRY_SECONDS)
            stack.push_async_callback(bot.connector.close)
            if on_bot is not None:
                on_bot(slot, bot)

            async def answer(body: bytes, dequeue_count: int) -> None:
                await bot.answerer.answer_ticket(body)

            host = await stack.enter_async_context(QueueHost(
                connection_string=connection_string, queue_name=queue, handler=answer,
                max_dequeue_count=MAX_DEQUEUE, lease=lease, policies=policies_of("host")))
            return Worker(bot=bot, store=store, inbox=inbox, host=host)

        yield Halves(workers=[await start(slot) for slot in range(workers)], model=model,
                     connector=connector, start=start)


async def eventually(check: Any, *, within: float = 20.0) -> None:
    for _ in range(int(within / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {within} s")
