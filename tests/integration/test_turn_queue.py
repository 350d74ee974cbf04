"""The two halves over a real queue: the webhook accepts in milliseconds, the answer function
answers once. Azurite's table and queue services, a local model, the contract-enforcing Bot
Connector stand-in, and a stand-in of the Functions host's queue trigger (tests/integration/
queue_host.py) with host.json's dequeue limit."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.data.tables.aio import TableClient

from devtools.fake_channel import FakeConnector
from devtools.fake_model import FakeModelServer, Scripted, default_reply
from shared.answer import APOLOGY
from shared.errors import StorageUnavailable
from shared.inbox import Inbox, Place, TurnTicket, inbox_table_name
from shared.summary import SUMMARY_INSTRUCTIONS
from tests.integration.halves import MAX_DEQUEUE, eventually, halves, servers
from tests.integration.queue_host import queue_client
from tests.integration.storage_faults import StoragePolicy

__all__ = ["servers"]  # the fixture


async def test_a_message_is_answered_200_while_the_model_is_still_working(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a model that takes 2 s over its first answer
    model, connector = servers
    model.then(Scripted(content="first answer", delay=2.0))
    async with halves(azurite_connection_string, table_name, model, connector) as running:
        # WHEN a message arrives, and a second one while the model works on the first
        first = await running.post(running.message("one", "a:busy"))
        await eventually(lambda: model.calls == 1)
        second = await running.post(running.message("two", "a:busy"))
        # THEN both were answered 200 at once, before any reply went out
        assert first[0] == second[0] == 200
        assert first[1] < 1.0 and second[1] < 1.0
        assert connector.messages("a:busy") == []
        # AND then both replies arrive, in order, each stored once
        await running.settled()
        stored = [m.content for m in await running.store.list_messages("a:busy")]
    assert [m["text"] for m in connector.messages("a:busy")] == [
        "first answer", "reply to 'two' after 3 messages"]
    assert stored == ["one", "first answer", "two", "reply to 'two' after 3 messages"]
    assert connector.streams.violations == []


async def test_a_long_turn_is_delivered_once_and_stored_once_though_the_channel_retries(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a model whose turn takes 4 s, and a channel that retries a POST unanswered for 1.5 s
    # (a 40 s turn against the 15 s Bot Service timeout, at a tenth of the time)
    model, connector = servers
    model.then(Scripted(content="a considered answer", delay=4.0))
    async with halves(azurite_connection_string, table_name, model, connector) as running:
        body = running.message("think hard", "a:long")
        # WHEN the message arrives, and the channel sends it again at 1.5 s and 3 s anyway
        statuses = []
        for _ in range(3):
            status, seconds = await running.post(body)
            statuses.append(status)
            assert seconds < 1.5  # never long enough for the channel to time out
            await asyncio.sleep(1.5)
        await running.settled()
        stored = [m.content for m in await running.store.list_messages("a:long")]
    # THEN every POST got 200, the model was asked once, one reply went out, one turn was stored
    assert statuses == [200, 200, 200] and model.calls == 1
    assert [m["text"] for m in connector.messages("a:long")] == ["a considered answer"]
    assert stored == ["think hard", "a considered answer"]
    # AND the stream the webhook opened ended with the answer, by the contract
    (stream,) = connector.streams.of("a:long")
    assert stream.finished and connector.streams.violations == []
    assert stream.updates[0]["text"] == "Thinking…"


async def test_a_redelivered_queue_message_does_not_answer_twice(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a message answered from the queue
    model, connector = servers
    async with halves(azurite_connection_string, table_name, model, connector) as running:
        body = running.message("once", "a:again")
        await running.post(body)
        await running.settled()
        # WHEN the queue delivers its ticket again (at least once), with the accepted copy kept
        # (a crash between the delivery and the clean-up) and without it
        activity_id = json.loads(body)["id"]
        await running.inbox.accept(body, conversation_id="a:again", activity_id=activity_id)
        again = TurnTicket(conversation_id="a:again", activity_id=activity_id,
                           enqueued_at=time.time())
        await running.inbox.enqueue(again)
        await running.settled()
        await running.inbox.enqueue(again)
        await running.settled()
        # THEN there was one model call and one reply, and the kept copy is gone
        assert model.calls == 1 and len(connector.messages("a:again")) == 1
        assert await running.inbox.load("a:again", activity_id) is None
        assert running.host.failures == 0


async def test_a_turn_committed_but_not_delivered_is_sent_again_without_a_model_call(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a channel that refuses the first reply (5xx) of a non-streamed chat
    model, connector = servers
    async with halves(azurite_connection_string, table_name, model, connector,
                      CHAT_STREAMING="off") as running:
        connector.statuses.extend([201, 503])  # the typing indicator passes, the reply fails
        # WHEN a message is answered: the turn commits, the reply fails, the queue retries
        await running.post(running.message("deliver me", "a:resend"))
        await running.settled()
    # THEN the retry re-sent the stored reply: one model call, one reply, marked delivered
    assert running.host.failures == 0 and model.calls == 1
    assert [m["text"] for m in connector.messages("a:resend")] == [
        "reply to 'deliver me' after 1 messages"]


async def test_a_message_that_always_fails_ends_in_one_apology_and_the_poison_queue(
        azurite_connection_string: str, table_name: str, caplog: pytest.LogCaptureFixture,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a model that always fails
    model, connector = servers
    model.then(*[Scripted(status=500, error={"message": "down"}) for _ in range(MAX_DEQUEUE)])
    caplog.set_level(logging.INFO)
    async with halves(azurite_connection_string, table_name, model, connector,
                      CHAT_STREAMING="off") as running:
        # WHEN a message arrives
        body = running.message("doomed", "a:poison")
        assert (await running.post(body))[0] == 200
        await running.settled()
        poisoned = await running.host.poisoned()
        stored = await running.store.list_messages("a:poison")
        kept = await running.kept()
    # THEN it was tried maxDequeueCount times, the user got one apology, and a text-free record
    # of it is in the poison queue (the queue message itself did not fail: the drain retries)
    assert model.calls == MAX_DEQUEUE and running.host.failures == 0
    assert [m["text"] for m in connector.messages("a:poison")] == [APOLOGY]
    assert [TurnTicket.from_json(p).activity_id for p in poisoned] == [json.loads(body)["id"]]
    assert all(b"doomed" not in p for p in poisoned)
    # AND nothing was stored or kept, and the log says why
    assert stored == [] and kept == []
    last = [r.getMessage() for r in caplog.records if "last attempt" in r.getMessage()]
    assert len(last) == 1 and "poison queue" in last[0] and "Model" in last[0]


async def test_a_given_up_message_is_apologised_for_once_when_storage_fails_after_the_apology(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a model that always fails, and an inbox that will fail to delete the message's row
    # once (after the apology went out)
    model, connector = servers
    model.then(*[Scripted(status=500, error={"message": "down"}) for _ in range(2 * MAX_DEQUEUE)])
    policy = StoragePolicy()
    policy.fail_next.append(lambda method, url: method == "DELETE" and "RowKey='adoomed'" in url)
    async with halves(azurite_connection_string, table_name, model, connector,
                      CHAT_STREAMING="off",
                      policies=lambda slot, client: [policy] if client == "inbox" else []) \
            as running:
        # WHEN a message arrives
        assert (await running.post(running.message("hello", "a:twice", id="doomed")))[0] == 200
        await running.settled()
        poisoned = await running.host.poisoned()
        kept = await running.kept()
    # THEN the model was tried maxDequeueCount times, not again, and the user got one apology
    assert model.calls == MAX_DEQUEUE
    assert running.user_texts("a:twice") == [APOLOGY]
    # AND the message is gone, its text-free record in the poison queue
    assert kept == [] and poisoned
    assert {TurnTicket.from_json(p).activity_id for p in poisoned} == {"doomed"}


async def test_a_given_up_burst_is_marked_all_at_once(
        azurite_connection_string: str, table_name: str) -> None:
    # GIVEN three kept messages of one burst, and an inbox table that will fail the write that
    # marks the second given up (or the one that marks them all)
    policy = StoragePolicy()
    inbox = Inbox(table=TableClient.from_connection_string(
                      azurite_connection_string, table_name=inbox_table_name(table_name),
                      per_call_policies=[policy]),
                  queue=queue_client(azurite_connection_string, f"q{uuid.uuid4().hex[:12]}"))
    try:
        for activity_id in ("m1", "m2", "m3"):
            await inbox.accept(b'{"type": "message"}', conversation_id="a:g",
                               activity_id=activity_id)
        policy.fail_next.append(lambda method, url: (method == "POST" and url.endswith("$batch"))
                                or (method in ("PATCH", "MERGE") and "RowKey='am2'" in url))
        # WHEN they are marked given up, and the write fails
        with pytest.raises(StorageUnavailable):
            await inbox.mark_given_up("a:g", ["m1", "m2", "m3"])
        after_failure = [kept.given_up for kept in await inbox.waiting("a:g")]
        await inbox.mark_given_up("a:g", ["m1", "m2", "m3"])
        after_retry = [kept.given_up for kept in await inbox.waiting("a:g")]
    finally:
        await inbox.close()
    # THEN none was marked by the failed write (a drain meeting them again retries the unit
    # whole, never half of it as new), and all by the next
    assert after_failure == [False, False, False]
    assert after_retry == [True, True, True]


async def test_an_activity_over_64_kib_goes_through(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a Teams message whose activity is 200 KB (an adaptive card's worth of channel data)
    model, connector = servers
    async with halves(azurite_connection_string, table_name, model, connector) as running:
        body = running.message("with a big card", "a:big", channelData={
            "card": [uuid.uuid4().hex for _ in range(6_000)]})
        assert len(body) > 150_000
        # WHEN it arrives
        status, _ = await running.post(body)
        await running.settled()
    # THEN it is answered and stored like any other
    assert status == 200
    assert [m["text"] for m in connector.messages("a:big")] == [
        "reply to 'with a big card' after 1 messages"]


async def test_a_retry_of_an_accepted_activity_is_dropped_by_the_webhook(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN an accepted message
    model, connector = servers
    async with halves(azurite_connection_string, table_name, model, connector) as running:
        body = running.message("hello", "c:group")
        await running.settled()
        # WHEN the channel posts it twice before it is answered
        statuses = [(await running.post(body))[0] for _ in range(2)]
        properties = await running.inbox.queue.get_queue_properties()
        # THEN both got 200, the second kept nothing more (its wake-up, queued in case the first
        # was kept but not queued, finds the conversation answered or being answered)
        assert statuses == [200, 200]
        assert properties.approximate_message_count <= 2
        await running.settled()
    # AND it was answered once
    assert model.calls == 1 and len(connector.messages("c:group")) == 1


async def test_a_retry_of_an_answered_activity_opens_no_stream_and_queues_nothing(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a message in a personal chat, answered from the queue
    model, connector = servers
    async with halves(azurite_connection_string, table_name, model, connector) as running:
        body = running.message("answered", "a:late")
        await running.post(body)
        await running.settled()
        handled = running.host.handled
        # WHEN the channel posts it again, after the answer (a Teams redelivery)
        status, _ = await running.post(body)
        await running.settled()
        # THEN 200, no second "Thinking…" and no ticket: one stream, one reply, one model call
        assert status == 200 and running.host.handled == handled
        assert len(connector.streams.of("a:late")) == 1
        assert len(connector.messages("a:late")) == 1 and model.calls == 1
        assert await running.inbox.load("a:late", json.loads(body)["id"]) is None


@pytest.fixture
async def inbox(azurite_connection_string: str, table_name: str) -> AsyncIterator[Inbox]:
    """An inbox on its own queue, closed after the test."""
    made = Inbox.from_connection_string(azurite_connection_string, table_name=table_name,
                                        queue_name=f"q{uuid.uuid4().hex[:12]}")
    yield made
    await made.close()


async def accept(inbox: Inbox, conversation_id: str, activity_id: str) -> Place | None:
    return await inbox.accept(b'{"type": "message"}', conversation_id=conversation_id,
                              activity_id=activity_id)


async def test_retention_purges_kept_activities_older_than_the_cutoff(inbox: Inbox) -> None:
    # GIVEN two kept activities (their tickets went to the poison queue, say)
    for activity_id in ("old-1", "old-2"):
        assert await accept(inbox, "a:left", activity_id)
    # WHEN rows older than a minute ago are purged, then rows older than a minute ahead
    none = await inbox.purge_before(datetime.now(UTC) - timedelta(minutes=1))
    both = await inbox.purge_before(datetime.now(UTC) + timedelta(minutes=1))
    # THEN the first purge keeps them, the second removes both, with the marks that they were
    # accepted (so the channel could send one again, a week later, as new)
    assert (none, both) == (0, 4)
    assert await inbox.load("a:left", "old-1") is None
    assert await accept(inbox, "a:left", "old-1")


async def test_a_retry_that_arrives_after_its_answer_is_not_accepted_again(inbox: Inbox) -> None:
    # GIVEN an activity accepted and answered (its kept row removed), and another accepted but
    # let go because its wake-up could not be queued
    for activity_id in ("answered", "let-go"):
        assert await accept(inbox, "a:slow", activity_id)
    await inbox.remove("a:slow", ["answered"])
    await inbox.remove("a:slow", ["let-go"], unseen=True)
    # WHEN the channel's retries of both arrive (one slow on its way)
    late = await accept(inbox, "a:slow", "answered")
    again = await accept(inbox, "a:slow", "let-go")
    # THEN the answered one is refused as a retry (not answered twice, even after a clear of the
    # conversation's history), and the one let go takes a new place
    assert late is None
    assert again is not None and again.seq == 3
    assert [kept.activity_id for kept in await inbox.waiting("a:slow")] == ["let-go"]


async def test_the_summary_work_runs_in_the_answer_function_after_the_reply(
        azurite_connection_string: str, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN summaries on and a window of 4 messages, so a summary falls due after a few turns
    model, connector = servers
    seen: list[tuple[int, int]] = []
    async with halves(azurite_connection_string, table_name, model, connector,
                      CHAT_SUMMARY="on", CHAT_HISTORY_MAX_MESSAGES="4") as running:
        def reply(body: dict[str, Any]) -> str:
            if str(body["messages"][0]["content"]).startswith(SUMMARY_INSTRUCTIONS[:40]):
                seen.append((len(connector.messages("a:sum")), running.host.handled))
                return "They are counting."
            return default_reply(body)

        model.reply = reply
        # WHEN messages are answered from the queue, one after the other, until one needs it
        posted = 0
        while not seen and posted < 10:
            await running.post(running.message(f"count {posted}", "a:sum"))
            posted += 1
            await running.settled()
    # THEN the summary call came after that turn's reply was delivered, and while its queue
    # message was still being handled (in the answer function, before it completed)
    assert seen and set(seen) == {(posted, posted - 1)}
