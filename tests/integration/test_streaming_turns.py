"""A streamed turn's rules that need a race or a refusal on cue: one model call per answer the user
has seen, 429s that slow the stream without failing it, and Stop pressed on the final message. The
bot runs in-process against a local model, a contract-enforcing Bot Connector stand-in and a store
that loses races on demand (or Azurite's table)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx2
import pytest

from devtools.fake_channel import FakeConnector
from devtools.fake_model import FakeModelServer, Scripted
from shared.activity import parse_activity
from shared.auth import BotAuthenticator
from shared.bot import ChatBot
from shared.connector import BotConnector
from shared.delivery import Delivery
from shared.limits import Spend
from shared.messages import ChatMessage, StoredTurn
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import load_settings
from shared.store import ConversationWindow, InMemoryConversationStore, TableConversationStore

ANSWER = " ".join(f"word{index}" for index in range(30))


class LosesTheFirstRace(InMemoryConversationStore):
    """Another instance commits a turn just before this one's first commit."""

    def __init__(self) -> None:
        super().__init__()
        self.commits = 0

    async def _commit_turn(self, window: ConversationWindow, *, activity_id: str,
                           activity_ids: tuple[str, ...], messages: list[ChatMessage],
                           tokens: list[int], spend: Spend) -> StoredTurn:
        self.commits += 1
        if self.commits == 1:
            rival = await self.load_window(window.conversation_id, token_budget=10_000,
                                           max_messages=100)
            await super()._commit_turn(rival, activity_id="rival", activity_ids=("rival",), messages=[
                ChatMessage(role="user", content="rival question"),
                ChatMessage(role="assistant", content="rival answer")], tokens=[5, 5],
                spend=rival.spend)
        return await super()._commit_turn(window, activity_id=activity_id,
                                          activity_ids=activity_ids, messages=messages,
                                          tokens=tokens, spend=spend)


@pytest.fixture
async def servers() -> AsyncIterator[tuple[FakeModelServer, FakeConnector]]:
    async with FakeModelServer(word_interval=0.05) as model, FakeConnector() as connector:
        yield model, connector


@asynccontextmanager
async def running_bot(store: Any, model: FakeModelServer) -> AsyncIterator[ChatBot]:
    settings = load_settings({"OPENAI_BASE_URL": model.base_url, "OPENAI_MODEL": "m"})
    bot = ChatBot(settings=settings, store=store, prompt=ChatPrompt(build_model(settings.model)),
                  connector=BotConnector(credential=None),
                  authenticator=BotAuthenticator(settings.bot, http=httpx2.AsyncClient(),
                                                 in_azure=False),
                  sleep=lambda _: _no_wait())
    try:
        yield bot
    finally:
        await bot.connector.close()
        await bot.prompt.model.close()


async def until(check: Callable[[], bool], *, within: float = 10.0) -> None:
    for _ in range(int(within / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {within} s")


async def _no_wait() -> None:
    return None


def message(connector: FakeConnector, conversation_id: str) -> bytes:
    return json.dumps({
        "type": "message", "id": uuid.uuid4().hex, "text": "tell me", "channelId": "msteams",
        "serviceUrl": connector.url, "from": {"id": "29:u", "name": "Ada"},
        "recipient": {"id": "28:bot"},
        "conversation": {"id": conversation_id, "conversationType": "personal"}}).encode()


HEADERS = {"Content-Type": "application/json"}


async def test_a_streamed_answer_that_loses_the_race_is_stored_after_the_winner_unasked(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a personal chat whose first commit loses the race to another instance's turn
    model, connector = servers
    store = LosesTheFirstRace()
    model.then(Scripted(content=ANSWER))
    # WHEN a message is answered, streaming (the user reads the answer before the commit)
    async with running_bot(store, model) as bot:
        response = await bot.handle(body=message(connector, "a:race"), headers=HEADERS)
    # THEN the model was asked once, and the same answer was committed after the rival's turn
    assert response.status == 200
    assert model.calls == 1 and store.commits == 2
    stored = [m.content for m in await store.list_messages("a:race")]
    assert stored == ["rival question", "rival answer", "tell me", ANSWER]
    # AND the stream ended with that answer, by the contract
    (stream,) = connector.streams.of("a:race")
    assert stream.finished and connector.streams.violations == []
    assert connector.messages("a:race")[-1]["text"] == ANSWER


async def test_429s_skip_updates_and_slow_the_stream_without_failing_the_turn(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a connector that allows one request every 1.5 s (the bot paces at one a second)
    model, connector = servers
    connector.streams.min_interval = 1.5
    model.then(Scripted(content=" ".join(f"w{index}" for index in range(60))))
    # WHEN a streamed answer of about 3 s is sent
    async with running_bot(InMemoryConversationStore(), model) as bot:
        response = await bot.handle(body=message(connector, "a:slow"), headers=HEADERS)
    # THEN some updates were refused with 429, the stream still ended with the whole answer,
    # and no rule was broken
    (stream,) = connector.streams.of("a:slow")
    statuses = [r for r in connector.requests if r["conversation_id"] == "a:slow"]
    assert response.status == 200 and stream.finished
    assert any(gap < 1.5 for gap in stream.gaps)  # the 429s
    assert connector.streams.violations == []
    assert connector.messages("a:slow")[-1]["text"].endswith("w59") and len(statuses) >= 3


async def test_stop_pressed_on_the_final_message_sends_nothing_more_and_keeps_what_was_shown(
        table_store: TableConversationStore, servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a committed turn whose answer has partly streamed into a Teams personal chat
    _, connector = servers
    body = message(connector, "a:stop")
    activity = parse_activity(body, HEADERS)
    window = await table_store.load_window("a:stop", token_budget=10_000, max_messages=100)
    turn = await table_store.commit_turn(window, activity_id=activity.id, messages=[
        ChatMessage(role="user", content="tell me"), ChatMessage(role="assistant", content=ANSWER)])
    settings = load_settings({"OPENAI_API_KEY": "sk-test"})
    delivery = Delivery(settings=settings, store=table_store, connector=BotConnector(credential=None))
    progress = delivery.progress(activity)  # "Thinking…"
    assert progress.stream is not None
    try:
        await until(lambda: len(connector.streams.of("a:stop")) == 1)
        await progress.stream.on_text("word0 word1 word2")
        await until(lambda: progress.stream is not None and progress.stream.shown != "")
        assert progress.stream.shown == "word0 word1 word2"
        # WHEN the user presses Stop as the final message goes out (403 "canceled by user")
        (stream,) = connector.streams.of("a:stop")
        connector.streams.cancel("a:stop", after_updates=len(stream.updates))
        await delivery.reply(activity, turn, progress=progress)
    finally:
        await progress.close()
        await delivery.connector.close()
    # THEN nothing more was sent: no message with the whole answer after the refused final
    assert connector.messages("a:stop") == []
    assert not stream.finished and connector.streams.violations == []
    # AND the stored reply is what the user saw, marked stopped, and the turn is delivered
    stored = await table_store.list_messages("a:stop")
    assert [(m.content, m.stopped) for m in stored] == [("tell me", False),
                                                       ("word0 word1 word2", True)]
    again = await table_store.get_turn("a:stop", activity.id)
    assert again is not None and again.delivered
