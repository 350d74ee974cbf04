"""The two halves through the dev host: the webhook accepts, the `answer` queue function answers,
on Azurite's queue, with the host's lease, dequeue count and poison queue (docs/devhost.md)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import BinaryBase64DecodePolicy
from azure.storage.queue.aio import QueueClient

from devtools.fake_model import Scripted
from shared.answer import APOLOGY
from shared.inbox import TurnTicket
from tests.e2e.channel import Bench, bench


@pytest.fixture(scope="module")
def queued(azurite_connection_string: str) -> Iterator[Bench]:
    with bench(azurite_connection_string, answer_mode="queue") as running:
        yield running


def personal_chat() -> str:
    return f"a:{uuid.uuid4().hex}"


def test_a_message_is_answered_200_while_the_model_is_still_working(queued: Bench) -> None:
    # GIVEN a model that takes 3 s over its answer
    conversation = personal_chat()
    queued.model.then(Scripted(content="worth the wait", delay=3.0))
    calls = queued.model.calls
    # WHEN a message arrives in a Teams personal chat
    started = time.monotonic()
    response = queued.post(queued.message("take your time", conversation_id=conversation,
                                          conversation={"id": conversation,
                                                        "conversationType": "personal"}))
    answered = time.monotonic() - started
    # THEN it is answered 200 at once, with "Thinking…" already shown and no reply yet
    assert response.status_code == 200 and answered < 2.0
    (stream,) = queued.connector.streams.of(conversation)
    assert stream.updates[0]["text"] == "Thinking…"
    assert queued.connector.messages(conversation) == []
    # AND the answer streams in later, once, ending the stream the webhook opened
    replies = queued.replies(conversation)
    assert [r["text"] for r in replies] == ["worth the wait"]
    assert stream.finished and queued.connector.streams.violations == []
    assert queued.model.calls == calls + 1
    assert [m["content"] for m in queued.history(conversation)] == ["take your time",
                                                                    "worth the wait"]


def test_a_retry_of_an_accepted_message_gets_one_answer(queued: Bench) -> None:
    # GIVEN a message, posted, and posted again by the channel before it is answered
    conversation = personal_chat()
    activity = queued.message("just once", conversation_id=conversation)
    statuses = [queued.post(activity).status_code for _ in range(2)]
    # THEN both got 200, one reply went out and one turn was stored
    assert statuses == [200, 200]
    queued.replies(conversation)
    time.sleep(1.0)
    assert len(queued.connector.messages(conversation)) == 1
    assert len(queued.history(conversation)) == 2


def test_expect_replies_and_reset_still_answer(queued: Bench) -> None:
    # GIVEN queue mode: expectReplies is answered in the response all the same
    conversation = personal_chat()
    body = queued.post(queued.message("inline please", conversation_id=conversation,
                                      deliveryMode="expectReplies")).json()
    assert body["activities"][0]["text"].startswith("reply to 'inline please'")
    # AND /reset goes through the queue and confirms
    assert queued.post(queued.message("/reset", conversation_id=conversation)).status_code == 200
    assert "forgotten" in queued.replies(conversation)[-1]["text"]
    assert queued.history(conversation) == []
    # AND the "Thinking…" the webhook showed for it was ended by that confirmation
    (stream,) = queued.connector.streams.of(conversation)
    assert stream.finished and queued.connector.streams.violations == []


def test_twenty_messages_at_once_to_one_chat_are_each_answered_and_stored_once(
        queued: Bench) -> None:
    # GIVEN twenty messages from one person to one conversation, posted at once
    conversation = f"c:{uuid.uuid4().hex}"
    activities = [queued.message(f"m{i}", conversation_id=conversation) for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda a: queued.post(a).status_code, activities))
    # THEN all are accepted, and all are stored once each, each with its own activity ID
    assert statuses == [200] * 20
    deadline = time.monotonic() + 60
    while len([m for m in queued.history(conversation) if m["role"] == "user"]) < 20:
        assert time.monotonic() < deadline, "not all stored within 60 s"
        time.sleep(0.2)
    time.sleep(1.0)
    history = queued.history(conversation)
    stored = [m for m in history if m["role"] == "user"]
    assert sorted(m["content"] for m in stored) == sorted(f"m{i}" for i in range(20))
    assert sorted(m["activityId"] for m in stored) == sorted(a["id"] for a in activities)
    # AND answered in bursts (at most 8 messages a turn), one reply each, one turn at a time:
    # every reply follows the messages it answers
    replies = queued.connector.messages(conversation)
    turns = [m for m in history if m["role"] == "assistant"]
    assert len(replies) == len(turns) < 20
    runs, run = [], 0
    for message in history:
        if message["role"] == "user":
            run += 1
        else:
            runs.append(run)
            run = 0
    assert run == 0 and sum(runs) == 20 and max(runs) <= 8


def test_an_activity_over_64_kib_goes_through_the_queue(queued: Bench) -> None:
    # GIVEN a Teams message of about 200 KB (a large card in its channel data)
    conversation = personal_chat()
    activity = queued.message("with a big card", conversation_id=conversation,
                              channelData={"card": [uuid.uuid4().hex for _ in range(6_000)]})
    # WHEN it is posted
    response = queued.post(activity)
    # THEN it is accepted and answered like any other (the queue holds a reference to it)
    assert response.status_code == 200
    assert [r["text"] for r in queued.replies(conversation)] == [
        "reply to 'with a big card' after 2 messages"]


def test_a_worker_killed_during_a_turn_is_answered_once_after_restart(
        azurite_connection_string: str) -> None:
    # GIVEN a dev host whose queue leases last 4 s (Azure's: 10 minutes), holds on a
    # conversation that last 5 s, and a model that takes 30 s over the first answer
    with bench(azurite_connection_string, answer_mode="queue",
               extra_env={"CHAT_HOLD_SECONDS": "5"},
               host_args=["--queue-lease-seconds", "4"]) as running:
        conversation = personal_chat()
        running.model.then(Scripted(content="never seen", delay=30.0))
        assert running.post(running.message("survive this",
                                            conversation_id=conversation)).status_code == 200
        deadline = time.monotonic() + 20
        while running.model.calls == 0:
            assert time.monotonic() < deadline, "the turn never started"
            time.sleep(0.05)
        # WHEN the host is killed mid-turn (SIGKILL) and started again
        assert running.host.pid is not None
        os.kill(running.host.pid, signal.SIGKILL)
        running.host.stop()
        running.host.start()
        # THEN, once the lease and the dead worker's hold run out, the message is answered,
        # once, and stored once
        replies = running.replies(conversation, seconds=40)
        assert [r["text"] for r in replies] == ["reply to 'survive this' after 2 messages"]
        time.sleep(1.0)
        assert len(running.connector.messages(conversation)) == 1
        assert [m["content"] for m in running.history(conversation)] == [
            "survive this", "reply to 'survive this' after 2 messages"]
        assert running.connector.streams.violations == []
        assert running.connector.streams.open(conversation) == []


def test_a_message_that_always_fails_ends_in_one_apology_and_the_poison_queue(
        azurite_connection_string: str) -> None:
    # GIVEN the dev host (host.json: 5 dequeues, 5 s apart) and a model that always fails
    with bench(azurite_connection_string, answer_mode="queue",
               extra_env={"CHAT_MODEL_MAX_RETRIES": "0"}) as running:
        conversation = personal_chat()
        running.model.then(*[Scripted(status=500, error={"message": "down"}) for _ in range(5)])
        # WHEN a message arrives in a personal chat
        activity = running.message("doomed", conversation_id=conversation)
        assert running.post(activity).status_code == 200
        # THEN after five tries the user has one apology, ending the "Thinking…" stream
        replies = running.replies(conversation, seconds=60)
        assert [r["text"] for r in replies] == [APOLOGY] and running.model.calls == 5
        (stream,) = running.connector.streams.of(conversation)
        assert stream.finished and running.connector.streams.violations == []
        # AND a text-free record of it is in the poison queue, nothing is stored or kept, and
        # the log says why
        poisoned = asyncio.run(_peek(azurite_connection_string,
                                     f"{running.host.env['CHAT_TURN_QUEUE']}-poison"))
        assert [TurnTicket.from_json(p).activity_id for p in poisoned] == [activity["id"]]
        assert all(b"doomed" not in p for p in poisoned)
        assert running.history(conversation) == []
        log = running.host.log_text()
        assert "the turn failed on its last attempt (5: ModelUnavailable); apologising" in log


async def _peek(connection_string: str, queue: str) -> list[bytes]:
    client = QueueClient.from_connection_string(connection_string, queue,
                                                message_decode_policy=BinaryBase64DecodePolicy())
    async with client:  # the host moves the message just after the apology went out
        for _ in range(100):
            with contextlib.suppress(ResourceNotFoundError):
                found = [bytes(m.content) for m in await client.peek_messages(max_messages=32)]
                if found:
                    return found
            await asyncio.sleep(0.1)
    return []
