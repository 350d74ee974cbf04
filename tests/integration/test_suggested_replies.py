"""Suggested replies: from the same model call, on the final message only (streamed or plain),
never in the stored reply; a setting turns them off; a tap is an ordinary message. The welcome
follows CHAT_WELCOME."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest

from devtools.fake_channel import FakeConnector
from devtools.fake_model import FakeModelServer, Scripted
from shared.connector import BotConnector
from shared.errors import ConnectorError
from shared.store import InMemoryConversationStore
from shared.suggestions import CLOSE, OPEN
from tests.integration.teams_harness import HEADERS, activity, last_user_content, running_bot

ANSWER = " ".join(f"word{index}" for index in range(4))
WITH_BLOCK = f"{ANSWER}\n\n{OPEN}\nWhat about Bergen?\nAnd tomorrow?\n{CLOSE}"
BUTTONS = {"actions": [{"type": "imBack", "title": "What about Bergen?", "value": "What about Bergen?"},
                       {"type": "imBack", "title": "And tomorrow?", "value": "And tomorrow?"}]}


@pytest.fixture
async def servers() -> AsyncIterator[tuple[FakeModelServer, FakeConnector]]:
    async with FakeModelServer(word_interval=0.02) as model, FakeConnector() as connector:
        yield model, connector


async def test_suggestions_arrive_on_the_streamed_final_from_the_same_call(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a model that ends its answer with a block of suggestions, slowly enough (0.6 s a
    # word) that stream updates go out while the block is being written
    model, connector = servers
    model.word_interval = 0.6
    model.then(Scripted(content=WITH_BLOCK))
    store = InMemoryConversationStore()
    # WHEN a message in a personal chat is answered, streaming
    async with running_bot(store, model) as bot:
        response = await bot.handle(body=activity(connector, "a:streamed"), headers=HEADERS)
    # THEN one model call was asked for suggestions in its instructions
    assert response.status == 200 and model.calls == 1
    assert OPEN in model.requests[0]["messages"][0]["content"]
    # AND the stream's final carries them as imBack buttons, with the answer alone as its text
    (stream,) = connector.streams.of("a:streamed")
    final = connector.messages("a:streamed")[-1]
    assert stream.finished and final["channelData"]["streamType"] == "final"
    assert final["suggestedActions"] == BUTTONS and final["text"] == ANSWER
    # AND no update showed any of the block, though one went out while it was written, and the
    # contract (suggestions on the final only) held
    texts = [update.get("text", "") for update in stream.updates]
    assert all("<" not in text and "Bergen" not in text for text in texts)
    assert texts[-1] == f"{ANSWER}\n\n"
    assert connector.streams.violations == []
    # AND the stored reply is the answer without the block
    assert [m.content for m in await store.list_messages("a:streamed")] == ["tell me", ANSWER]


async def test_suggestions_arrive_on_a_plain_final(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN the same answer, in a group chat (no streaming there)
    model, connector = servers
    model.then(Scripted(content=WITH_BLOCK))
    store = InMemoryConversationStore()
    # WHEN the message is answered
    async with running_bot(store, model) as bot:
        await bot.handle(body=activity(connector, "19:group", personal=False), headers=HEADERS)
    # THEN the one message carries the buttons, and neither it nor the store holds the block
    (reply,) = connector.messages("19:group")
    assert reply["suggestedActions"] == BUTTONS and reply["text"] == ANSWER
    assert "streamType" not in reply.get("channelData", {})
    assert [m.content for m in await store.list_messages("19:group")][-1] == ANSWER


async def test_a_reply_without_a_block_has_no_suggestions(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a model that leaves the block out, then one whose block never closes
    model, connector = servers
    model.then(Scripted(content=ANSWER), Scripted(content=f"{ANSWER}\n{OPEN}\nWhat ab"))
    # WHEN two messages are answered
    async with running_bot(InMemoryConversationStore(), model) as bot:
        for _ in range(2):
            await bot.handle(body=activity(connector, "a:none"), headers=HEADERS)
    # THEN neither reply has buttons; the unclosed block is no block, so it stays text
    replies = connector.messages("a:none")
    assert [r["text"] for r in replies] == [ANSWER, f"{ANSWER}\n{OPEN}\nWhat ab"]
    assert all("suggestedActions" not in r for r in replies)


async def test_hostile_or_clumsy_blocks_lose_no_text_and_offer_no_command(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a model that writes a block mid-answer, then quotes the marker in a code span, then
    # ends with an upper-case block offering /reset and a right-to-left override
    model, connector = servers
    middle = f"Before.\n{OPEN}\nWhy?\n{CLOSE}\nAfter the block."
    quoted = f"To format, write `{OPEN}` then one follow-up a line."
    hostile = f"{ANSWER}\n{OPEN.upper()}\n/reset\nPay \u202etxt.exe\n{CLOSE.upper()}"
    model.then(Scripted(content=middle), Scripted(content=quoted), Scripted(content=hostile))
    store = InMemoryConversationStore()
    # WHEN three messages are answered, streaming
    async with running_bot(store, model) as bot:
        for _ in range(3):
            await bot.handle(body=activity(connector, "a:hostile"), headers=HEADERS)
    # THEN the first two reach the user and the store whole, without buttons
    replies = connector.messages("a:hostile")
    assert [r["text"] for r in replies[:2]] == [middle, quoted]
    assert all("suggestedActions" not in r for r in replies[:2])
    # AND the third's block is read whatever its case: no /reset button, the override removed
    assert replies[2]["text"] == ANSWER
    assert replies[2]["suggestedActions"] == {"actions": [
        {"type": "imBack", "title": "Pay txt.exe", "value": "Pay txt.exe"}]}
    stored = [m.content for m in await store.list_messages("a:hostile")]
    assert stored[1::2] == [middle, quoted, ANSWER]
    assert connector.streams.violations == []


async def test_the_setting_turns_suggestions_off(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN CHAT_SUGGESTED_REPLIES=off
    model, connector = servers
    # WHEN a message is answered
    async with running_bot(InMemoryConversationStore(), model,
                           CHAT_SUGGESTED_REPLIES="off") as bot:
        await bot.handle(body=activity(connector, "a:off"), headers=HEADERS)
    # THEN the model is not asked for suggestions, and the reply has none
    assert OPEN not in json.dumps(model.requests[0])
    assert "suggestedActions" not in connector.messages("a:off")[-1]


async def test_a_tapped_suggestion_arrives_as_an_ordinary_message(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN an answer with suggestions
    model, connector = servers
    model.then(Scripted(content=WITH_BLOCK))
    store = InMemoryConversationStore()
    async with running_bot(store, model) as bot:
        await bot.handle(body=activity(connector, "a:tap"), headers=HEADERS)
        # WHEN the user taps one: Teams sends its value as the text of a message (imBack)
        tapped = connector.messages("a:tap")[-1]["suggestedActions"]["actions"][1]["value"]
        response = await bot.handle(body=activity(connector, "a:tap", tapped), headers=HEADERS)
    # THEN it is answered like any message, after the first turn
    assert response.status == 200 and model.calls == 2
    assert last_user_content(model) == "And tomorrow?"
    assert [m.content for m in await store.list_messages("a:tap")][:3] == \
        ["tell me", ANSWER, "And tomorrow?"]


def _added(connector: FakeConnector, channel: str) -> bytes:
    return json.dumps({
        "type": "conversationUpdate", "id": uuid.uuid4().hex, "channelId": channel,
        "serviceUrl": connector.url, "from": {"id": "29:u"}, "recipient": {"id": "28:bot"},
        "conversation": {"id": f"a:{channel}", "conversationType": "personal"},
        "membersAdded": [{"id": "29:u"}, {"id": "28:bot"}]}).encode()


@pytest.mark.parametrize(("welcome", "in_teams", "elsewhere"),
                         [("on", True, True), ("outside-teams", False, True), ("off", False, False)])
async def test_the_welcome_follows_the_setting(
        servers: tuple[FakeModelServer, FakeConnector], welcome: str, in_teams: bool,
        elsewhere: bool) -> None:
    # GIVEN CHAT_WELCOME set one way
    model, connector = servers
    # WHEN a person is added in Teams and in Web Chat
    async with running_bot(InMemoryConversationStore(), model, CHAT_WELCOME=welcome) as bot:
        for channel in ("msteams", "webchat"):
            await bot.handle(body=_added(connector, channel), headers=HEADERS)
    # THEN the welcome goes out where the setting says (outside-teams: the app's prompt starters
    # greet in Teams), with no model call
    assert bool(connector.messages("a:msteams")) is in_teams
    assert bool(connector.messages("a:webchat")) is elsewhere
    assert model.calls == 0


async def test_the_connector_stand_in_refuses_suggestions_on_a_stream_update(
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN the Bot Connector stand-in
    _, connector = servers
    client = BotConnector(credential=None)
    update = {"type": "typing", "text": "so far", "suggestedActions": BUTTONS,
              "entities": [{"type": "streaminfo", "streamType": "streaming", "streamSequence": 1}],
              "conversation": {"id": "a:contract", "conversationType": "personal"}}
    # WHEN a stream update carries suggested actions
    try:
        with pytest.raises(ConnectorError) as refused:
            await client.send(service_url=connector.url, conversation_id="a:contract",
                              activity=update)
    finally:
        await client.close()
    # THEN it is refused as the contract says: they go on the final message only
    assert refused.value.answer is not None and refused.value.answer[0] == 400
    assert connector.streams.violations == [
        "suggestedActions go only on a message (a stream's final, never an update)"]
