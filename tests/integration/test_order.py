"""One conversation, one order, over a real queue (issue 26): arrival order, bursts as one turn,
`/reset` as a barrier, one stream per chat, a dead worker's hold, and the answer side's checks of
what it reads back. Azurite, the model and the contract-enforcing connector stand-in, and one or
two stand-ins of the Functions host's queue trigger (`halves.py`)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import traceback
from typing import Any

import pytest

from devtools.fake_channel import FakeConnector
from devtools.fake_model import FakeModelServer, Scripted
from shared.answer import APOLOGY, INTERRUPTED, RESET_DONE, WITHDRAWN, TurnFailed
from shared.bot import ChatBot
from shared.errors import ModelUnavailable
from shared.inbox import TurnTicket
from shared.removal import forget_user
from tests.integration.halves import Halves, eventually, halves, servers
from tests.integration.storage_faults import Gate, Match, StoragePolicy, failing

__all__ = ["servers"]  # the fixture

SLOW = 0.6  # seconds the model takes over an answer here


def users(history: list[Any]) -> list[str]:
    return [m.content for m in history if m.role == "user"]


def slow_model(model: FakeModelServer, seconds: float = SLOW) -> None:
    model.latency = seconds


async def post_all(running: Halves, conversation: str, texts: list[str], *, gaps: list[float],
                   worker: int | None = None) -> list[bytes]:
    bodies = []
    for index, (text, gap) in enumerate(zip(texts, [0.0, *gaps], strict=True)):
        await asyncio.sleep(gap)
        body = running.message(text, conversation)
        bodies.append(body)
        status, _ = await running.post(body, worker=index % len(running.workers)
                                       if worker is None else worker)
        assert status == 200
    return bodies


async def test_two_messages_close_together_are_stored_in_arrival_order_over_two_workers(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN two workers on one queue, and a model that takes a moment over each answer
    model, connector = servers
    slow_model(model, 0.3)
    rng = random.Random(26)
    async with halves(azurite_connection_string, table_name, model, connector,
                      workers=2) as running:
        # WHEN, ten times, "first" and "second" arrive 0.05 to 0.3 s apart (on either instance)
        conversations = [f"a:pair-{trial}" for trial in range(10)]
        await asyncio.gather(*(post_all(running, conversation, ["first", "second"],
                                        gaps=[rng.uniform(0.05, 0.3)])
                               for conversation in conversations))
        await running.settled()
        stored = {c: users(await running.store.list_messages(c)) for c in conversations}
    # THEN every conversation stored them in the order they came, each once
    assert all(texts == ["first", "second"] for texts in stored.values()), stored
    assert connector.streams.broken() == []


async def test_a_message_then_reset_is_answered_before_the_confirmation_and_then_forgotten(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a model that takes a moment
    model, connector = servers
    slow_model(model)
    rng = random.Random(7)
    async with halves(azurite_connection_string, table_name, model, connector,
                      workers=2) as running:
        # WHEN, ten times, "my secret is N" is followed 0.05 to 0.3 s later by /reset
        conversations = [f"a:reset-{trial}" for trial in range(10)]
        await asyncio.gather(*(post_all(running, conversation, [f"my secret is {i}", "/reset"],
                                        gaps=[rng.uniform(0.05, 0.3)])
                               for i, conversation in enumerate(conversations)))
        await running.settled()
        stored = {c: await running.store.list_messages(c) for c in conversations}
    # THEN the confirmation is the last thing each chat got, and nothing was stored after it
    for conversation in conversations:
        sent = running.user_texts(conversation)
        assert sent[-1] == RESET_DONE and sent.count(RESET_DONE) == 1, sent
        assert stored[conversation] == []
    assert connector.streams.broken() == []


async def test_a_burst_behind_a_running_answer_is_one_turn_with_one_stream_at_a_time(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a personal chat whose first message takes the model 2 s
    model, connector = servers
    model.then(Scripted(content="the first answer", delay=2.0))
    async with halves(azurite_connection_string, table_name, model, connector) as running:
        await running.post(running.message("one", "a:burst"))
        await eventually(lambda: model.calls == 1)
        # WHEN three more arrive 0.3 s apart while it works (one thought in several messages)
        await post_all(running, "a:burst", ["two", "three", "four"], gaps=[0.3, 0.3])
        await running.settled()
        history = await running.store.list_messages("a:burst")
    # THEN two model calls: the first, and one turn for the three that waited, which saw all
    # three after the first answer
    assert model.calls == 2
    last_request = [m["content"] for m in model.requests[-1]["messages"] if m["role"] == "user"]
    assert last_request[-3:] == ["two", "three", "four"]
    # AND each is stored as its own message with its own activity, in order, then one reply
    assert [(m.role, m.content) for m in history][:2] == [("user", "one"),
                                                          ("assistant", "the first answer")]
    assert [m.content for m in history[2:5]] == ["two", "three", "four"]
    assert len({m.activity_id for m in history[2:5]}) == 3
    assert [m.role for m in history] == ["user", "assistant", "user", "user", "user", "assistant"]
    # AND two replies, two streams one after the other, both ended, within Teams' pace
    assert len(connector.messages("a:burst")) == 2
    streams = connector.streams.of("a:burst")
    assert len(streams) == 2 and all(stream.finished for stream in streams)
    assert connector.streams.broken() == []


async def test_each_answers_a_burst_one_message_at_a_time_in_order(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN CHAT_BURST=each
    model, connector = servers
    model.then(Scripted(content="the first answer", delay=1.5))
    async with halves(azurite_connection_string, table_name, model, connector,
                      CHAT_BURST="each") as running:
        await running.post(running.message("one", "a:each"))
        await eventually(lambda: model.calls == 1)
        # WHEN three more arrive while it works
        await post_all(running, "a:each", ["two", "three", "four"], gaps=[0.2, 0.2])
        await running.settled()
        history = await running.store.list_messages("a:each")
    # THEN each got its own turn, in order
    assert model.calls == 4
    assert [m.content for m in history if m.role == "user"] == ["one", "two", "three", "four"]
    assert [m.role for m in history] == ["user", "assistant"] * 4
    assert connector.streams.broken() == []


async def test_a_retry_of_any_message_of_a_burst_is_answered_once(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a burst answered in one turn behind a slow first answer
    model, connector = servers
    model.then(Scripted(content="first", delay=1.5))
    async with halves(azurite_connection_string, table_name, model, connector) as running:
        await running.post(running.message("one", "a:again"))
        await eventually(lambda: model.calls == 1)
        bodies = await post_all(running, "a:again", ["two", "three"], gaps=[0.1])
        await running.settled()
        calls, replies = model.calls, len(connector.messages("a:again"))
        # WHEN the channel posts each message of the burst again
        for body in bodies:
            assert (await running.post(body))[0] == 200
        await running.settled()
    # THEN nothing more was asked or sent
    assert (calls, replies) == (2, 2)
    assert model.calls == calls and len(connector.messages("a:again")) == replies


async def test_a_worker_killed_while_holding_a_conversation_is_taken_over_after_the_hold(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN two workers, a hold of 5 s, and a model whose first answer takes 3 s
    model, connector = servers
    model.then(Scripted(content="never sent", delay=3.0))
    async with halves(azurite_connection_string, table_name, model, connector, workers=2,
                      CHAT_HOLD_SECONDS="5") as running:
        await running.post(running.message("first", "a:kill"))
        await eventually(lambda: model.calls == 1)
        busy = next(w for w in running.workers if w.host.busy)
        # WHEN the worker answering it dies mid-turn, and a second message arrives
        await busy.host.kill()
        alive = next(w for w in running.workers if w is not busy)
        await running.post(running.message("second", "a:kill"),
                           worker=running.workers.index(alive))
        await asyncio.sleep(1.0)
        waiting = users(await running.store.list_messages("a:kill"))
        await running.settled()
        history = users(await running.store.list_messages("a:kill"))
    # THEN nothing moved while the dead worker's hold lasted; after it, the other worker
    # answered both, in order (the first as a burst with the second, or before it)
    assert waiting == []
    assert history == ["first", "second"]
    assert connector.streams.broken() == []


async def test_two_messages_at_once_in_an_idle_personal_chat_open_one_stream(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN an idle personal chat, two workers, and a connector that takes a moment over each
    # request (as Teams does)
    model, connector = servers
    connector.latency = 0.1
    async with halves(azurite_connection_string, table_name, model, connector,
                      workers=2) as running:
        # WHEN two messages of the user arrive at the same moment, one at each instance
        bodies = [running.message(text, "a:twice") for text in ("first", "second")]
        posted = await asyncio.gather(*(running.post(body, worker=index)
                                        for index, body in enumerate(bodies)))
        await running.settled()
        history = users(await running.store.list_messages("a:twice"))
    # THEN both were answered, and only one of them opened the chat's stream: no request broke
    # Teams' rules (a second stream while one is open, two streaming requests in a second)
    assert [status for status, _ in posted] == [200, 200]
    assert sorted(history) == ["first", "second"]
    assert connector.streams.broken() == []
    assert len(connector.streams.of("a:twice")) >= 1


async def test_a_message_whose_accept_fails_leaves_no_stream_open(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a personal chat whose inbox fails its next transaction (the accept's)
    model, connector = servers
    policy = StoragePolicy()
    policy.fail_next.append(lambda method, url: method == "POST" and url.endswith("$batch"))
    async with halves(azurite_connection_string, table_name, model, connector,
                      policies=lambda slot, client: [policy] if client == "inbox" else []) \
            as running:
        # WHEN a message arrives (the webhook answers 503: nothing kept) and the channel sends it
        # again a moment later
        body = running.message("hello", "a:unkept")
        first, _ = await running.post(body)
        await asyncio.sleep(1.0)
        again, _ = await running.post(body)
        await running.settled()
    # THEN the second was answered, and no stream was left open (nor a second one begun)
    assert (first, again) == (503, 200)
    assert len(connector.messages("a:unkept")) == 1
    assert connector.streams.broken() == []


async def test_a_turn_whose_stream_start_is_not_kept_still_ends_its_stream(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a personal chat answering a slow first message, and an inbox that will fail the
    # write that keeps the start of the stream the second message's turn opens
    model, connector = servers
    model.then(Scripted(content="the first answer", delay=1.5),
               Scripted(content="the second answer"))
    policy = StoragePolicy()
    async with halves(azurite_connection_string, table_name, model, connector,
                      policies=lambda slot, client: [policy] if client == "inbox" else []) \
            as running:
        await running.post(running.message("one", "a:unkept"))
        await eventually(lambda: model.calls == 1)
        policy.fail_next.append(lambda method, url: method in ("PATCH", "MERGE")
                                and "RowKey='asecond'" in url)
        # WHEN a second message arrives behind it
        await running.post(running.message("two", "a:unkept", id="second"))
        await running.settled()
    # THEN the second turn ended the stream it opened, once, with its answer
    assert running.user_texts("a:unkept") == ["the first answer", "the second answer"]
    assert model.calls == 2
    assert connector.streams.broken() == []


async def test_a_failed_turn_whose_stream_start_is_not_kept_ends_its_stream_itself(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a personal chat answering a slow first message, an inbox that will fail the write
    # that keeps the start of the stream the second message's turn opens, and a model whose
    # answer to the second fails once
    model, connector = servers
    model.then(Scripted(content="the first answer", delay=1.5),
               Scripted(status=500, error={"message": "down"}),
               Scripted(content="the second answer"))
    policy = StoragePolicy()
    async with halves(azurite_connection_string, table_name, model, connector,
                      policies=lambda slot, client: [policy] if client == "inbox" else []) \
            as running:
        await running.post(running.message("one", "a:unkept-failed"))
        await eventually(lambda: model.calls == 1)
        policy.fail_next.append(lambda method, url: method in ("PATCH", "MERGE")
                                and "RowKey='asecond'" in url)
        # WHEN a second message arrives behind it, and its first attempt fails
        await running.post(running.message("two", "a:unkept-failed", id="second"))
        await running.settled(within=30)
    # THEN the failed attempt ended the stream it opened (no later attempt knew it), and the
    # retry answered
    assert model.calls == 3
    assert running.user_texts("a:unkept-failed") == [
        "the first answer", INTERRUPTED, "the second answer"]
    assert connector.streams.broken() == []


async def test_a_turn_given_up_on_the_attempt_that_opened_its_stream_ends_it_with_the_apology(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a personal chat answering a slow first message, a model that will fail the next
    # call, and turns given up after one attempt: the attempt that opens the stream of a message
    # waiting behind is its last
    model, connector = servers
    model.then(Scripted(content="the first answer", delay=1.5),
               Scripted(status=500, error={"message": "unavailable"}))

    def one_attempt(slot: int, bot: ChatBot) -> None:
        assert bot.answerer.conductor is not None
        bot.answerer.conductor.max_attempts = 1

    async with halves(azurite_connection_string, table_name, model, connector,
                      on_bot=one_attempt) as running:
        await running.post(running.message("one", "a:given-up"))
        await eventually(lambda: model.calls == 1)
        # WHEN a second message arrives behind it, and its turn opens its stream and fails
        await running.post(running.message("two", "a:given-up", id="second"))
        await running.settled()
    # THEN the apology ended that stream (it was kept with the message after the unit was
    # planned), once
    assert running.user_texts("a:given-up") == ["the first answer", APOLOGY]
    assert model.calls == 2
    assert connector.streams.broken() == []


async def test_a_last_attempt_whose_commit_answer_was_lost_sends_the_stored_reply_not_an_apology(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN turns given up after one attempt, and a store whose next commit is done but its
    # answer lost on the way back
    model, connector = servers
    model.then(Scripted(content="the answer"))
    store_rules: list[Match] = []

    def one_attempt(slot: int, bot: ChatBot) -> None:
        assert bot.answerer.conductor is not None
        bot.answerer.conductor.max_attempts = 1

    async with halves(azurite_connection_string, table_name, model, connector,
                      on_bot=one_attempt,
                      policies=failing(store_rules, clients=("store",), lose=True)) as running:
        store_rules.append(lambda method, url: method == "POST" and url.endswith("$batch"))
        # WHEN a message's only attempt fails that way
        await running.post(running.message("tell me", "a:lost-answer"))
        await running.settled()
        poisoned = await running.host.poisoned()
        history = await running.store.list_messages("a:lost-answer")
    # THEN the user got the stored answer, once, and no apology; nothing went to the poison queue
    assert store_rules == []  # (the commit's answer was lost)
    assert running.user_texts("a:lost-answer") == ["the answer"]
    assert [m.content for m in history] == ["tell me", "the answer"]
    assert model.calls == 1 and poisoned == []
    assert connector.streams.broken() == []


async def test_stream_requests_the_chat_refuses_still_keep_teams_pace(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a personal chat where Teams refuses new streams (one is open there: a crashed
    # worker's), and turns answered one message at a time
    model, connector = servers
    connector.streams.begin("a:refused", {
        "type": "typing", "text": "Thinking…", "conversation": {"conversationType": "personal"},
        "entities": [{"type": "streaminfo", "streamType": "informative", "streamSequence": 1}]})
    connector.streams._last_request.clear()  # (it was opened long ago)
    async with halves(azurite_connection_string, table_name, model, connector,
                      CHAT_BURST="each") as running:
        # WHEN three messages arrive together
        await post_all(running, "a:refused", ["one", "two", "three"], gaps=[0.05, 0.05])
        await running.settled()
    # THEN each was answered with a message, and the refused tries kept a second apart
    assert len(running.user_texts("a:refused")) == 3
    assert connector.streams.throttled == []


async def test_a_drain_that_fails_on_storage_lets_go_of_the_conversation_at_once(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a conversation whose inbox will fail once to forget its answered message (the
    # drain fails after the reply went out), with the default hold of 30 s
    model, connector = servers
    policy = StoragePolicy()
    policy.fail_next.append(lambda method, url: method == "DELETE" and "RowKey='afirst'" in url)
    async with halves(azurite_connection_string, table_name, model, connector,
                      policies=lambda slot, client: [policy] if client == "inbox" else []) \
            as running:
        await running.post(running.message("first", "a:slip", id="first"))
        # WHEN the queue retries the failed wake-up, and the user writes again
        await running.settled(within=10)
        await running.post(running.message("second", "a:slip"))
        await running.settled(within=10)
        history = users(await running.store.list_messages("a:slip"))
    # THEN both were answered within seconds (the failed drain did not keep its hold), once each
    assert history == ["first", "second"]
    assert model.calls == 2 and len(connector.messages("a:slip")) == 2


async def test_a_message_kept_but_not_queued_is_answered_when_the_channel_sends_it_again(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN an inbox whose queue will fail the next wake-up, and whose table will then fail to
    # let go of the message it kept (the webhook answers 503, the message stays kept)
    model, connector = servers
    rules = [lambda method, url: method == "POST" and "/messages" in url,
             lambda method, url: method == "DELETE" and "RowKey='aalone'" in url]
    async with halves(azurite_connection_string, table_name, model, connector,
                      policies=failing(rules, clients=("inbox", "queue"))) as running:
        body = running.message("hello", "a:alone", id="alone")
        # WHEN the message arrives, and the channel sends it again after the 503
        first, _ = await running.post(body)
        again, _ = await running.post(body)
        await running.settled(within=10)
    # THEN it was answered (nothing else would have woken the conversation)
    assert (first, again) == (503, 200)
    assert len(connector.messages("a:alone")) == 1


async def test_a_wake_up_whose_message_was_answered_still_drains_what_waits_behind_it(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a first message answered slowly, a second behind it whose turn fails once, and a
    # queue that will fail the wake-up the drain queues for the second's retry
    model, connector = servers
    model.then(Scripted(content="the first answer", delay=1.0),
               Scripted(status=500, error={"message": "down"}),
               Scripted(content="the second answer"))
    rules: list[Match] = []
    async with halves(azurite_connection_string, table_name, model, connector,
                      policies=failing(rules, clients=("queue",))) as running:
        await running.post(running.message("one", "a:behind"))
        await eventually(lambda: model.calls == 1)
        await running.post(running.message("two", "a:behind"))
        rules.append(lambda method, url: method == "POST" and "/messages" in url
                     and "visibilitytimeout=1" in url)
        # WHEN the drain lets go after the failed turn and cannot queue its wake-up (the queue
        # retries the wake-up it was running, whose own message is answered)
        await running.settled(within=10)
        history = users(await running.store.list_messages("a:behind"))
    # THEN the second was answered at once all the same
    assert history == ["one", "two"]
    assert running.user_texts("a:behind") == ["the first answer", "the second answer"]


async def test_a_burst_behind_a_committed_then_cleared_message_is_answered(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a message answered by a worker that dies before it forgets the message (its hold
    # of 5 s left behind), and the conversation then cleared by its operator
    model, connector = servers
    policy = StoragePolicy()
    forgetting = Gate(lambda method, url: method == "DELETE" and "RowKey='afirst'" in url)
    policy.gates.append(forgetting)
    async with halves(azurite_connection_string, table_name, model, connector,
                      CHAT_HOLD_SECONDS="5",
                      policies=lambda slot, client: [policy] if client == "inbox" else []) \
            as running:
        await running.post(running.message("first", "c:cleared", id="first"))
        await asyncio.wait_for(forgetting.reached.wait(), 10)
        await running.restart(0)
        await running.store.clear("c:cleared")
        # WHEN two more messages arrive while the dead worker's hold lasts (one burst with the
        # first, which is found committed)
        await post_all(running, "c:cleared", ["second", "third"], gaps=[0.05])
        await running.settled(within=20)
        history = users(await running.store.list_messages("c:cleared"))
    # THEN the two were answered together, and the first not again
    assert history == ["second", "third"]
    assert model.calls == 2 and len(connector.messages("c:cleared")) == 2


async def test_a_streamed_turn_retried_after_an_unrecorded_failure_only_ends_its_stream(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a personal chat whose answer streams for a few seconds, a store that will fail the
    # turn's commit, and an inbox that will fail to count the failed attempt
    model, connector = servers
    model.word_interval = 0.1
    model.then(Scripted(content=" ".join(f"w{i}" for i in range(30))))
    store_rules: list[Match] = []
    inbox_rules: list[Match] = []
    async with halves(azurite_connection_string, table_name, model, connector,
                      policies=lambda slot, client: [
                          *failing(store_rules, clients=("store",))(slot, client),
                          *failing(inbox_rules, clients=("inbox",))(slot, client)]) as running:
        store_rules.append(lambda method, url: method == "POST" and url.endswith("$batch"))
        # WHEN a message arrives, its turn streams and fails to commit, and the retry answers
        await running.post(running.message("tell me", "a:again", id="again"))
        inbox_rules.append(lambda method, url: method in ("PATCH", "MERGE")
                           and "RowKey='aagain'" in url)
        await running.settled(within=30)
    # THEN the stream the user saw was ended once, with the answer, and no request repeated a
    # stream's sequence number
    assert len(connector.messages("a:again")) == 1
    assert connector.streams.broken() == []


async def test_a_worker_taking_over_after_a_failed_drain_keeps_teams_pace(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a streamed answer whose drain then fails (the inbox fails to forget the message)
    model, connector = servers
    rules: list[Match] = []
    async with halves(azurite_connection_string, table_name, model, connector,
                      policies=failing(rules, clients=("inbox",))) as running:
        rules.append(lambda method, url: method == "DELETE" and "RowKey='afirst'" in url)
        await running.post(running.message("first", "a:pace", id="first"))

        async def let_go() -> bool:
            head = await running.inbox.read_head("a:pace")
            return head is not None and bool(head.holder) and head.held_until == 0.0

        for _ in range(200):
            if await let_go():
                break
            await asyncio.sleep(0.02)
        # WHEN another worker (knowing nothing of that stream) answers the next message at once
        await running.restart(0)
        await running.post(running.message("second", "a:pace"))
        await running.settled()
    # THEN its stream kept a second after the first one's last request
    assert len(connector.messages("a:pace")) == 2
    assert connector.streams.broken() == []


async def test_a_kept_activity_with_a_refused_service_url_is_dropped_unanswered(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN an activity written straight into the inbox, with a ticket, naming a serviceUrl the
    # webhook would refuse (auth off: loopback only)
    model, connector = servers
    async with halves(azurite_connection_string, table_name, model, connector) as running:
        body = json.loads(running.message("forged", "a:forged"))
        body["serviceUrl"] = "https://evil.example.com/"
        await running.inbox.accept(json.dumps(body).encode(), conversation_id="a:forged",
                                   activity_id=body["id"])
        await running.inbox.enqueue(TurnTicket(conversation_id="a:forged", activity_id=body["id"],
                                               enqueued_at=0.0))
        await running.settled()
        stored = await running.store.list_messages("a:forged")
    # THEN it was not answered: no model call, nothing stored, nothing sent
    assert model.calls == 0 and stored == [] and connector.messages("a:forged") == []


@pytest.mark.parametrize("conversation_id", ["a:" + "x" * 1_100, "a:" + "会話" * 75],
                         ids=["1100-ascii", "150-cjk"])
async def test_long_conversation_ids_are_answered_through_the_queue(
        azurite_connection_string: str, table_name: str, conversation_id: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    model, connector = servers
    async with halves(azurite_connection_string, table_name, model, connector) as running:
        # WHEN a message with a long conversation ID arrives
        status, _ = await running.post(running.message("hello", conversation_id))
        await running.settled()
        stored = users(await running.store.list_messages(conversation_id))
    # THEN it is kept, answered and stored like any other
    assert status == 200 and stored == ["hello"]
    assert len(connector.messages(conversation_id)) == 1


async def test_a_users_removal_covers_their_message_in_flight(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a message being answered by a slow model, and another waiting behind it
    model, connector = servers
    model.then(Scripted(content="an answer nobody keeps", delay=2.0))
    async with halves(azurite_connection_string, table_name, model, connector) as running:
        await running.post(running.message("remember my card 4242", "a:gone"))
        await eventually(lambda: model.calls == 1)
        await running.post(running.message("and my pin 1234", "a:gone"))
        # WHEN the user asks to be forgotten while both are in flight
        await forget_user(running.store, running.inbox, "29:u")
        await running.settled()
        stored = await running.store.list_messages("a:gone")
        export = await running.store.export_user("29:u")
        kept = await running.kept()
    # THEN nothing of theirs was stored after the removal returned, nor kept, nor asked again
    assert stored == [] and export.conversations == () and kept == []
    assert model.calls == 1


async def test_a_users_removal_ends_the_stream_of_their_waiting_message(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a message that went first in a personal chat (its stream shows "Thinking…") and
    # waits: no worker has taken it yet
    model, connector = servers
    async with halves(azurite_connection_string, table_name, model, connector) as running:
        await running.host.kill()
        await running.post(running.message("remember my card 4242", "a:waiting"))
        assert connector.streams.open("a:waiting")
        # WHEN the user asks to be forgotten, and then a worker takes the conversation
        await forget_user(running.store, running.inbox, "29:u")
        kept_text = [body for body in [await running.inbox.load("a:waiting", key)
                                       for _, key in await running.kept()] if body]
        await running.restart(0)
        await running.settled()
        stored = await running.store.list_messages("a:waiting")
        kept = await running.kept()
    # THEN no text of theirs was kept after the removal, nothing was asked or stored, and the
    # stream ended saying why
    assert kept_text == [] and kept == [] and stored == [] and model.calls == 0
    assert running.user_texts("a:waiting") == [WITHDRAWN]
    assert connector.streams.broken() == []


async def test_a_users_removal_between_the_plan_and_the_read_still_ends_the_stream(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a message that went first in a personal chat (its stream shows "Thinking…"), and a
    # worker that listed it for its turn and is reading its body
    model, connector = servers
    policy = StoragePolicy()
    reading = Gate(lambda method, url: method == "GET" and "RowKey='afirst'" in url
                   and "select" not in url)
    policy.gates.append(reading)
    async with halves(azurite_connection_string, table_name, model, connector,
                      policies=lambda slot, client: [policy] if client == "inbox" else []) \
            as running:
        await running.post(running.message("remember my card 4242", "a:between", id="first"))
        await asyncio.wait_for(reading.reached.wait(), 10)
        # WHEN the user asks to be forgotten meanwhile, and the read goes on
        await forget_user(running.store, running.inbox, "29:u")
        reading.release()
        await running.settled()
        stored = await running.store.list_messages("a:between")
    # THEN nothing was asked or stored, and the stream ended saying why
    assert stored == [] and model.calls == 0
    assert running.user_texts("a:between") == [WITHDRAWN]
    assert connector.streams.broken() == []


async def test_no_provider_error_text_leaves_with_the_queue_triggers_exception(
        azurite_connection_string: str, table_name: str, caplog: pytest.LogCaptureFixture,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a provider whose error text quotes the prompt, and a wake-up that fails with it
    model, connector = servers
    model.then(*[Scripted(status=500, error={"message": "you said SECRET-PROMPT"})] * 5)
    caplog.set_level(logging.INFO)
    async with halves(azurite_connection_string, table_name, model, connector,
                      CHAT_STREAMING="off") as running:
        await running.post(running.message("SECRET-PROMPT", "a:quiet"))
        await running.settled()
        answerer = running.bot.answerer
        assert answerer.conductor is not None

        async def failing(ticket: TurnTicket) -> None:
            raise ModelUnavailable("the model answered 500: you said SECRET-PROMPT")

        answerer.conductor.wake = failing  # type: ignore[method-assign]
        ticket = TurnTicket(conversation_id="a:quiet", activity_id="x", enqueued_at=0.0)
        # WHEN the queue trigger's core runs it
        with pytest.raises(TurnFailed) as raised:
            await answerer.answer_ticket(ticket.to_json())
    # THEN what leaves carries the kind of failure only, with no chained text
    text = "".join(traceback.format_exception(raised.value))
    assert "SECRET" not in text and "ModelUnavailable" in text
    assert raised.value.__context__ is None and raised.value.__cause__ is None
    # AND no log line quoted the provider's text (capture is off)
    assert not [r for r in caplog.records if "SECRET" in r.getMessage()]
