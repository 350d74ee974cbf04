"""Function calling: tools in the prompt, every tool message kept inside the turn."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from typing import Literal

import pydantic
import pytest

from devtools.fake_model import FakeModelServer, Scripted, tool_call
from shared.messages import ChatMessage, ToolCall
from shared.model import ChatModel, build_model
from shared.prompt import ROUND_LIMIT_REPLY, ChatPrompt, ConversationMemory
from shared.settings import load_settings
from shared.store import TableConversationStore
from shared.tools import Function, tool
from shared.window import WindowBuilder

pytestmark = pytest.mark.usefixtures("models_closed")


@tool
async def add(a: int, b: int) -> int:
    """Add two whole numbers."""
    return a + b


@tool
async def explode(reason: str = "boom") -> str:
    """Always fails."""
    raise RuntimeError(reason)


@tool
async def open_file() -> str:
    """Fails as a tool that opens a directory does: the error names the path."""
    raise IsADirectoryError(21, "Is a directory", "/tmp/install/path/zoneinfo/Europe")


@tool
async def dawdle() -> str:
    """Never finishes in time."""
    await asyncio.sleep(5)
    return "late"


class WeatherParams(pydantic.BaseModel):
    city: str
    unit: Literal["C", "F"] = "C"


async def weather_handler(params: WeatherParams) -> dict:
    return {"city": params.city, "temperature": 21, "unit": params.unit}


weather = Function("weather", "Weather in a city.", weather_handler, WeatherParams)


async def city_handler(city: str) -> str:
    return f"sunny in {city}"


#: An explicit schema that allows what the handler cannot take (extra and missing arguments).
loose = Function("loose", "A lax schema.", city_handler,
                 {"type": "object", "properties": {"city": {"type": "string"}}})


def model_for(server: FakeModelServer) -> ChatModel:
    return build_model(load_settings({"OPENAI_BASE_URL": server.base_url,
                                      "OPENAI_MODEL": "tool-model"}).model)


@pytest.fixture
async def server() -> AsyncIterator[FakeModelServer]:
    async with FakeModelServer() as running:
        yield running


def test_schemas_come_from_type_hints_or_are_given() -> None:
    assert add.spec() == {"type": "function", "function": {
        "name": "add", "description": "Add two whole numbers.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                       "properties": {"a": {"title": "A", "type": "integer"},
                                      "b": {"title": "B", "type": "integer"}}}}}
    assert weather.spec()["function"]["parameters"]["properties"]["unit"]["enum"] == ["C", "F"]
    explicit = Function("echo", "Echo.", weather_handler,
                        {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]})
    assert explicit.spec()["function"]["parameters"]["required"] == ["x"]


async def test_a_turn_with_two_rounds_stores_every_message_and_the_next_turn_sends_them(
        table_store: TableConversationStore, server: FakeModelServer) -> None:
    # GIVEN a model that calls two tools in parallel, then one more, then answers
    server.then(
        Scripted(tool_calls=[tool_call("add", {"a": 2, "b": 3}, "c1"),
                             tool_call("weather", {"city": "Oslo"}, "c2")]),
        Scripted(tool_calls=[tool_call("add", {"a": 5, "b": 10}, "c3")]),
        Scripted(content="2+3=5, Oslo is 21 C, and 5+10=15."),
    )
    model = model_for(server)
    memory = ConversationMemory(table_store, "tools")
    prompt = ChatPrompt(model, functions=[add, weather])
    # WHEN the turn runs and commits
    result = await prompt.send("add things", memory=memory)
    await memory.commit(result, activity_id="t1")
    # THEN every message is stored in order
    stored = await table_store.list_messages("tools")
    assert [(m.role, m.tool_call_id) for m in stored] == [
        ("user", None), ("assistant", None), ("tool", "c1"), ("tool", "c2"),
        ("assistant", None), ("tool", "c3"), ("assistant", None)]
    assert [c.id for c in stored[1].tool_calls] == ["c1", "c2"]
    assert stored[2].content == "5" and json.loads(stored[3].content or "")["temperature"] == 21
    assert stored[5].content == "15" and stored[-1].content == "2+3=5, Oslo is 21 C, and 5+10=15."
    # AND the model got the tool results back in its second and third requests
    assert server.requests[1]["messages"][-2:] == [
        {"role": "tool", "content": "5", "tool_call_id": "c1"},
        {"role": "tool", "content": json.dumps({"city": "Oslo", "temperature": 21, "unit": "C"}),
         "tool_call_id": "c2"}]
    assert server.requests[0]["tools"][0]["function"]["name"] == "add"
    # WHEN the next turn is sent
    memory = ConversationMemory(table_store, "tools")
    await ChatPrompt(model, functions=[add, weather]).send("thanks", memory=memory)
    # THEN the whole tool group is in its window
    sent = server.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool", "assistant", "tool",
                                         "assistant", "user"]
    assert sent[1]["tool_calls"][1]["function"]["name"] == "weather"


@pytest.mark.parametrize(("bad_tool", "arguments", "expected"), [
    ("explode", {}, "RuntimeError: boom"),
    ("add", {"a": "two", "b": 1}, "do not match the schema"),
    ("add", {"a": 1}, "do not match the schema"),
    ("dawdle", {}, "did not finish"),
    ("nope", {}, "no tool named nope"),
    ("loose", {"city": "Oslo", "unit": "C"}, "do not fit the tool"),
    ("loose", {}, "do not fit the tool"),
    ("open_file", {}, "IsADirectoryError: Is a directory"),
])
async def test_a_failing_tool_gives_the_model_an_error_and_the_user_a_reply(
        server: FakeModelServer, bad_tool: str, arguments: dict, expected: str,
        caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN a model that calls a tool that fails, then answers
    server.then(Scripted(tool_calls=[tool_call(bad_tool, arguments, "bad")]),
                Scripted(content="Sorry, that did not work."))
    prompt = ChatPrompt(model_for(server), functions=[add, explode, dawdle, loose, open_file],
                        tool_timeout_seconds=0.2)
    # WHEN the turn runs
    result = await prompt.send("try it")
    # THEN the model got the error as the tool's result, the user a reply, the log the tool's name
    assert result.response.content == "Sorry, that did not work."
    tool_message = server.requests[1]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == "bad"
    assert expected in json.loads(tool_message["content"])["error"]
    # (a name the model invented is its text: the log calls it "unknown")
    assert (bad_tool if bad_tool != "nope" else "tool unknown") in caplog.text
    # AND no file path reached the model or the log
    assert "/tmp" not in tool_message["content"] and "/tmp" not in caplog.text


async def test_a_model_that_keeps_calling_tools_stops_at_the_round_limit(
        table_store: TableConversationStore, server: FakeModelServer) -> None:
    # GIVEN a model that always asks for another call, and a limit of 3 rounds
    server.then(*[Scripted(tool_calls=[tool_call("add", {"a": i, "b": 1})]) for i in range(10)])
    memory = ConversationMemory(table_store, "loop")
    prompt = ChatPrompt(model_for(server), functions=[add], max_tool_rounds=3)
    # WHEN the turn runs
    result = await prompt.send("loop forever", memory=memory)
    await memory.commit(result, activity_id="l1")
    # THEN it stops after 4 model calls with a polite reply and stores a valid turn
    assert server.calls == 4
    assert result.response.content == ROUND_LIMIT_REPLY.format(rounds=3)
    roles = [m.role for m in await table_store.list_messages("loop")]
    assert roles == ["user"] + ["assistant", "tool"] * 3 + ["assistant"]


async def test_a_turn_that_would_overflow_the_transaction_is_cut_short(
        table_store: TableConversationStore, server: FakeModelServer) -> None:
    # GIVEN a model asking for 60 calls per round (two rounds exceed what a turn holds)
    calls = [tool_call("add", {"a": i, "b": i}) for i in range(60)]
    server.then(Scripted(tool_calls=calls), Scripted(tool_calls=calls), Scripted(content="done"))
    memory = ConversationMemory(table_store, "wide")
    result = await ChatPrompt(model_for(server), functions=[add]).send("go", memory=memory)
    await memory.commit(result, activity_id="w1")
    # THEN the second round is not stored, and the turn ends with a clear reply
    stored = await table_store.list_messages("wide")
    assert len(stored) == 1 + 61 + 1 and "more tool results" in (stored[-1].content or "")


async def test_a_reply_asking_for_more_calls_than_a_turn_keeps_runs_none(
        table_store: TableConversationStore, server: FakeModelServer) -> None:
    # GIVEN a model whose one reply asks for 400 tool calls
    ran: list[int] = []

    @tool
    async def count(n: int) -> int:
        """Counts."""
        ran.append(n)
        return n

    server.then(Scripted(tool_calls=[tool_call("count", {"n": i}) for i in range(400)]))
    memory = ConversationMemory(table_store, "flood")
    # WHEN the turn runs and commits
    result = await ChatPrompt(model_for(server), functions=[count]).send("go", memory=memory)
    await memory.commit(result, activity_id="f1")
    # THEN no call ran, the model was asked once, and the stored turn ends with a clear reply
    assert ran == [] and server.calls == 1
    stored = await table_store.list_messages("flood")
    assert [m.role for m in stored] == ["user", "assistant"]
    assert "more tool results" in (stored[-1].content or "")


def turn_messages(turn: int, tool_calls: int) -> list[ChatMessage]:
    messages = [ChatMessage(role="user", content=f"q{turn}")]
    if tool_calls:
        calls = tuple(ToolCall(id=f"{turn}-{i}", name="add", arguments="{}") for i in range(tool_calls))
        messages.append(ChatMessage(role="assistant", content=None, tool_calls=calls))
        messages += [ChatMessage(role="tool", content="1", tool_call_id=c.id) for c in calls]
    messages.append(ChatMessage(role="assistant", content=f"a{turn}"))
    return messages


def test_a_window_cut_anywhere_never_sends_a_tool_message_without_its_call() -> None:
    history = list(itertools.chain.from_iterable(turn_messages(t, t % 3) for t in range(12)))
    for budget in range(0, 200):
        for max_messages in (3, 5, 8, 100):
            builder = WindowBuilder(token_budget=budget, max_messages=max_messages)
            for message in reversed(history):
                if not builder.offer(message, 5):
                    break
            window = builder.messages
            assert not window or window[0].role == "user"
            assert builder.tokens <= budget and len(window) <= max_messages
            answered = {m.tool_call_id for m in window if m.role == "tool"}
            asked = {c.id for m in window for c in m.tool_calls}
            assert answered == asked
            assert window == history[len(history) - len(window):]
