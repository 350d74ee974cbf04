"""The rolling summary on a real Azurite, through the real openai SDK and a local model server."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from devtools.fake_model import FakeModelServer, Scripted, default_reply
from shared.activity import parse_activity
from shared.budgets import Budgets, TurnSpend
from shared.ledger import Account
from shared.messages import ChatMessage, utc_day, utc_now
from shared.model import ChatModel, build_model
from shared.prompt import SUMMARY_HEADING, ChatPrompt, ConversationMemory
from shared.settings import load_settings
from shared.store import ConversationWindow, TableConversationStore
from shared.store._fold import FoldJob
from shared.summary import SUMMARY_INSTRUCTIONS, Summarizer

pytestmark = pytest.mark.usefixtures("models_closed")

BUDGET = 600
TAG = re.compile(r"\bm\d+\b")


def summarize_or_reply(body: dict[str, Any]) -> str:
    """A model that answers chats, and summarizes by keeping every message tag (m0, m1...) seen."""
    messages = body.get("messages", [])
    if messages and str(messages[0]["content"]).startswith(SUMMARY_INSTRUCTIONS[:40]):
        return "Said: " + " ".join(dict.fromkeys(TAG.findall(messages[-1]["content"])))
    return default_reply(body)


@dataclass
class Chat:
    store: TableConversationStore
    server: FakeModelServer
    model: ChatModel
    prompt: ChatPrompt = field(init=False)
    summarizer: Summarizer = field(init=False)
    turns: int = 0
    #: The budgets the after-reply summary is counted in (None: none).
    spend: TurnSpend | None = None

    def __post_init__(self) -> None:
        self.prompt = ChatPrompt(self.model, instructions="Be brief.")
        self.summarizer = Summarizer(store=self.store, model=self.model, token_budget=200,
                                     history_token_budget=BUDGET)

    async def turn(self, conversation_id: str = "c", *,
                   summarize: bool = True) -> tuple[ConversationWindow, list[dict[str, Any]], bool]:
        """One turn: load, send, commit, then the after-reply work. (window, request, summarized)"""
        index = self.turns
        self.turns += 1
        text = f"m{index}: " + ("please remember my locker code is 4417. " if index == 0 else
                                "let us talk about something else for a while. ")
        memory = ConversationMemory(self.store, conversation_id, token_budget=BUDGET)
        window = await memory.load(input=text, activity_id=f"a{index}")
        result = await self.prompt.send(text, memory=memory)
        request = self.server.requests[-1]["messages"]
        await memory.commit(result, activity_id=f"a{index}")
        summarized = await self.summarizer.after_turn(window, spend=self.spend) \
            if summarize else False
        return window, request, summarized


@pytest.fixture
async def server() -> AsyncIterator[FakeModelServer]:
    async with FakeModelServer(reply=summarize_or_reply) as running:
        yield running


@pytest.fixture
async def chat(azurite_connection_string: str, table_name: str,
               server: FakeModelServer) -> AsyncIterator[Chat]:
    settings = load_settings({"OPENAI_BASE_URL": server.base_url, "OPENAI_MODEL": "m",
                              "CHAT_MODEL_MAX_RETRIES": "0", "CHAT_MODEL_TIMEOUT_SECONDS": "5"})
    store = TableConversationStore.from_connection_string(
        azurite_connection_string, table_name=table_name, summaries=True)
    try:
        yield Chat(store=store, server=server, model=build_model(settings.model))
    finally:
        await store.close()


def summary_of(request: list[dict[str, Any]]) -> str | None:
    """The summary a request carries: quoted, in a user-role message after the instructions."""
    content = str(request[1]["content"])
    return json.loads(content.removeprefix(SUMMARY_HEADING)) \
        if content.startswith(SUMMARY_HEADING) else None


def history_of(request: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in request[1:-1] if not str(m["content"]).startswith(SUMMARY_HEADING)]


async def test_a_summary_is_written_after_a_reply_and_used_by_later_turns(chat: Chat) -> None:
    # GIVEN a chat whose first message holds a fact, far longer than the window's budget
    # WHEN 60 turns are run, each with its after-reply work
    records = [await chat.turn() for _ in range(60)]
    # THEN summaries were prepared after replies, and later requests carry one after the
    # instructions, which holds the fact's message although the window no longer does
    assert sum(summarized for _, _, summarized in records) >= 2
    last = records[-1][1]
    assert last[0] == {"role": "system", "content": "Be brief."}
    assert summary_of(last) is not None and "m0" in summary_of(last)
    assert all("m0:" not in str(m["content"]) for m in history_of(last))
    # AND the memory shows the summary too
    memory = ConversationMemory(chat.store, "c", token_budget=BUDGET)
    await memory.load()
    assert memory.summary is not None and "m0" in memory.summary
    # (the store's current summary; a loaded window may already use the one its commit steps to)
    current = await chat.store.get_summary("c")
    assert current is not None and "m0" in current


async def test_no_message_falls_between_the_summary_and_the_window(chat: Chat) -> None:
    # GIVEN a long chat
    for _ in range(60):
        # WHEN each turn's request is looked at
        _, request, _ = await chat.turn()
        seen = " ".join(str(m["content"]) for m in request)
        # THEN every earlier user message is in the summary or in the window
        missing = [f"m{i}" for i in range(chat.turns) if not re.search(rf"\bm{i}\b", seen)]
        assert missing == [], f"turn {chat.turns - 1}: {missing} in neither"


async def test_the_window_steps_rarely_and_the_summary_changes_only_at_steps(chat: Chat) -> None:
    # GIVEN a long chat
    requests = [(await chat.turn())[1] for _ in range(60)]
    # WHEN consecutive requests are compared
    steps = 0
    for before, after in itertools.pairwise(requests):
        stepped = bool(history_of(before)) and history_of(before)[:1] != history_of(after)[:1]
        # THEN the summary changes exactly when the window's start moves
        assert (summary_of(before) != summary_of(after)) == stepped
        if stepped:
            steps += 1
        else:
            # AND between steps each request repeats the previous one whole, as its prefix
            assert after[:len(before)] == before
    assert 2 <= steps <= 60 // 4


async def test_a_failed_summary_call_leaves_the_turn_intact_and_is_tried_again(chat: Chat) -> None:
    # GIVEN a chat run until a summary is due
    window, _, _ = await chat.turn(summarize=False)
    while not window.summary_due:
        window, _, _ = await chat.turn(summarize=False)
    stored = await chat.store.list_messages("c")
    # WHEN the summary model fails
    chat.server.then(Scripted(status=500))
    summarized = await chat.summarizer.after_turn(window)
    # THEN nothing is prepared, every message is kept, and the job is still there
    assert summarized is False
    assert await chat.store.list_messages("c") == stored
    assert await chat.store.get_fold("c", token_budget=BUDGET) is not None
    # AND the next turn works and prepares it
    window, _, summarized = await chat.turn()
    assert summarized is True
    assert await chat.store.get_fold("c", token_budget=BUDGET) is None


async def fold_when_due(chat: Chat) -> FoldJob:
    """Turns without summaries until one is due; the fold job the store then names."""
    window, _, _ = await chat.turn(summarize=False)
    while not window.summary_due:
        window, _, _ = await chat.turn(summarize=False)
    job = await chat.store.get_fold("c", token_budget=BUDGET)
    assert job is not None
    return job


async def test_a_summary_racing_a_turn_is_stored_if_it_still_holds(chat: Chat) -> None:
    # GIVEN a fold job read while a summary is due
    job = await fold_when_due(chat)
    # WHEN another turn commits before the summary is stored
    await chat.turn(summarize=False)
    # THEN the write is re-checked against the new head and stored (the start did not move)
    assert await chat.store.update_summary(job, "Said: early things") is True
    assert await chat.store.get_fold("c", token_budget=BUDGET) is None


async def test_a_summary_for_a_cleared_conversation_is_dropped(chat: Chat) -> None:
    # GIVEN a fold job read while a summary is due
    job = await fold_when_due(chat)
    # WHEN the conversation is cleared and starts again before the summary is stored
    await chat.store.clear("c")
    await chat.turn(summarize=False)
    # THEN the summary is not stored: it covers messages that are gone
    assert await chat.store.update_summary(job, "Said: gone things") is False
    memory = ConversationMemory(chat.store, "c", token_budget=BUDGET)
    await memory.load()
    assert memory.summary is None and len(await memory.get_all()) == 2


async def test_a_clear_forgets_the_summary(chat: Chat) -> None:
    # GIVEN a chat with a summary
    while await chat.store.get_summary("c") is None:
        await chat.turn()
    # WHEN it is cleared
    await chat.store.clear("c")
    # THEN the summary is gone and the next request carries none
    assert await chat.store.get_summary("c") is None
    _, request, _ = await chat.turn()
    assert summary_of(request) is None and len(request) == 2


async def test_with_summaries_off_the_window_slides_as_before(
        azurite_connection_string: str, table_name: str, server: FakeModelServer) -> None:
    # GIVEN a store with summaries off (CHAT_SUMMARY=off)
    settings = load_settings({"OPENAI_BASE_URL": server.base_url, "OPENAI_MODEL": "m"})
    store = TableConversationStore.from_connection_string(azurite_connection_string,
                                                          table_name=table_name)
    chat = Chat(store=store, server=server, model=build_model(settings.model))
    try:
        # WHEN a long chat is run
        records = [await chat.turn() for _ in range(40)]
    finally:
        await store.close()
    # THEN no summary is made or sent, and the window is the newest turns that fit
    assert server.calls == 40 and not any(summarized for _, _, summarized in records)
    window, request, _ = records[-1]
    assert window.summary is None and summary_of(request) is None
    assert request[-1]["content"].startswith("m39")
    assert window.tokens <= BUDGET and len(window.messages) < 2 * 39
    newest = [ChatMessage(role=m["role"], content=m["content"]) for m in history_of(request)]
    assert [m.content for m in newest] == [m.content for m in window.messages]


async def test_with_the_setting_on_summary_tokens_count_in_the_daily_counter(chat: Chat) -> None:
    # GIVEN summary calls counted as spend (CHAT_SPEND_COUNTS_SUMMARIES=on)
    chat.summarizer.count_spend = True
    # WHEN turns run until a summary is written
    summarized = False
    while not summarized:
        _, _, summarized = await chat.turn()
    # THEN the daily counter holds every token billed: the turns' and the summary call's
    window = await chat.store.load_window("c", token_budget=BUDGET, max_messages=100)
    billed = sum(usage["prompt_tokens"] + usage["completion_tokens"] for usage in chat.server.usages)
    assert len(chat.server.usages) > chat.turns
    assert window.spend.tokens_on_day(utc_now()) == billed


async def test_with_the_setting_on_summary_tokens_count_in_the_users_budget(chat: Chat) -> None:
    # GIVEN summary calls counted as spend, in the budgets of the user whose turn they follow
    chat.summarizer.count_spend = True
    budgets = Budgets.build(load_settings({"CHAT_USER_DAILY_TOKEN_LIMIT": "10000000"}),
                            chat.store)
    assert budgets is not None
    activity = parse_activity(json.dumps({"type": "message", "id": "x", "conversation": {
        "id": "c"}, "from": {"id": "29:ada"}}).encode(), {"Content-Type": "application/json"})
    chat.spend = budgets.for_turn(activity, max_reply_tokens=200)
    # WHEN turns run until a summary is written
    summarized = False
    while not summarized:
        _, _, summarized = await chat.turn()
    # THEN the user's ledger holds the summary call's tokens (the reply's maximum reserved as
    # the summary's budget, settled to what it billed), with no reservation left open
    (day,) = await chat.store.list_ledgers(Account("user", "29:ada"), since=utc_day(utc_now()))
    summary = chat.server.usages[-1]
    assert (day.calls, day.tokens) == (1, summary["prompt_tokens"] + summary["completion_tokens"])
    assert day.reservations == ()
