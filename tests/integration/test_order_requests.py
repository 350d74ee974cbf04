"""What a message costs in storage requests through the conversation's order (issue 26): counted at
the HTTP layer by a proxy in front of Azurite (devtools/storage_counter.py), the figures
`make bench`'s `order` section measures. The webhook reads the order head and the turn's marker,
keeps the message in one transaction and queues one ticket; the drain of a lone message reads the
order head once and lists the conversation's rows once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from devtools.fake_channel import FakeConnector
from devtools.fake_model import FakeModelServer
from devtools.storage_counter import Seen, StorageCounter
from shared.inbox import ORDER_ROW, inbox_table_name
from tests.integration.halves import eventually, halves, servers

__all__ = ["servers"]  # the fixture


@pytest.fixture
async def counter(azurite_connection_string: str) -> AsyncIterator[StorageCounter]:
    proxy = StorageCounter(azurite_connection_string)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def quiet(counter: StorageCounter, *, seconds: float = 0.5) -> None:
    """Until storage has seen no work (idle polls aside) for `seconds`."""
    for _ in range(200):
        if time.perf_counter() - counter.last_work >= seconds:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("storage never went quiet")


def table_requests(seen: list[Seen], table: str) -> list[tuple[str, str]]:
    """(kind, the row, or "query", or "insert") of each request to `table` (a transaction names
    no table in its path: those are `batches`)."""
    found = []
    for request in seen:
        resource = request.path.rsplit("/", 1)[-1]
        if request.service != "table" or not (resource == table or resource.startswith(f"{table}(")):
            continue
        if "RowKey='" in resource:
            found.append((request.kind, resource.split("RowKey='", 1)[1].removesuffix("')")))
        else:
            found.append((request.kind, "query" if request.kind == "query" else "insert"))
    return found


def batches(seen: list[Seen]) -> int:
    return sum(1 for request in seen if request.kind == "batch")


async def test_the_webhook_keeps_a_message_with_one_read_of_the_order_head(
        counter: StorageCounter, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN the two halves through the counting proxy, nothing answering, a conversation that
    # has one message kept already
    model, connector = servers
    async with halves(counter.connection_string, table_name, model, connector) as running:
        await running.host.kill()
        assert (await running.post(running.message("one", "a:cost")))[0] == 200
        before = len(counter.seen)
        # WHEN the next message is posted
        status, _ = await running.post(running.message("two", "a:cost"))
        seen = counter.seen[before:]
    # THEN the webhook read the order head (not the message's row) and the turn's marker, kept
    # the message in one transaction and queued one ticket: nothing else
    assert status == 200
    assert table_requests(seen, inbox_table_name(table_name)) == [("read", ORDER_ROW)]
    assert [kind for kind, _ in table_requests(seen, table_name)] == ["read"]
    assert batches(seen) == 1
    assert [r.kind for r in seen if r.service == "queue"] == ["put"]


async def test_a_retry_of_a_kept_message_opens_no_stream_and_takes_no_second_place(
        counter: StorageCounter, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a personal chat whose message is kept and not answered yet (nothing answering)
    model, connector = servers
    async with halves(counter.connection_string, table_name, model, connector) as running:
        await running.host.kill()
        body = running.message("hello", "a:retried")
        assert (await running.post(body))[0] == 200
        # WHEN the channel posts it again
        status, _ = await running.post(body)
        head = await running.inbox.read_head("a:retried")
        kept = await running.inbox.waiting("a:retried")
        queued = (await running.inbox.queue.get_queue_properties()).approximate_message_count
    # THEN 200, the first POST's one stream, one place in the order; and a wake-up queued again
    # beside the first POST's ticket (the first delivery may have been kept but not queued: a
    # wake-up that finds its conversation answered or held costs one read)
    assert status == 200
    assert len(connector.streams.of("a:retried")) == 1
    assert head is not None and head.last_seq == 1
    assert [k.activity_id for k in kept] == [json.loads(body)["id"]]
    assert queued == 2


async def test_a_lone_message_is_drained_with_one_read_of_the_order_head_and_one_listing(
        counter: StorageCounter, table_name: str,
        servers: tuple[FakeModelServer, FakeConnector]) -> None:
    # GIVEN a conversation answered once already, storage quiet
    model, connector = servers
    async with halves(counter.connection_string, table_name, model, connector) as running:
        assert (await running.post(running.message("one", "a:drained")))[0] == 200
        await eventually(lambda: len(connector.messages("a:drained")) == 1)
        await quiet(counter)
        # WHEN the next message is posted and answered
        assert (await running.post(running.message("two", "a:drained")))[0] == 200
        accepted = len(counter.seen)
        await eventually(lambda: len(connector.messages("a:drained")) == 2)
        await quiet(counter, seconds=1.5)
        seen = counter.seen[accepted:]
    # THEN the answer read the order head once (the wake-up's look; once more when the drain began
    # before the webhook had recorded the message's stream, which the drain waits for), listed
    # the conversation's rows once, took and let go the hold (two writes of the head)
    inbox = table_requests(seen, inbox_table_name(table_name))
    assert inbox.count(("read", ORDER_ROW)) <= 2, [(k, r[:8]) for k, r in inbox]
    assert inbox.count(("query", "query")) == 1, inbox
    assert inbox.count(("write", ORDER_ROW)) == 2, inbox
    assert connector.streams.broken() == []
