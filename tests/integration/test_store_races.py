"""Each operation raced against a turn, on cue, against a real Azurite: the findings of issue 20.

Every test makes its interleaving with a `Gate` (tests/integration/storage_faults.py): one store's
storage call is held while another store (another instance) does its work, then let go.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import httpx2

from devtools.fake_model import FakeModelServer, Scripted
from shared.messages import ChatMessage, Sender, Usage, utc_now
from shared.model import build_model
from shared.prompt import ChatPrompt, ReplyStopped
from shared.settings import load_settings
from shared.store import REMOVED_MARKER, TableConversationStore
from tests.integration.storage_faults import Gate, faulty_store
from tests.unit.test_turns import HEADERS, CountingModel, activity, make_bot

BIG = 10_000_000
U = Sender(id="29:u")
V = Sender(id="29:v")


def turn(text: str, reply: str, *, sender: Sender | None = None,
         usage: Usage | None = None) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text, sender=sender),
            ChatMessage(role="assistant", content=reply, usage=usage)]


async def commit(store: TableConversationStore, conversation_id: str, activity_id: str,
                 messages: list[ChatMessage], *, today: str | None = None,
                 sender: Sender | None = None, shared: bool = False) -> None:
    """One turn as the bot makes it: load, write the index rows, commit."""
    window = await store.load_window(conversation_id, token_budget=BIG, max_messages=100)
    if today is not None:
        indexed = await store.write_indexes(window, today=today, sender=sender, shared=shared)
        window = replace(window, indexed=indexed)
    await store.commit_turn(window, activity_id=activity_id, messages=messages)


def other_store(connection_string: str, table_name: str) -> TableConversationStore:
    return TableConversationStore.from_connection_string(connection_string, table_name=table_name)


async def contents(store: TableConversationStore, conversation_id: str) -> list[str | None]:
    return [message.content for message in await store.list_messages(conversation_id)]


async def test_finding_1_a_slow_clear_never_deletes_a_turn_committed_after_a_faster_one(
        azurite_connection_string: str, table_name: str) -> None:
    slow, policy = faulty_store(azurite_connection_string, table_name)
    fast = other_store(azurite_connection_string, table_name)
    try:
        # GIVEN a conversation, and a clear held just before it deletes the rows it hid
        await commit(fast, "c1", "a1", turn("old question", "old answer"))
        gate = Gate(match=lambda method, url: method == "GET" and "select" in url)
        policy.gates.append(gate)
        clearing = asyncio.create_task(slow.clear("c1"))
        await asyncio.wait_for(gate.reached.wait(), 10)
        # WHEN another clear runs whole, a new turn commits, and the held clear goes on
        await fast.clear("c1")
        await commit(fast, "c1", "a2", turn("new question", "new answer"))
        gate.release()
        await clearing
        # THEN the new turn is still there, whole
        assert await contents(fast, "c1") == ["new question", "new answer"]
        stored = await fast.get_turn("c1", "a2")
        assert stored is not None and [m.content for m in stored.messages] == [
            "new question", "new answer"]
    finally:
        await slow.close()
        await fast.close()


async def test_finding_2_a_purge_racing_a_turn_leaves_the_users_data_exportable(
        azurite_connection_string: str, table_name: str) -> None:
    purger, policy = faulty_store(azurite_connection_string, table_name)
    store = other_store(azurite_connection_string, table_name)
    try:
        # GIVEN a personal conversation idle since 2020, and a purge held as it deletes the
        # user-index rows of the conversation's speakers
        await commit(store, "p1", "a1", turn("2020 question", "2020 answer", sender=U),
                     today="2020-01-01", sender=U)
        gate = Gate(match=lambda method, url: method == "DELETE" and "idx-user" in url)
        policy.gates.append(gate)
        purging = asyncio.create_task(purger.purge_idle(before="2020-01-02", deadline=1e12))
        await asyncio.wait_for(gate.reached.wait(), 10)
        # WHEN the user writes again meanwhile, and the purge goes on
        await commit(store, "p1", "a2", turn("new question", "new answer", sender=U),
                     today="2026-12-03", sender=U)
        gate.release()
        await purging
        # THEN their new turn is stored, and exportable and removable by them
        assert await contents(store, "p1") == ["new question", "new answer"]
        data = await store.export_user("29:u")
        assert [m.content for c in data.conversations for m in c.messages] == [
            "new question", "new answer"]
        await store.forget_user("29:u")
        assert await contents(store, "p1") == []
    finally:
        await purger.close()
        await store.close()


async def test_finding_3_a_clear_keeps_the_spend_counters(table_store: TableConversationStore) -> None:
    # GIVEN a turn that billed 1,000 tokens
    await commit(table_store, "s1", "a1", turn("q", "a", usage=Usage(prompt_tokens=900,
                                                                     completion_tokens=100)))
    # WHEN the conversation is cleared (/reset)
    await table_store.clear("s1")
    # THEN the counters still hold the turn and its tokens
    window = await table_store.load_window("s1", token_budget=BIG, max_messages=100)
    now = utc_now()
    assert window.messages == ()
    assert window.spend.tokens_on_day(now) == 1_000 and window.spend.turns_in_minute(now) >= 1


class ToolLoopingModel(CountingModel):
    """Always asks for a tool; reports 400 tokens a call."""

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.calls += 1
        return httpx2.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "usage": {"prompt_tokens": 300, "completion_tokens": 100, "total_tokens": 400},
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "tool_calls": [{
                    "id": f"call{self.calls}", "type": "function",
                    "function": {"name": "lookup", "arguments": "{}"}}]}}]})


class SlowSpendingModel(CountingModel):
    """Answers after `delay` seconds; reports 400 tokens a call."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.calls += 1
        await asyncio.sleep(self.delay)
        text = f"echo {json.loads(request.content)['messages'][-1]['content']}"
        return httpx2.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "usage": {"prompt_tokens": 300, "completion_tokens": 100, "total_tokens": 400},
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}]})


