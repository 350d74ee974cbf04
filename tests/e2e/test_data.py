"""Retention, a user's data on request and spend limits, end to end: the app through the dev host
over real HTTP, on Azurite, the retention timer run through the admin API."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from shared.keys import encode_key
from shared.limits import LIMIT_REPLIES
from shared.store import REMOVED_MARKER
from tests.e2e.channel import Bench, bench


def user(name: str) -> dict[str, str]:
    """A Teams user of their own: channel ID, display name, Entra object ID."""
    return {"id": f"29:{name.lower()}-{uuid.uuid4().hex[:8]}", "name": name,
            "aadObjectId": str(uuid.uuid4())}


ADA = user("Ada")
GROUP = {"conversationType": "groupChat", "isGroup": True, "tenantId": "tenant-1"}


@pytest.fixture(scope="module")
def channel(azurite_connection_string: str) -> Iterator[Bench]:
    with bench(azurite_connection_string, extra_env={
            "CHAT_RETENTION_DAYS": "30", "CHAT_MAX_TURNS_PER_MINUTE": "3"}) as running:
        yield running


def say(channel: Bench, text: str, *, conversation_id: str, sender: dict[str, Any],
        group: bool = False) -> None:
    activity = channel.message(text, conversation_id=conversation_id, **{"from": sender})
    if group:
        activity["conversation"] = {**GROUP, "id": conversation_id}
    assert channel.post(activity).status_code == 200


def wait_for(check: Callable[[], bool], *, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


def table_edit(channel: Bench, edit: Callable[[TableClient], Any]) -> None:
    async def run() -> None:
        async with TableClient.from_connection_string(
                channel.host.env["CHAT_STORAGE_CONNECTION_STRING"],
                table_name=channel.host.env["CHAT_TABLE_NAME"]) as table:
            await edit(table)

    asyncio.run(run())


def make_idle_since_2020(channel: Bench, conversation_id: str) -> None:
    """Make a conversation look last active on 2020-01-01, as if it had not spoken since."""
    pk = encode_key(conversation_id)

    async def edit(table: TableClient) -> None:
        async for row in table.query_entities("RowKey eq @pk", parameters={"pk": pk}):
            if row["PartitionKey"].startswith("~idx-day-"):
                await table.delete_entity(row["PartitionKey"], pk)
        await table.update_entity({"PartitionKey": pk, "RowKey": "h", "day": "2020-01-01"},
                                  mode=UpdateMode.MERGE)
        await table.upsert_entity({"PartitionKey": "~idx-day-2020-01-01", "RowKey": pk,
                                   "conversation_id": conversation_id})

    table_edit(channel, edit)


def test_the_retention_timer_purges_idle_conversations_and_keeps_active_ones(channel: Bench) -> None:
    # GIVEN a conversation idle since 2020 and one active today
    idle, active = f"a:{uuid.uuid4().hex}", f"a:{uuid.uuid4().hex}"
    say(channel, "old times", conversation_id=idle, sender=ADA)
    say(channel, "new times", conversation_id=active, sender=ADA)
    make_idle_since_2020(channel, idle)
    # WHEN the retention timer is run through the admin API (CHAT_RETENTION_DAYS=30)
    response = channel.http.post(f"{channel.host.url}/admin/functions/retention", json={"input": ""})
    # THEN it is accepted, runs, and the idle conversation is gone while the active one stays
    assert response.status_code == 202
    wait_for(lambda: "Executed 'Functions.retention' (Succeeded" in channel.host.log_text())
    assert channel.history(idle) == []
    assert channel.history(active)[0]["content"] == "new times"
    assert "retention_run purged=1" in channel.host.log_text()


def test_a_users_messages_are_exported_then_removed(channel: Bench) -> None:
    # GIVEN Ada's personal chat, and a group chat where Ada and Bob speak
    ada, bob = user("Ada"), user("Bob")
    personal, group = f"a:{uuid.uuid4().hex}", f"19:{uuid.uuid4().hex}@thread.v2"
    say(channel, "my own question", conversation_id=personal, sender=ada)
    say(channel, "hello from Ada", conversation_id=group, sender=ada, group=True)
    say(channel, "hello from Bob", conversation_id=group, sender=bob, group=True)
    url = f"{channel.host.url}/api/users/{quote(ada['aadObjectId'], safe='')}"
    # WHEN her messages are asked for by her Entra object ID
    exported = channel.http.get(f"{url}/messages")
    # THEN both conversations come back, with what she sent and the replies she received
    assert exported.status_code == 200
    found = {c["conversationId"]: c for c in exported.json()["conversations"]}
    assert found[personal]["type"] == "personal" and found[group]["type"] == "shared"
    assert [(m["direction"], m["content"]) for m in found[group]["messages"]] == [
        ("sent", "hello from Ada"), ("received", "reply to 'Ada: hello from Ada' after 2 messages")]
    assert [m["direction"] for m in found[personal]["messages"]] == ["sent", "received"]
    # WHEN she is forgotten (by her channel ID this time)
    removed = channel.http.delete(f"{channel.host.url}/api/users/{quote(ada['id'], safe='')}")
    # THEN the answer counts what was done
    assert removed.status_code == 200
    assert removed.json() == {"userId": ada["id"], "personalConversationsDeleted": 1,
                              "sharedConversations": 1, "messagesReplaced": 2,
                              "usageDaysDeleted": 1}
    # AND her personal chat is gone; in the group her message and its reply are markers, in their
    # places, and Bob's turn is untouched
    assert channel.history(personal) == []
    assert [(m["role"], m["content"]) for m in channel.history(group)] == [
        ("user", REMOVED_MARKER), ("assistant", REMOVED_MARKER),
        ("user", "hello from Bob"), ("assistant", "reply to 'Bob: hello from Bob' after 4 messages")]
    # AND the next turn's model request holds no trace of her words
    say(channel, "what did Ada say?", conversation_id=group, sender=bob, group=True)
    request = next(r for r in reversed(channel.model.requests)
                   if "what did Ada say?" in str(r["messages"][-1]["content"]))
    assert "hello from Ada" not in str(request["messages"])
    # AND her data is empty now, her usage too (kept under her Entra object ID)
    assert channel.http.get(f"{url}/messages").json()["conversations"] == []
    assert channel.http.get(f"{url}/usage").json()["today"]["turns"] == 0


def test_a_conversation_over_its_turn_limit_is_told_politely_without_a_model_call(
        channel: Bench) -> None:
    # GIVEN CHAT_MAX_TURNS_PER_MINUTE=3, and a clock well inside a UTC minute (the limit counts
    # per fixed minute: four streamed turns take about 5 s, which must not straddle two minutes)
    conversation = f"a:{uuid.uuid4().hex}"
    into_minute = time.time() % 60
    if into_minute > 40:
        time.sleep(61 - into_minute)
    # WHEN four messages arrive at once-a-second speed
    for index in range(4):
        say(channel, f"quick {index}", conversation_id=conversation, sender=ADA)
    # THEN the fourth gets the polite reply, and the model never saw it
    replies = [m["text"] for m in channel.connector.messages(conversation)]
    assert replies[3] == LIMIT_REPLIES["turns_per_minute"]
    assert not any("quick 3" in str(r["messages"]) for r in channel.model.requests)
    assert "spend_limit_reached limit=turns_per_minute" in channel.host.log_text()
    assert len(channel.history(conversation)) == 6
