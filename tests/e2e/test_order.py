"""One conversation, one order, through the dev host with the turn queue (issue 26): what a person
sees in Teams when they type fast, reset, or split a thought, and the answer side's checks of what
it reads back. The dev host runs the app's `answer` queue function by the queue extension's rules;
auth is on (tokens minted by the local identity provider); the Bot Connector stand-in enforces
Teams' streaming contract, one stream per chat and one streaming request a second."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import pytest

from devtools.fake_channel import FakeConnector
from devtools.fake_model import Scripted
from shared.answer import RESET_DONE, WITHDRAWN
from shared.inbox import Inbox, TurnTicket
from tests.e2e.channel import Bench, bench

SLOW = 2.0  # seconds the model takes over an answer, as in the trials


@pytest.fixture(scope="module")
def queued(azurite_connection_string: str) -> Iterator[Bench]:
    with bench(azurite_connection_string, answer_mode="queue") as running:
        yield running


def personal_chat() -> str:
    return f"a:{uuid.uuid4().hex}"


def personal(running: Bench, text: str, conversation: str, **fields: Any) -> dict[str, Any]:
    return running.message(text, conversation_id=conversation,
                           conversation={"id": conversation, "conversationType": "personal"},
                           **fields)


def wait_for(check: Any, *, seconds: float = 60.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what} not met within {seconds} s"
        time.sleep(0.05)


def stored_users(running: Bench, conversation: str) -> list[str]:
    return [m["content"] for m in running.history(conversation) if m["role"] == "user"]


def trials(running: Bench, first: str, second: str, *, count: int = 10,
           seed: int = 26) -> list[str]:
    """`count` personal chats, each sent `first` then `second` 0.05 to 0.3 s later, at once."""
    rng = random.Random(seed)
    conversations = [personal_chat() for _ in range(count)]
    gaps = [rng.uniform(0.05, 0.3) for _ in conversations]

    def one(index: int) -> None:
        conversation = conversations[index]
        assert running.post(personal(running, first, conversation)).status_code == 200
        time.sleep(gaps[index])
        assert running.post(personal(running, second, conversation)).status_code == 200

    with ThreadPoolExecutor(count) as pool:
        list(pool.map(one, range(count)))
    return conversations


def test_message_then_reset_ten_trials_nothing_stored_after_the_confirmation(
        queued: Bench) -> None:
    # GIVEN a model that takes 2 s per answer
    queued.model.latency = SLOW
    try:
        # WHEN ten chats each send "my secret is N" and /reset 0.05 to 0.3 s later
        conversations = trials(queued, "my secret is 42", "/reset")
        # THEN each chat's last reply is the confirmation, after the secret's answer
        for conversation in conversations:
            wait_for(lambda c=conversation: RESET_DONE in [
                r["text"] for r in queued.connector.messages(c)], what="the confirmation")
        time.sleep(1.0)
        for conversation in conversations:
            texts = [r["text"] for r in queued.connector.messages(conversation)]
            assert texts[-1] == RESET_DONE and len(texts) == 2, texts
            # AND nothing was stored after it: the next turn sends no "forgotten" secret
            assert queued.history(conversation) == []
    finally:
        queued.model.latency = 0.0
    assert queued.connector.streams.broken() == []


def test_two_messages_ten_trials_are_stored_in_the_order_they_came(queued: Bench) -> None:
    queued.model.latency = SLOW
    try:
        # WHEN ten chats each send "first" and "second" 0.05 to 0.3 s apart
        conversations = trials(queued, "first", "second", seed=27)
        # THEN every chat stored both, and its streams all ended (the last reply went out)
        for conversation in conversations:
            wait_for(lambda c=conversation: len(stored_users(queued, c)) == 2
                     and not queued.connector.streams.open(c)
                     and queued.history(c)[-1]["role"] == "assistant",
                     what="both messages answered")
    finally:
        queued.model.latency = 0.0
    # AND in the order they came, each answered once (alone, or both in one turn)
    for conversation in conversations:
        history = queued.history(conversation)
        assert [m["content"] for m in history if m["role"] == "user"] == ["first", "second"]
        assert len(queued.connector.messages(conversation)) == \
            len([m for m in history if m["role"] == "assistant"])
    assert queued.connector.streams.broken() == []


def test_a_burst_of_four_behind_a_running_answer_is_one_turn_one_stream_at_a_time(
        queued: Bench) -> None:
    # GIVEN a personal chat whose first message takes the model 3 s
    conversation = personal_chat()
    queued.model.then(Scripted(content="the answer to one", delay=3.0))
    calls = queued.model.calls
    assert queued.post(personal(queued, "one", conversation)).status_code == 200
    wait_for(lambda: queued.model.calls == calls + 1, what="the first model call")
    # WHEN three more arrive 0.3 s apart while it works
    for text in ("two", "three", "four"):
        time.sleep(0.3)
        assert queued.post(personal(queued, text, conversation)).status_code == 200
    # THEN two replies: the first answer, then one for the three that waited
    replies = queued.replies(conversation, count=2, seconds=30)
    time.sleep(1.5)
    assert len(queued.connector.messages(conversation)) == 2
    assert queued.model.calls == calls + 2
    assert replies[0]["text"] == "the answer to one"
    history = queued.history(conversation)
    assert [(m["role"], m["content"]) for m in history][:5] == [
        ("user", "one"), ("assistant", "the answer to one"), ("user", "two"),
        ("user", "three"), ("user", "four")]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "user", "user",
                                            "assistant"]
    # AND one stream at a time: the first, then the burst's, both ended by their final
    streams = queued.connector.streams.of(conversation)
    assert len(streams) == 2 and all(stream.finished for stream in streams)
    assert streams[0].updates[0]["text"] == streams[1].updates[0]["text"] == "Thinking…"
    assert queued.connector.streams.broken() == []


def test_burst_each_answers_every_message_in_order(azurite_connection_string: str) -> None:
    # GIVEN CHAT_BURST=each
    with bench(azurite_connection_string, answer_mode="queue",
               extra_env={"CHAT_BURST": "each"}) as running:
        conversation = personal_chat()
        running.model.then(Scripted(content="the answer to one", delay=2.0))
        assert running.post(personal(running, "one", conversation)).status_code == 200
        wait_for(lambda: running.model.calls == 1, what="the first model call")
        # WHEN three more arrive while it works
        for text in ("two", "three", "four"):
            time.sleep(0.2)
            assert running.post(personal(running, text, conversation)).status_code == 200
        # THEN four turns, one by one, in order, one stream at a time
        running.replies(conversation, count=4, seconds=40)
        history = running.history(conversation)
        assert [m["content"] for m in history if m["role"] == "user"] == [
            "one", "two", "three", "four"]
        assert [m["role"] for m in history] == ["user", "assistant"] * 4
        assert running.model.calls == 4
        assert running.connector.streams.broken() == []


def test_a_worker_killed_while_holding_a_conversation_the_next_message_after_the_hold(
        azurite_connection_string: str) -> None:
    # GIVEN holds of 5 s, queue leases of 60 s (the killed message comes back late), and a model
    # that takes 30 s over the first answer
    with bench(azurite_connection_string, answer_mode="queue",
               extra_env={"CHAT_HOLD_SECONDS": "5"},
               host_args=["--queue-lease-seconds", "60"]) as running:
        conversation = personal_chat()
        running.model.then(Scripted(content="never seen", delay=30.0))
        assert running.post(personal(running, "first", conversation)).status_code == 200
        wait_for(lambda: running.model.calls == 1, seconds=20, what="the first model call")
        # WHEN the host is killed while it holds the conversation, started again, and the
        # next message arrives
        assert running.host.pid is not None
        os.kill(running.host.pid, signal.SIGKILL)
        running.host.stop()
        running.host.start()
        killed_at = time.monotonic()
        assert running.post(personal(running, "second", conversation)).status_code == 200
        # THEN both are answered once the dead worker's hold expires (not the lease), in order
        wait_for(lambda: len(stored_users(running, conversation)) == 2, seconds=30,
                 what="both stored")
        waited = time.monotonic() - killed_at
        assert waited < 30, f"answered only after {waited:.0f} s"
        assert stored_users(running, conversation) == ["first", "second"]
        time.sleep(1.0)
        assert running.connector.streams.broken() == []


def test_a_kept_activity_naming_a_refused_service_url_gets_no_answer_and_no_token(
        queued: Bench, azurite_connection_string: str) -> None:
    # GIVEN an activity written straight into the inbox with a ticket on the queue, naming a
    # serviceUrl the webhook refuses (not on BOT_SERVICE_URL_HOSTS: localhost is not 127.0.0.1)
    evil = FakeConnector()
    queued.loop.run(evil.start())
    try:
        conversation = personal_chat()
        activity = personal(queued, "forged", conversation)
        activity["serviceUrl"] = evil.url.replace("127.0.0.1", "localhost")
        calls = queued.model.calls

        async def forge() -> None:
            inbox = Inbox.from_connection_string(
                azurite_connection_string, table_name=queued.host.env["CHAT_TABLE_NAME"],
                queue_name=queued.host.env["CHAT_TURN_QUEUE"])
            try:
                await inbox.accept(json.dumps(activity).encode(), conversation_id=conversation,
                                   activity_id=activity["id"])
                await inbox.enqueue(TurnTicket(conversation_id=conversation,
                                               activity_id=activity["id"],
                                               enqueued_at=time.time()))
                for _ in range(200):  # until the answer side dropped it
                    if await inbox.load(conversation, activity["id"]) is None:
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError("the forged activity was never handled")
            finally:
                await inbox.close()

        asyncio.run(forge())
        time.sleep(0.5)
        # THEN nothing was sent there (no token), no model call, nothing stored
        assert evil.requests == []
        assert queued.model.calls == calls and queued.history(conversation) == []
        assert "serviceUrl is not allowed for replies; dropped" in queued.host.log_text()
    finally:
        queued.loop.run(evil.stop())


@pytest.mark.parametrize("conversation", ["a:" + "x" * 1_100, "a:" + "会話" * 75],
                         ids=["1100-ascii", "150-cjk"])
def test_long_conversation_ids_are_answered_in_queue_mode(queued: Bench,
                                                          conversation: str) -> None:
    # WHEN a message with a long conversation ID arrives
    response = queued.post(personal(queued, "hello there", conversation))
    # THEN it is accepted (not a 400), answered and stored
    assert response.status_code == 200, response.text
    assert len(queued.replies(conversation)) == 1
    assert stored_users(queued, conversation) == ["hello there"]


def test_a_users_removal_covers_their_messages_in_flight(queued: Bench) -> None:
    # GIVEN a message being answered by a slow model and another waiting behind it
    conversation = personal_chat()
    user = f"29:{uuid.uuid4().hex}"
    sender = {"id": user, "name": "Ada"}
    queued.model.then(Scripted(content="an answer nobody keeps", delay=3.0))
    calls = queued.model.calls
    assert queued.post(personal(queued, "my card is 4242", conversation,
                                **{"from": sender})).status_code == 200
    wait_for(lambda: queued.model.calls == calls + 1, what="the model call")
    assert queued.post(personal(queued, "and my pin is 1234", conversation,
                                **{"from": sender})).status_code == 200
    # WHEN the operator removes the user while both are in flight
    removed = queued.http.delete(f"{queued.host.url}/api/users/{quote(user, safe='')}")
    assert removed.status_code == 200
    # THEN after the turn that was running ends, nothing of theirs is stored or exported
    time.sleep(4.5)
    assert queued.history(conversation) == []
    exported = queued.http.get(f"{queued.host.url}/api/users/{quote(user, safe='')}/messages")
    assert exported.json()["conversations"] == []
    assert queued.model.calls == calls + 1  # the waiting one was never asked
    # AND the running turn's "Thinking…" was ended, with no answer in it
    assert [r["text"] for r in queued.connector.messages(conversation)] == [WITHDRAWN]
    assert queued.connector.streams.broken(conversation) == []


def test_a_provider_error_quoting_the_prompt_never_reaches_the_hosts_log(
        azurite_connection_string: str) -> None:
    # GIVEN a provider whose errors quote the prompt, with capture off
    with bench(azurite_connection_string, answer_mode="queue",
               extra_env={"CHAT_MODEL_MAX_RETRIES": "0"}) as running:
        conversation = personal_chat()
        running.model.then(*[Scripted(status=500, error={
            "message": "upstream failed on: tell me about PROMPT-CANARY"}) for _ in range(5)])
        # WHEN a message fails every attempt through the queue
        assert running.post(personal(running, "tell me about PROMPT-CANARY",
                                     conversation)).status_code == 200
        running.replies(conversation, seconds=60)
        # THEN the host's log says what failed, without the provider's text
        log = running.host.log_text()
        assert "ModelUnavailable" in log and "PROMPT-CANARY" not in log
