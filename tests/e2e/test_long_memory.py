"""Long memory end to end: the summary in history and after /reset, speakers in a group chat."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from shared.summary import SUMMARY_INSTRUCTIONS
from tests.e2e.channel import Bench, bench


@pytest.fixture(scope="module")
def channel(azurite_connection_string: str) -> Iterator[Bench]:
    with bench(azurite_connection_string, extra_env={"CHAT_HISTORY_TOKEN_BUDGET": "300",
                                                     "CHAT_SUMMARY_TOKEN_BUDGET": "100"}) as running:
        yield running


def history(channel: Bench, conversation: str) -> dict[str, Any]:
    response = channel.http.get(
        f"{channel.host.url}/api/conversations/{quote(conversation, safe='')}/messages")
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def summary_calls(channel: Bench) -> int:
    return sum(1 for r in channel.model.requests
               if str(r["messages"][0]["content"]).startswith(SUMMARY_INSTRUCTIONS[:40]))


def test_history_shows_the_summary_and_reset_clears_it(channel: Bench) -> None:
    # GIVEN a conversation much longer than its 300-token window
    conversation = f"a:{uuid.uuid4().hex}"
    before = summary_calls(channel)
    for index in range(30):
        # WHEN each message is answered (the summary is prepared before the POST returns)
        response = channel.post(channel.message(f"message {index} about the plan",
                                                conversation_id=conversation))
        assert response.status_code == 200
    # THEN the summary model was asked, every reply went out, and history shows the summary
    assert summary_calls(channel) > before
    assert len(channel.connector.messages(conversation)) == 30
    shown = history(channel, conversation)
    assert shown["summary"] and len(shown["messages"]) == 60
    assert shown["messages"][-1]["usage"]["cachedTokens"] >= 0
    # AND /reset clears it with the messages: nothing is left to show (404)
    channel.post(channel.message("/reset", conversation_id=conversation))
    cleared = channel.http.get(
        f"{channel.host.url}/api/conversations/{quote(conversation, safe='')}/messages")
    assert cleared.status_code == 404 and cleared.json()["error"] == "conversation_not_found"


def test_in_a_group_chat_each_message_reaches_the_model_with_its_speaker(channel: Bench) -> None:
    # GIVEN a group chat where Ada and Grace Hopper talk to the bot
    conversation = f"g:{uuid.uuid4().hex}"
    for name, text in (("Ada", "I prefer tea."), ("Grace Hopper", "I prefer coffee.")):
        activity = channel.message(text, conversation_id=conversation)
        activity["conversation"]["conversationType"] = "groupChat"
        activity["from"] = {"id": f"29:{name}", "name": name}
        # WHEN each posts
        assert channel.post(activity).status_code == 200
    # THEN the model got each user message with who said it (a prefix: a compatible server)
    sent = [m for m in channel.model.requests[-1]["messages"] if m["role"] == "user"]
    assert [m["content"] for m in sent] == ["Ada: I prefer tea.", "Grace Hopper: I prefer coffee."]
    # AND history names the speakers
    users = [m for m in history(channel, conversation)["messages"] if m["role"] == "user"]
    assert [m["speaker"] for m in users] == ["Ada", "Grace Hopper"]


def test_in_a_one_to_one_chat_no_speaker_is_sent(channel: Bench) -> None:
    # GIVEN a personal chat (the fixture's conversationType)
    conversation = f"p:{uuid.uuid4().hex}"
    # WHEN a message is posted
    channel.post(channel.message("hello", conversation_id=conversation))
    # THEN it reaches the model as it was written
    assert channel.model.requests[-1]["messages"][-1] == {"role": "user", "content": "hello"}
