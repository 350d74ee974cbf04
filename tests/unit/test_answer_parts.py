"""The parts of issue 19's split, each alone (no I/O): the turn with its clock, the delivery's
reply, the queue ticket, and host.json's queue settings the app relies on."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx2
import pytest

from shared.activity import parse_activity
from shared.connector import BotConnector
from shared.delivery import Delivery
from shared.errors import BadRequest
from shared.inbox import TurnTicket, max_dequeue_count, visibility_timeout
from shared.limits import LIMIT_REPLIES
from shared.messages import ChatMessage, StoredTurn
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import AnswerMode, load_settings
from shared.store import InMemoryConversationStore
from shared.turn import Committed, Found, Refused, TurnRunner
from tests.unit.test_turns import HEADERS, CountingModel, activity

HOST_JSON = Path(__file__).parents[2] / "host.json"
NOON = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def runner(store: InMemoryConversationStore, model: CountingModel, *, clock: datetime = NOON,
           **env: str) -> TurnRunner:
    settings = load_settings({"OPENAI_API_KEY": "sk-test", **env})
    chat = build_model(settings.model,
                       http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(model)))
    return TurnRunner(settings=settings, store=store, prompt=ChatPrompt(chat), clock=lambda: clock)


async def test_the_turn_commits_then_finds_its_activity_committed_on_a_retry() -> None:
    # GIVEN a turn runner on the in-memory store
    store, model = InMemoryConversationStore(), CountingModel()
    turns = runner(store, model)
    message = parse_activity(activity("hi", "c1", "act-1"), HEADERS)
    # WHEN the same activity is run twice
    first = await turns.run(message, "hi", needed=1, stream=None)
    second = await turns.run(message, "hi", needed=1, stream=None)
    # THEN the first commits, the second finds it (to re-send), and the model was asked once
    assert isinstance(first, Committed) and first.turn.reply is not None
    assert first.turn.reply.content == "echo hi"
    assert isinstance(second, Found) and second.send and model.calls == 1


async def test_the_turn_reads_its_limits_with_the_clock_it_is_given() -> None:
    # GIVEN a limit of one turn a minute, a store whose clock says noon, and one turn at noon
    store, model = InMemoryConversationStore(clock=lambda: NOON), CountingModel()
    first = await runner(store, model, CHAT_MAX_TURNS_PER_MINUTE="1").run(
        parse_activity(activity("m0", "c2"), HEADERS), "m0", needed=1, stream=None)
    # WHEN a second message is run by a turn whose clock says noon, and by one two minutes later
    results = [await runner(store, model, clock=at, CHAT_MAX_TURNS_PER_MINUTE="1").run(
        parse_activity(activity("m1", "c2"), HEADERS), "m1", needed=1, stream=None)
        for at in (NOON, NOON + timedelta(minutes=2))]
    # THEN at noon it is refused with the limit's reply and no model call; later it is answered
    assert isinstance(first, Committed)
    assert results[0] == Refused(text=LIMIT_REPLIES["turns_per_minute"])
    assert isinstance(results[1], Committed) and model.calls == 2


def test_the_delivery_builds_the_reply_activity_in_one_place() -> None:
    # GIVEN a committed turn
    settings = load_settings({"OPENAI_API_KEY": "sk-test", "CHAT_FEEDBACK": "on"})
    delivery = Delivery(settings=settings, store=InMemoryConversationStore(),
                        connector=BotConnector(credential=None))
    message = parse_activity(activity("q", "c3", "act-9"), HEADERS)
    turn = StoredTurn(conversation_id="c3", activity_id="act-9", messages=(
        ChatMessage(role="user", content="q"), ChatMessage(role="assistant", content="a")))
    # WHEN its reply activity is built
    reply = delivery.reply_activity(message, turn)
    # THEN it carries the text, answers the activity, is AI-marked and offers feedback
    assert reply["text"] == "a" and reply["replyToId"] == "act-9"
    assert reply["entities"][0]["additionalType"] == ["AIGeneratedContent"]
    assert reply["channelData"]["feedbackLoop"] == {"type": "default"}


def test_a_ticket_goes_through_the_queue_as_small_json_and_back() -> None:
    # GIVEN a wake-up ticket
    ticket = TurnTicket(conversation_id="a:1", activity_id="act", enqueued_at=1.5, kind="wake")
    # WHEN it is written and read back
    text = ticket.to_json()
    # THEN it is the same ticket, in well under the queue's 64 KiB
    assert TurnTicket.from_json(text) == ticket and len(text) < 300


@pytest.mark.parametrize("text", ["", "[]", '{"conversationId": "a"}',
                                  '{"conversationId": "", "activityId": "x", "enqueuedAt": 1}',
                                  '{"conversationId": "a", "activityId": "x", "enqueuedAt": 1, '
                                  '"kind": "later"}'])
def test_a_malformed_ticket_is_a_bad_request_naming_the_problem(text: str) -> None:
    with pytest.raises(BadRequest, match="not a turn ticket"):
        TurnTicket.from_json(text)


def test_host_json_queue_settings_fit_a_chat() -> None:
    # GIVEN host.json's queue extension settings
    queues = json.loads(HOST_JSON.read_text())["extensions"]["queues"]
    # THEN the app's last dequeue is the host's, messages are base64 as the app enqueues them,
    # and an idle queue is polled at least once a second
    assert max_dequeue_count(HOST_JSON) == queues["maxDequeueCount"] == 5
    assert visibility_timeout(HOST_JSON) == 5.0  # a failed turn's retry waits as long
    assert queues["messageEncoding"] == "base64"
    hours, minutes, seconds = queues["maxPollingInterval"].split(":")
    assert int(hours) == int(minutes) == 0 and float(seconds) <= 1.0


def test_the_answer_mode_is_queue_by_default_and_checked() -> None:
    assert load_settings({}).answer_mode is AnswerMode.QUEUE
    assert load_settings({"CHAT_ANSWER_MODE": "inline"}).answer_mode is AnswerMode.INLINE
    with pytest.raises(Exception, match="CHAT_ANSWER_MODE"):
        load_settings({"CHAT_ANSWER_MODE": "later"})
    with pytest.raises(Exception, match="CHAT_TURN_QUEUE"):
        load_settings({"CHAT_TURN_QUEUE": "Chat_Turns"})
    with pytest.raises(Exception, match="CHAT_STORAGE_QUEUE_ENDPOINT"):
        load_settings({"CHAT_STORAGE_TABLE_ENDPOINT": "https://a.table.core.windows.net"})
