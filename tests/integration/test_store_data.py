"""Retention, the user index and the spend counters of the Table store, against a real Azurite."""

from __future__ import annotations

import itertools
from dataclasses import replace

from azure.data.tables.aio import TableClient

from shared.keys import encode_key
from shared.messages import ChatMessage, Sender, Usage, utc_day, utc_now
from shared.store import REMOVED_MARKER, TableConversationStore

BUDGET = 10_000_000
ADA = Sender(id="29:ada", aad_id="aad-ada")
BOB = Sender(id="29:bob", aad_id="aad-bob")


def exchange(text: str, sender: Sender | None = None, *, tokens: int = 0) -> list[ChatMessage]:
    usage = Usage(prompt_tokens=tokens, completion_tokens=0) if tokens else None
    return [ChatMessage(role="user", content=text, sender=sender),
            ChatMessage(role="assistant", content=f"re: {text}", usage=usage)]


async def turn(store: TableConversationStore, conversation_id: str, text: str, *,
               sender: Sender | None = ADA, shared: bool = False, day: str | None = None,
               tokens: int = 0) -> None:
    """One turn as the bot makes it: load, write the index rows, commit (`day`: as if on that day)."""
    window = await store.load_window(conversation_id, token_budget=BUDGET, max_messages=100)
    indexed = await store.write_indexes(window, today=day or utc_day(utc_now()), sender=sender,
                                        shared=shared)
    await store.commit_turn(replace(window, indexed=indexed), activity_id=f"{text}-{id(window)}",
                            messages=exchange(text, sender, tokens=tokens))


async def rows(connection_string: str, table_name: str, partition: str) -> list[dict]:
    async with TableClient.from_connection_string(connection_string, table_name=table_name) as table:
        return [dict(row) async for row in table.query_entities(
            "PartitionKey eq @pk", parameters={"pk": partition})]


def today() -> str:
    return utc_day(utc_now())


# -- spend counters ---------------------------------------------------------------------------------


async def test_the_spend_counters_ride_in_the_head(table_store: TableConversationStore) -> None:
    # GIVEN two turns that spent 120 and 30 model tokens
    await turn(table_store, "spend-1", "one", tokens=120)
    await turn(table_store, "spend-1", "two", tokens=30)
    # WHEN the window is loaded (the head's one point read)
    window = await table_store.load_window("spend-1", token_budget=BUDGET, max_messages=100)
    # THEN it carries both counters, with no extra read
    now = utc_now()
    assert window.spend.tokens_on_day(now) == 150
    assert window.spend.turns_in_minute(now) in (1, 2)  # 2 unless the minute turned between them
    assert window.round_trips == 1


# -- the indexes ------------------------------------------------------------------------------------


async def test_the_day_index_is_written_once_a_day_and_the_user_index_once_a_speaker(
        table_store: TableConversationStore, azurite_connection_string: str,
        table_name: str) -> None:
    # GIVEN a conversation's first turn, by Ada
    await turn(table_store, "idx-1", "first")
    # WHEN a second turn of the same day loads it, by Ada again
    window = await table_store.load_window("idx-1", token_budget=BUDGET, max_messages=100)
    again = await table_store.write_indexes(window, today=today(), sender=ADA, shared=False)
    # THEN nothing more is written: the head knows the day and the speaker
    assert again is not None and (again.day, again.speakers) == (None, ())
    # AND the day index names it, as do both of Ada's IDs, as a personal conversation
    pk = encode_key("idx-1")
    assert [r["RowKey"] for r in await rows(azurite_connection_string, table_name,
                                            f"~idx-day-{today()}")] == [pk]
    for user_id in ("29:ada", "aad-ada"):
        entries = await rows(azurite_connection_string, table_name, f"~idx-user-{encode_key(user_id)}")
        assert [(e["RowKey"], e["shared"]) for e in entries] == [(pk, False)]
    # AND a new speaker is indexed on their first message
    assert (await table_store.write_indexes(window, today=today(), sender=BOB, shared=True)) \
        is not None


# -- retention --------------------------------------------------------------------------------------


