"""Streamed replies in Teams personal chats, over real HTTP, against a Bot Connector stand-in that
enforces Teams' streaming contract (devtools/teams_streams.py); and feedback on replies."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.fake_model import Scripted, tool_call
from tests.e2e.channel import Bench, bench, event

LONG_ANSWER = " ".join(f"word{index}" for index in range(40))


@pytest.fixture(scope="module")
def channel(azurite_connection_string: str) -> Iterator[Bench]:
    # A model that writes 40 words over about 2 s: two or three updates at one a second.
    with bench(azurite_connection_string, model_options={"word_interval": 0.05}) as running:
        yield running


def personal() -> str:
    return f"a:{uuid.uuid4().hex}"  # Teams' personal chat IDs start with "a:"


def stream_info(activity: dict[str, Any]) -> dict[str, Any] | None:
    return next((e for e in activity.get("entities", []) if e.get("type") == "streaminfo"), None)


def sent(channel: Bench, conversation_id: str) -> list[dict[str, Any]]:
    return [r["activity"] for r in channel.connector.requests if r["conversation_id"] == conversation_id]


def test_a_personal_chat_streams_by_the_contract_and_ends_with_the_whole_answer(channel: Bench) -> None:
    # GIVEN a personal chat and a model that streams a 40-word answer
    conversation = personal()
    channel.model.then(Scripted(content=LONG_ANSWER))
    # WHEN a message arrives
    response = channel.post(channel.message("tell me a lot", conversation_id=conversation))
    # THEN the stand-in saw one stream keep every rule: an informative update first, cumulative
    # streaming updates at most one a second, then the final message with the whole answer
    assert response.status_code == 200
    assert channel.connector.streams.violations == []
    (stream,) = channel.connector.streams.of(conversation)
    assert stream.finished and all(gap >= 1.0 for gap in stream.gaps)
    kinds = [stream_info(update)["streamType"] for update in stream.updates]  # type: ignore[index]
    assert kinds[0] == "informative" and stream.updates[0]["text"] == "Thinking…"
    assert "streaming" in kinds
    final = sent(channel, conversation)[-1]
    assert final["type"] == "message" and final["text"] == LONG_ANSWER
    assert stream_info(final) == {"type": "streaminfo", "streamId": stream.id, "streamType": "final"}
    # AND the final carries the AI label and the feedback buttons, and the model streamed
    assert {"type": "https://schema.org/Message"}.items() <= final["entities"][0].items()
    assert final["channelData"]["feedbackLoop"] == {"type": "default"}
    assert channel.model.requests[-1]["stream"] is True
    # AND the stored reply is the answer
    assert channel.history(conversation)[-1]["content"] == LONG_ANSWER


def test_a_group_chat_gets_one_ordinary_message(channel: Bench) -> None:
    # GIVEN a group chat (streaming is for personal chats only)
    conversation = f"19:{uuid.uuid4().hex}@thread.v2"
    message = channel.message("hi all", conversation_id=conversation)
    message["conversation"]["conversationType"] = "groupChat"
    # WHEN a message arrives THEN the answer is one message, with no stream information
    assert channel.post(message).status_code == 200
    (reply,) = sent(channel, conversation)[1:]  # after the typing indicator
    assert reply["type"] == "message" and stream_info(reply) is None
    assert channel.model.requests[-1].get("stream") is None


def test_when_the_channel_refuses_a_stream_the_turn_falls_back_to_one_message(channel: Bench) -> None:
    # GIVEN a personal chat the connector will not stream to (it refuses the first update)
    conversation = f"refused:{uuid.uuid4().hex}"
    # WHEN a message arrives
    assert channel.post(channel.message("hello", conversation_id=conversation)).status_code == 200
    # THEN after the refused update, the whole answer arrives as one ordinary message
    requests = sent(channel, conversation)
    assert stream_info(requests[0]) is not None and requests[-1]["type"] == "message"
    assert stream_info(requests[-1]) is None and "hello" in requests[-1]["text"]
    assert len(channel.connector.messages(conversation)) == 1


def test_stop_closes_the_models_stream_and_keeps_what_the_user_saw(channel: Bench) -> None:
    # GIVEN a personal chat whose user presses Stop after the first streamed words
    conversation = personal()
    channel.connector.streams.cancel(conversation, after_updates=2)
    hung_up = channel.model.hung_up
    channel.model.then(Scripted(content=" ".join(f"w{index}" for index in range(200))))
    # WHEN a message arrives
    assert channel.post(channel.message("go on and on", conversation_id=conversation)).status_code == 200
    # THEN the model's stream was closed early (the stand-in sees the hang-up on its next write),
    # and no final message was sent
    (stream,) = channel.connector.streams.of(conversation)
    deadline = time.monotonic() + 5
    while channel.model.hung_up == hung_up and time.monotonic() < deadline:
        time.sleep(0.02)
    assert channel.model.hung_up == hung_up + 1
    assert not stream.finished and channel.connector.messages(conversation) == []
    # AND the stored reply is what the user saw, marked as stopped
    reply = channel.history(conversation)[-1]
    assert reply["content"] == stream.text and reply["content"].startswith("w0")
    assert reply["stopped"] is True and len(reply["content"].split()) < 200


def test_a_retry_during_a_stream_opens_no_second_stream(channel: Bench) -> None:
    # GIVEN a message whose streamed answer takes a few seconds
    conversation = personal()
    message = channel.message("long one", conversation_id=conversation)
    channel.model.then(Scripted(content=LONG_ANSWER))
    calls = channel.model.calls
    first: list[int] = []
    worker = threading.Thread(target=lambda: first.append(channel.post(message).status_code))
    worker.start()
    # WHEN the channel sends the same activity again while it streams
    deadline = time.monotonic() + 10
    while not channel.connector.streams.of(conversation) and time.monotonic() < deadline:
        time.sleep(0.01)
    again = channel.post(message)
    worker.join()
    # THEN the retry is acknowledged at once, and there was one stream and one model call
    assert again.status_code == 200 and first == [200]
    assert len(channel.connector.streams.of(conversation)) == 1
    assert channel.model.calls == calls + 1


def test_a_tool_round_while_streaming_says_what_is_being_done(channel: Bench) -> None:
    # GIVEN a model that first calls the example tool, then takes 1.5 s to answer
    conversation = personal()
    channel.model.then(Scripted(tool_calls=[tool_call("get_current_time", {"time_zone": "UTC"})]),
                       Scripted(content="It is noon.", delay=1.5))
    # WHEN a message arrives
    assert channel.post(channel.message("time?", conversation_id=conversation)).status_code == 200
    # THEN an informative update named the tool, and the final message is the answer
    (stream,) = channel.connector.streams.of(conversation)
    informative = [u["text"] for u in stream.updates if stream_info(u)["streamType"] == "informative"]  # type: ignore[index]
    assert "Using get_current_time…" in informative
    assert stream.finished and sent(channel, conversation)[-1]["text"] == "It is noon."
    assert channel.connector.streams.violations == []


def feedback(channel: Bench, conversation_id: str, reply_id: str, reaction: str,
             text: str = "") -> Any:
    invoke = event("message", conversation_id=conversation_id, id=uuid.uuid4().hex,
                   serviceUrl=channel.connector.url)
    invoke.update(type="invoke", name="message/submitAction", replyToId=reply_id, text=None,
                  value={"actionName": "feedback", "actionValue": {
                      "reaction": reaction, "feedback": json.dumps({"feedbackText": text})}})
    return channel.post(invoke)


def test_feedback_is_stored_with_the_reply_it_rates_and_a_second_replaces_it(channel: Bench) -> None:
    # GIVEN a streamed answer, whose reply the channel knows by the stream's ID
    conversation = personal()
    channel.post(channel.message("rate me", conversation_id=conversation))
    (stream,) = channel.connector.streams.of(conversation)
    # WHEN the user dislikes it with a comment, then likes it
    first = feedback(channel, conversation, stream.id, "dislike", "too short")
    second = feedback(channel, conversation, stream.id, "like")
    # THEN each invoke is answered 200 with an empty object, and the history shows the newest
    assert (first.status_code, first.json()) == (200, {})
    assert (second.status_code, second.json()) == (200, {})
    reply = channel.history(conversation)[-1]
    assert reply["feedback"]["reaction"] == "like" and reply["feedback"]["text"] == ""
    # AND a rating of a reply nobody knows is acknowledged the same way
    unknown = feedback(channel, conversation, "no-such-reply", "like")
    assert (unknown.status_code, unknown.json()) == (200, {})


def test_with_streaming_off_a_personal_chat_gets_one_message(azurite_connection_string: str) -> None:
    # GIVEN a bot with CHAT_STREAMING=off
    with bench(azurite_connection_string, extra_env={"CHAT_STREAMING": "off",
                                                     "CHAT_FEEDBACK": "off"}) as local:
        conversation = personal()
        # WHEN a personal chat's message arrives
        assert local.post(local.message("hi", conversation_id=conversation)).status_code == 200
        # THEN no stream was opened, the answer is one message without feedback buttons
        assert local.connector.streams.of(conversation) == []
        reply = local.connector.messages(conversation)[-1]
        assert stream_info(reply) is None and "channelData" not in reply