async def spent_today(store: TableConversationStore, conversation_id: str) -> int:
    window = await store.load_window(conversation_id, token_budget=BIG, max_messages=100)
    return window.spend.tokens_on_day(utc_now())


async def test_finding_3_a_reply_cut_by_the_tool_round_limit_counts_every_billed_token(
        table_store: TableConversationStore) -> None:
    # GIVEN a model that calls a tool every round (400 tokens a call)
    model = ToolLoopingModel()
    bot = make_bot(table_store, model)
    # WHEN a message is answered until the tool-round limit cuts the reply
    response = await bot.handle(body=activity("loop", "s2"), headers=HEADERS)
    # THEN every call's tokens are counted
    assert response.status == 200 and model.calls > 1
    assert await spent_today(table_store, "s2") == 400 * model.calls


async def test_finding_3_tokens_of_an_attempt_that_lost_the_race_are_counted(
        azurite_connection_string: str, table_name: str) -> None:
    # GIVEN two instances on one table, a model answering in 0.3 s (400 tokens a call)
    stores = [other_store(azurite_connection_string, table_name) for _ in range(2)]
    model = SlowSpendingModel(0.3)
    bots = [make_bot(store, model) for store in stores]
    try:
        # WHEN two messages of one conversation arrive at once, one on each
        responses = await asyncio.gather(*(bot.handle(body=activity(f"m{i}", "s3"),
                                                      headers=HEADERS)
                                           for i, bot in enumerate(bots)))
        # THEN both are answered, one after asking again, and every call's tokens are counted
        assert [r.status for r in responses] == [200, 200] and model.calls == 3
        assert await spent_today(stores[0], "s3") == 400 * model.calls
    finally:
        for store in stores:
            await store.close()


async def test_finding_3_two_instances_hold_a_one_turn_a_minute_limit(
        azurite_connection_string: str, table_name: str) -> None:
    # GIVEN two instances on one table allowing one turn a minute per conversation
    stores = [other_store(azurite_connection_string, table_name) for _ in range(2)]
    model = SlowSpendingModel(0.3)
    bots = [make_bot(store, model, CHAT_MAX_TURNS_PER_MINUTE="1") for store in stores]
    try:
        # WHEN two messages of one conversation arrive at once, one on each
        responses = await asyncio.gather(*(bot.handle(body=activity(f"m{i}", "s4"),
                                                      headers=HEADERS)
                                           for i, bot in enumerate(bots)))
        # THEN the model is asked once, and one message is told to wait
        assert [r.status for r in responses] == [200, 200]
        assert model.calls == 1
        assert len(await stores[0].list_messages("s4")) == 2
    finally:
        for store in stores:
            await store.close()


async def test_finding_4_a_users_removal_racing_their_turn_removes_that_turn_too(
        azurite_connection_string: str, table_name: str) -> None:
    remover, policy = faulty_store(azurite_connection_string, table_name)
    store = other_store(azurite_connection_string, table_name)
    try:
        # GIVEN a group chat where U and V spoke, and U's removal held at its first rewrite of a
        # message row
        await commit(store, "g1", "a1", turn("u secret 1", "answer 1", sender=U),
                     today="2026-12-03", sender=U, shared=True)
        await commit(store, "g1", "a2", turn("v hello", "answer 2", sender=V),
                     today="2026-12-03", sender=V, shared=True)
        gate = Gate(match=lambda method, url: method == "PUT" and "RowKey='m" in url)
        policy.gates.append(gate)
        removing = asyncio.create_task(remover.forget_user("29:u"))
        await asyncio.wait_for(gate.reached.wait(), 10)
        # WHEN U's next turn commits meanwhile, and the removal goes on
        await commit(store, "g1", "a3", turn("u secret 2", "answer 3", sender=U),
                     today="2026-12-03", sender=U, shared=True)
        gate.release()
        await removing
        # THEN none of U's messages is left, V's are
        stored = await contents(store, "g1")
        assert not any(text and "secret" in text for text in stored), stored
        assert stored.count(REMOVED_MARKER) == 4 and "v hello" in stored
    finally:
        await remover.close()
        await store.close()


async def test_finding_3_a_reply_stopped_mid_stream_still_counts_its_round() -> None:
    # GIVEN a model streaming a long answer word by word
    async with FakeModelServer(word_interval=0.005) as server:
        settings = load_settings({"OPENAI_BASE_URL": server.base_url, "OPENAI_MODEL": "m"})
        model = build_model(settings.model)
        server.then(Scripted(content=" ".join(f"word{index}" for index in range(200))))

        async def stop_after_five_words(text: str) -> None:
            if len(text.split()) >= 5:
                raise ReplyStopped(text, stopped=True)

        try:
            # WHEN the user stops it after five words (its usage never arrives)
            result = await ChatPrompt(model).send("tell me a long story",
                                                  on_text=stop_after_five_words)
        finally:
            await model.close()
    # THEN the reply is stored as stopped, and the round counts: the request and the text read
    assert result.messages[-1].stopped
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens >= 5