async def test_idle_conversations_are_purged_and_active_ones_kept(
        table_store: TableConversationStore, azurite_connection_string: str,
        table_name: str) -> None:
    # GIVEN one conversation last active in 2020, and one active in 2020 and again today
    await turn(table_store, "old", "long ago", day="2020-01-01")
    await turn(table_store, "both", "long ago", day="2020-01-01")
    await turn(table_store, "both", "today")
    # WHEN the conversations idle since before 2020-06-01 are purged
    report = await table_store.purge_idle(before="2020-06-01", deadline=float("inf"))
    # THEN the idle one is gone, with its index rows; the active one is whole
    assert (report.purged, report.kept, report.finished) == (1, 1, True)
    assert await table_store.list_messages("old") == []
    (tombstone,) = await rows(azurite_connection_string, table_name, encode_key("old"))
    assert tombstone["RowKey"] == "h" and tombstone["cache"] == "[]"
    ada = await rows(azurite_connection_string, table_name, f"~idx-user-{encode_key('aad-ada')}")
    assert [r["RowKey"] for r in ada] == ["both"]
    assert [m.content for m in await table_store.list_messages("both")] == [
        "long ago", "re: long ago", "today", "re: today"]
    # AND the 2020 day index is empty: a second run has nothing to do
    assert await rows(azurite_connection_string, table_name, "~idx-day-2020-01-01") == []
    assert (await table_store.purge_idle(before="2020-06-01", deadline=float("inf"))).purged == 0


async def test_a_purge_stops_at_its_deadline_and_the_next_run_resumes(
        table_store: TableConversationStore) -> None:
    # GIVEN three idle conversations, and a clock that moves one second per look
    for index in range(3):
        await turn(table_store, f"idle-{index}", "hello", day=f"2020-01-0{index + 1}")
    ticks = itertools.count()

    def clock() -> float:
        return float(next(ticks))

    # WHEN a run that must stop 1.5 s after it starts is made, then another
    first = await table_store.purge_idle(before="2021-01-01", deadline=1.5, clock=clock)
    second = await table_store.purge_idle(before="2021-01-01", deadline=float("inf"))
    # THEN the first stopped unfinished after two, and the second purged the rest
    assert (first.purged, first.finished) == (2, False)
    assert (second.purged, second.finished) == (1, True)
    assert [await table_store.list_messages(f"idle-{i}") for i in range(3)] == [[], [], []]


async def test_a_turn_racing_a_purge_keeps_that_turn(
        table_store: TableConversationStore, azurite_connection_string: str,
        table_name: str) -> None:
    # GIVEN an idle conversation, and a purge that is interrupted after it hid the history by a
    # turn of another instance (its own store), committed before the rows are deleted
    await turn(table_store, "racy", "old news", day="2020-01-01")
    other = TableConversationStore.from_connection_string(azurite_connection_string,
                                                          table_name=table_name)
    table_rows = table_store._rows
    delete_rows = table_rows.delete_rows

    async def a_turn_arrives_first(pk: str, *, up_to_seq: int) -> int:
        await turn(other, "racy", "fresh news")
        return await delete_rows(pk, up_to_seq=up_to_seq)

    table_rows.delete_rows = a_turn_arrives_first  # type: ignore[method-assign]
    try:
        # WHEN the purge runs
        report = await table_store.purge_idle(before="2020-06-01", deadline=float("inf"))
    finally:
        await other.close()
    # THEN the old turn is gone and the new turn is kept, whole, with its head
    assert report.purged == 1
    assert [m.content for m in await table_store.list_messages("racy")] == [
        "fresh news", "re: fresh news"]
    # AND the conversation is indexed under today, for a later purge to find
    assert encode_key("racy") in [r["RowKey"] for r in await rows(
        azurite_connection_string, table_name, f"~idx-day-{today()}")]


