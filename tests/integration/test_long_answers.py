"""Long answers that Teams can hold: a stream near its two minutes or its size goes on in a new
message, until the answer is whole; Stop works on every part; a silent model keeps the stream
alive. The bot runs in-process against a local model and the contract-enforcing Bot Connector
stand-in (one stream per chat, two minutes, 28 KB, one request a second).

Time is scaled: the bot's streams and the stand-in count their limits on one `StreamClock` that
runs SCALE times faster than real time, so "130 s" of streaming takes 13 s here, and every limit
and pace (one request a second: 0.1 s real) holds as it would at full scale. The model's pace is
real time: its word interval is chosen to make the answer last the scaled seconds named.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from devtools.fake_channel import FakeConnector
from devtools.fake_model import FakeModelServer, Scripted, tool_call
from shared.activity import parse_activity
from shared.parts import wire_size
from shared.store import InMemoryConversationStore
from shared.streaming import StreamClock
from shared.tools import tool
from tests.integration.teams_harness import HEADERS, activity, running_bot, until

SCALE = 10.0
CLOCK = StreamClock(scale=SCALE)
#: The bot's own deadline for the model is real time: room for the scaled answers.
ENVIRONMENT = {"CHAT_MODEL_TIMEOUT_SECONDS": "120", "CHAT_SUGGESTED_REPLIES": "off"}


def paragraphs(count: int, *, sentences: int = 5, tag: str = "") -> str:
    """`count` paragraphs of `sentences` sentences of five words, each word unique."""
    return "\n\n".join(" ".join(f"Part{tag}{p} sentence {s} has words." for s in range(sentences))
                       for p in range(count))


def words(text: str) -> list[str]:
    return [word for word in text.split() if not word.startswith("```")]


def stream_kind(activity: dict[str, Any]) -> str | None:
    info = next((e for e in activity.get("entities", []) if e.get("type") == "streaminfo"), None)
    return info.get("streamType") if info else None


@pytest.fixture
async def servers() -> AsyncIterator[tuple[FakeModelServer, FakeConnector]]:
    async with FakeModelServer() as model, FakeConnector(clock=CLOCK.now) as connector:
        yield model, connector


def assert_kept_the_contract(connector: FakeConnector, conversation: str) -> None:
    """No request broke a rule; the streams came one after another, each within two minutes."""
    contract = connector.streams
    assert contract.broken(conversation) == [] and contract.violations == []
    streams = contract.of(conversation)
    for earlier, later in itertools.pairwise(streams):
        assert earlier.ended is not None and later.started >= earlier.ended
    assert all(s.ended is None or s.ended - s.started <= 120 for s in streams)
    assert all(r["bytes"] <= 28_000 for r in connector.requests)


async def test_a_130_second_streamed_answer_arrives_whole_across_messages(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a personal chat, and a model that streams an answer for 130 s
    model, connector = servers
    answer = paragraphs(26)
    model.word_interval = 130 / SCALE / len(answer.split(" "))
    model.then(Scripted(content=answer))
    store = InMemoryConversationStore()
    # WHEN a message is answered
    async with running_bot(store, model, clock=CLOCK, **ENVIRONMENT) as bot:
        response = await bot.handle(body=activity(connector, "a:long"), headers=HEADERS)
    # THEN the answer went out in two streamed messages, the first ended before Teams' two
    # minutes and the second opened only after it ended, by every rule of the contract
    assert response.status == 200
    streams = connector.streams.of("a:long")
    assert len(streams) == 2 and all(s.finished for s in streams)
    assert_kept_the_contract(connector, "a:long")
    assert 90 <= streams[0].ended - streams[0].started <= 110  # type: ignore[operator]
    # AND the messages hold the whole answer, in order, each part ending at a sentence
    texts = [m["text"] for m in connector.messages("a:long")]
    assert len(texts) == 2 and words(" ".join(texts)) == words(answer)
    assert texts[0].endswith(".")
    # AND the stored reply is the whole answer, once
    stored = [m.content for m in await store.list_messages("a:long")]
    assert stored == ["tell me", answer]


async def test_a_60_kb_streamed_answer_goes_on_in_new_messages_within_the_size(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a model that streams a 60 KB answer, with a code block, in 30 s
    model, connector = servers
    code = "```python\n" + "".join(f"value_{i} = {i}\n" for i in range(400)) + "```"
    answer = f"{paragraphs(300)}\n\n{code}\n\n{paragraphs(100, tag='b')}"
    assert 60_000 <= len(answer.encode()) <= 75_000
    model.word_interval = 30 / SCALE / len(answer.split(" "))
    model.then(Scripted(content=answer))
    store = InMemoryConversationStore()
    # WHEN it is answered
    async with running_bot(store, model, clock=CLOCK, **ENVIRONMENT) as bot:
        await bot.handle(body=activity(connector, "a:big"), headers=HEADERS)
    # THEN it arrived in several messages, each within Teams' size, one stream at a time
    messages = connector.messages("a:big")
    assert len(messages) >= 3 and all(wire_size(m["text"]) <= 20_000 for m in messages)
    assert_kept_the_contract(connector, "a:big")
    # AND whole and in order, the code block closed and opened again where it was cut, and the
    # feedback buttons on the last message only
    assert words(" ".join(m["text"] for m in messages)) == words(answer)
    assert all(m["text"].count("```") % 2 == 0 for m in messages)
    assert ["feedbackLoop" in m.get("channelData", {}) for m in messages] == \
        [False] * (len(messages) - 1) + [True]
    assert [m.content for m in await store.list_messages("a:big")] == ["tell me", answer]


async def test_a_60_kb_answer_in_a_group_chat_is_split_into_ordinary_messages(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a group chat (no streaming) and a 60 KB answer
    model, connector = servers
    answer = paragraphs(450)
    model.then(Scripted(content=answer))
    store = InMemoryConversationStore()
    # WHEN it is answered
    async with running_bot(store, model, **ENVIRONMENT) as bot:
        await bot.handle(body=activity(connector, "19:big", personal=False), headers=HEADERS)
    # THEN it went out as three ordinary messages, in order, each ending a paragraph
    messages = connector.messages("19:big")
    assert len(messages) == 3 and all(stream_kind(m) is None for m in messages)
    assert connector.streams.violations == []
    assert "\n\n".join(m["text"] for m in messages) == answer
    assert [m.content for m in await store.list_messages("19:big")] == ["tell me", answer]


async def test_stop_during_the_second_part_keeps_the_first_and_what_was_shown_of_the_second(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN an answer that streams for 200 s, and a user who presses Stop once the second part's
    # stream has taken three updates
    model, connector = servers
    answer = paragraphs(40)
    model.word_interval = 200 / SCALE / len(answer.split(" "))
    model.then(Scripted(content=answer))
    connector.streams.cancel("a:stop2", after_updates=3, stream=2)
    store = InMemoryConversationStore()
    hung_up = model.hung_up
    # WHEN it is answered
    async with running_bot(store, model, clock=CLOCK, **ENVIRONMENT) as bot:
        await bot.handle(body=activity(connector, "a:stop2"), headers=HEADERS)
    # THEN the model's stream was closed, and nothing went out after the Stop
    first, second = connector.streams.of("a:stop2")
    await until(lambda: model.hung_up > hung_up)
    assert first.finished and not second.finished and second.cancel
    (message,) = connector.messages("a:stop2")
    assert connector.streams.violations == []
    # AND the stored reply is the first part and what the second part showed, marked stopped
    reply = (await store.list_messages("a:stop2"))[-1]
    assert reply.stopped and reply.content is not None
    assert words(reply.content) == words(message["text"]) + words(second.text)
    assert answer.startswith(reply.content[:200]) and len(words(reply.content)) < len(words(answer))


async def test_a_silent_model_keeps_the_stream_alive_every_30_seconds(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a model that thinks for 70 s before its first word (a reasoning model)
    model, connector = servers
    model.first_token_after = 70 / SCALE
    model.then(Scripted(content="After a long thought: yes."))
    conversation = f"a:{uuid.uuid4().hex}"
    # WHEN a message is answered
    async with running_bot(InMemoryConversationStore(), model, clock=CLOCK, **ENVIRONMENT) as bot:
        posted = CLOCK.now()
        await bot.handle(body=activity(connector, conversation), headers=HEADERS)
    # THEN the first update came at once (Copilot wants one within 15 s), then informative
    # updates no more than 30 s apart (Copilot allows 45 s), in one stream, by the contract
    (stream,) = connector.streams.of(conversation)
    assert stream.started - posted < 15
    kinds = [stream_kind(update) for update in stream.updates]
    informative = [u["text"] for u in stream.updates if stream_kind(u) == "informative"]
    assert kinds[:3] == ["informative"] * 3 and informative[0] == "Thinking…"
    assert informative[1].startswith("Thinking… (") and informative[1].endswith(" s)")
    assert len(stream.gaps) >= 3 and max(stream.gaps) <= 31
    assert connector.streams.violations == []
    assert connector.messages(conversation)[-1]["text"] == "After a long thought: yes."


async def test_a_stream_opened_before_the_turn_is_kept_alive_while_the_model_is_silent(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a stream opened before its turn works ("Thinking…", as the webhook or the drain opens
    # it), resumed by the turn's progress, and a model silent for 50 s
    model, connector = servers
    conversation = f"a:{uuid.uuid4().hex}"
    async with running_bot(InMemoryConversationStore(), model, clock=CLOCK, **ENVIRONMENT) as bot:
        incoming = parse_activity(activity(connector, conversation), HEADERS)
        opened = await bot.delivery.open_stream(incoming)
        progress = bot.delivery.progress(incoming, resume=opened)
        assert progress.stream is not None
        # WHEN 50 s pass with no text, then the answer comes
        await CLOCK.sleep(50)
        await progress.stream.on_text("Done thinking.")
        await bot.delivery.send(incoming, incoming.reply("Done thinking.", ai=True),
                                stream=progress.stream)
        await progress.close()
    # THEN the resumed stream took keep-alive updates no more than 30 s apart, and ended
    (stream,) = connector.streams.of(conversation)
    assert len(stream.updates) >= 2 and max(stream.gaps) <= 31
    assert stream.finished and connector.streams.broken() == []


@tool
async def slow_lookup(topic: str) -> str:
    """Look a topic up (slowly: 50 s of the stream's scaled time)."""
    await CLOCK.sleep(50)
    return f"{topic}: found"


async def test_copilots_rules_hold_through_a_silent_tool_round_after_text_was_shown(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a model that writes a few words, then calls a tool that runs for 50 s
    model, connector = servers
    model.then(Scripted(content="Let me look that up.",
                        tool_calls=[tool_call("slow_lookup", {"topic": "streams"})]),
               Scripted(content="Found it."))
    conversation = f"a:{uuid.uuid4().hex}"
    # WHEN a message is answered
    async with running_bot(InMemoryConversationStore(), model, clock=CLOCK, functions=[slow_lookup],
                           CHAT_TOOL_TIMEOUT_SECONDS="30", **ENVIRONMENT) as bot:
        posted = CLOCK.now()
        await bot.handle(body=activity(connector, conversation), headers=HEADERS)
    # THEN Microsoft 365 Copilot's rules held: a first update within 15 s, then no 45 s without
    # one (the text shown is sent again while the tool runs), by the contract
    (stream,) = connector.streams.of(conversation)
    assert stream.started - posted < 15 and max(stream.gaps) <= 31
    streamed = [u["text"] for u in stream.updates if stream_kind(u) == "streaming"]
    assert streamed[:2] == ["Let me look that up."] * 2
    assert connector.streams.violations == [] and stream.finished