async def test_a_conversation_that_spoke_after_its_index_row_is_kept_by_the_recheck(
        table_store: TableConversationStore) -> None:
    # GIVEN a conversation indexed in 2020 whose head has since moved to today
    await turn(table_store, "woke", "old", day="2020-01-01")
    await turn(table_store, "woke", "new")
    # WHEN a purge walks the 2020 index
    report = await table_store.purge_idle(before="2020-06-01", deadline=float("inf"))
    # THEN the head's re-check keeps it
    assert (report.purged, report.kept) == (0, 1)
    assert len(await table_store.list_messages("woke")) == 4


# -- a user's data ----------------------------------------------------------------------------------


async def test_a_users_messages_are_exported_and_forgotten(
        table_store: TableConversationStore, azurite_connection_string: str,
        table_name: str) -> None:
    # GIVEN Ada's personal chat, and a group chat where Ada and Bob speak
    await turn(table_store, "ada-1on1", "my secret")
    await turn(table_store, "group", "ada says hi", shared=True)
    await turn(table_store, "group", "bob says hi", sender=BOB, shared=True)
    # WHEN Ada's data is exported by her Entra object ID
    data = await table_store.export_user("aad-ada")
    # THEN both conversations come back: all of the personal one, her turn of the group one
    found = {c.conversation_id: c for c in data.conversations}
    assert [m.content for m in found["ada-1on1"].messages] == ["my secret", "re: my secret"]
    assert [m.content for m in found["group"].sent] == ["ada says hi"]
    assert [m.content for m in found["group"].received] == ["re: ada says hi"]
    assert found["group"].shared and not found["ada-1on1"].shared
    # WHEN she is forgotten, by her channel ID
    await table_store.forget_user("29:ada")
    # THEN her personal chat is gone; her group message and its reply are markers, in place
    assert await table_store.list_messages("ada-1on1") == []
    group = await table_store.list_messages("group")
    assert [(m.role, m.content) for m in group] == [
        ("user", REMOVED_MARKER), ("assistant", REMOVED_MARKER),
        ("user", "bob says hi"), ("assistant", "re: bob says hi")]
    assert group[0].sender is None and group[0].name is None
    # AND the next turn's window (from the head, whose copy was dropped) holds no trace of her text
    window = await table_store.load_window("group", token_budget=BUDGET, max_messages=100)
    assert not any("ada says hi" in (m.content or "") for m in window.messages)
    assert window.summary is None
    # AND neither of her IDs finds anything any more; Bob's still does
    assert (await table_store.export_user("aad-ada")).conversations == ()
    assert (await table_store.export_user("29:ada")).conversations == ()
    assert [c.conversation_id for c in (await table_store.export_user("29:bob")).conversations] \
        == ["group"]


async def test_forgetting_a_user_removes_who_answered_an_approval_in_their_turns(
        table_store: TableConversationStore) -> None:
    # GIVEN Ada's turn in a group chat whose tool call she approved
    from datetime import UTC, datetime

    from shared.messages import ToolCall, ToolDecision

    window = await table_store.load_window("group-approval", token_budget=BUDGET, max_messages=100)
    indexed = await table_store.write_indexes(window, today=today(), sender=ADA, shared=True)
    call = ToolCall(id="c1", name="delete_notes", arguments='{"topic": "drafts"}')
    decision = ToolDecision(outcome="approved", at=datetime(2026, 3, 4, tzinfo=UTC), by="Ada",
                            by_id="29:ada", arguments_sha256="ab" * 32)
    await table_store.commit_turn(replace(window, indexed=indexed), activity_id="t1", messages=[
        ChatMessage(role="user", content="delete the drafts", sender=ADA),
        ChatMessage(role="assistant", tool_calls=(call,)),
        ChatMessage(role="tool", content="deleted", tool_call_id="c1", name="delete_notes",
                    decision=decision),
        ChatMessage(role="assistant", content="Done.")])
    # WHEN she is forgotten
    await table_store.forget_user("29:ada")
    # THEN the decision stays (what, when), without who answered
    stored = await table_store.list_messages("group-approval")
    kept = stored[2].decision
    assert kept is not None and (kept.outcome, kept.at, kept.by, kept.by_id) == (
        "approved", decision.at, None, None)
    assert stored[2].content == "deleted"
