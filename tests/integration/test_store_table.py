"""The Table Storage conversation store against a real Azurite."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import pytest
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import AsyncHTTPPolicy
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from devtools.azurite import azurite_connection_string
from shared.errors import (
    BadRequest,
    ConversationConflict,
    DuplicateActivity,
    MessageTooLarge,
    StorageForbidden,
    StorageUnavailable,
    TurnTooLarge,
    http_status_for,
)
from shared.keys import encode_key
from shared.messages import ChatMessage, ToolCall
from shared.store import MAX_MESSAGE_CHARS, MAX_TURN_MESSAGES, ConversationWindow, TableConversationStore
from shared.store._table import CLIENT_OPTIONS

BIG_BUDGET = 10_000_000


def turn(text: str, reply: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text), ChatMessage(role="assistant", content=reply)]


async def commit(store: TableConversationStore, conversation_id: str, activity_id: str,
                 messages: list[ChatMessage], *, window_messages: int = 100) -> None:
    window = await store.load_window(conversation_id, token_budget=BIG_BUDGET,
                                     max_messages=window_messages)
    await store.commit_turn(window, activity_id=activity_id, messages=messages)


async def forget_the_copy(connection_string: str, table_name: str, conversation_id: str) -> None:
    """Store the head without its copy of the newest turns, as an earlier version stored it: its
    windows are then read from the message rows."""
    async with TableClient.from_connection_string(connection_string, table_name=table_name) as table:
        head = await table.get_entity(encode_key(conversation_id), "h")
        await table.update_entity({name: value for name, value in head.items()
                                   if not name.startswith("cache")}, mode=UpdateMode.REPLACE)


async def raw_rows(connection_string: str, table_name: str, conversation_id: str) -> list[dict]:
    async with TableClient.from_connection_string(connection_string, table_name=table_name) as table:
        return [dict(row) async for row in table.query_entities(
            "PartitionKey eq @pk", parameters={"pk": encode_key(conversation_id)})]


def assert_tombstone(rows: list[dict], *, last_seq: int) -> None:
    """A cleared conversation keeps its head only: where its sequence numbers go on from, and
    nothing of what was said."""
    (head,) = rows
    assert head["RowKey"] == "h" and head["last_seq"] == head["cleared_seq"] == last_seq
    assert head["cache"] == "[]" and "summary" not in head and "speakers" not in head


async def test_a_conversation_round_trips(table_store: TableConversationStore) -> None:
    # GIVEN two committed turns
    await commit(table_store, "conv-1", "act-1", turn("hello", "hi there"))
    await commit(table_store, "conv-1", "act-2", turn("how are you?", "fine"))
    # WHEN the window is loaded
    window = await table_store.load_window("conv-1", token_budget=BIG_BUDGET, max_messages=100)
    # THEN it holds all four messages in order, with their activity IDs
    assert [(m.role, m.content) for m in window.messages] == [
        ("user", "hello"), ("assistant", "hi there"), ("user", "how are you?"),
        ("assistant", "fine")]
    assert [m.activity_id for m in window.messages] == ["act-1", "act-1", "act-2", "act-2"]
    assert window.last_seq == 4 and window.version is not None
    assert await table_store.list_messages("conv-1") == list(window.messages)


NASTY_IDS = [
    "a:1Xyz-abcDEF_0123",
    "19:abc@thread.tacv2;messageid=123",
    "19:abc@thread.tacv2",
    "a/b", "a\\b", "a#b", "a?b", "a~2Fb", "a%2Fb",
    "tab\there", "nul\x00byte", "del\x7f",
    "héllo wörld", "会話", "emoji 🎉",
    "x" * 1025, "x" * 1025 + "y", "é" * 2000,
    "'quote' and \"double\"",
]


async def test_nasty_conversation_ids_work_and_stay_apart(table_store: TableConversationStore) -> None:
    # GIVEN one turn committed under each awkward ID
    for index, conversation_id in enumerate(NASTY_IDS):
        await commit(table_store, conversation_id, f"act-{index}", turn(f"u{index}", f"r{index}"))
    # WHEN each is read back
    for index, conversation_id in enumerate(NASTY_IDS):
        messages = await table_store.list_messages(conversation_id)
        # THEN each holds exactly its own turn
        assert [m.content for m in messages] == [f"u{index}", f"r{index}"], conversation_id
    assert len({encode_key(conversation_id) for conversation_id in NASTY_IDS}) == len(NASTY_IDS)


async def test_concurrent_commits_all_land_exactly_once_in_order(
        azurite_connection_string: str, table_name: str) -> None:
    # GIVEN 20 writers, each with its own client, posting one turn each to the same conversation
    async def writer(index: int) -> int:
        store = TableConversationStore.from_connection_string(azurite_connection_string,
                                                              table_name=table_name)
        conflicts = 0
        try:
            for _ in range(100):
                window = await store.load_window("busy", token_budget=BIG_BUDGET, max_messages=500)
                try:
                    await store.commit_turn(window, activity_id=f"act-{index}",
                                            messages=turn(f"q{index}", f"a{index}"))
                    return conflicts
                except ConversationConflict:
                    conflicts += 1
                    await asyncio.sleep(random.uniform(0, 0.02))
            raise AssertionError("writer never committed")
        finally:
            await store.close()

    # WHEN they all commit at once, re-loading and retrying on conflict
    conflicts = await asyncio.gather(*(writer(index) for index in range(20)))
    # THEN every turn is stored once, user then reply, never interleaved
    store = TableConversationStore.from_connection_string(azurite_connection_string,
                                                          table_name=table_name)
    try:
        messages = await store.list_messages("busy")
    finally:
        await store.close()
    assert len(messages) == 40
    pairs = [(messages[i].content, messages[i + 1].content) for i in range(0, 40, 2)]
    assert all(q[1:] == a[1:] and q[0] == "q" and a[0] == "a" for q, a in pairs)
    assert sorted(q for q, _ in pairs) == sorted(f"q{i}" for i in range(20))
    assert sum(conflicts) > 0  # the race was real


async def test_a_stale_commit_writes_nothing(table_store: TableConversationStore,
                                             azurite_connection_string: str, table_name: str) -> None:
    # GIVEN a window loaded before another turn committed
    await commit(table_store, "c", "act-1", turn("one", "1"))
    stale = await table_store.load_window("c", token_budget=BIG_BUDGET, max_messages=100)
    await commit(table_store, "c", "act-2", turn("two", "2"))
    rows_before = await raw_rows(azurite_connection_string, table_name, "c")
    # WHEN a commit uses the stale window
    with pytest.raises(ConversationConflict):
        await table_store.commit_turn(stale, activity_id="act-3", messages=turn("three", "3"))
    # THEN not one row changed
    assert await raw_rows(azurite_connection_string, table_name, "c") == rows_before


async def test_a_stale_commit_of_a_new_conversation_writes_nothing(
        table_store: TableConversationStore) -> None:
    # GIVEN two windows of a conversation that does not exist yet
    first = await table_store.load_window("new", token_budget=100, max_messages=10)
    second = await table_store.load_window("new", token_budget=100, max_messages=10)
    await table_store.commit_turn(first, activity_id="a", messages=turn("x", "y"))
    # WHEN the second creates it too THEN it conflicts
    with pytest.raises(ConversationConflict):
        await table_store.commit_turn(second, activity_id="b", messages=turn("z", "w"))
    assert [m.content for m in await table_store.list_messages("new")] == ["x", "y"]


async def test_a_duplicate_activity_writes_nothing_and_returns_the_first_reply(
        table_store: TableConversationStore, azurite_connection_string: str, table_name: str) -> None:
    # GIVEN an activity committed once, then more turns (so it left the head's recent list? no:
    # the marker row is what catches it)
    await commit(table_store, "d", "act-1", turn("hello", "first reply"))
    window = await table_store.load_window("d", token_budget=BIG_BUDGET, max_messages=10,
                                           activity_id="act-1")
    assert window.committed_activity
    rows_before = await raw_rows(azurite_connection_string, table_name, "d")
    # WHEN it is committed again
    with pytest.raises(DuplicateActivity) as caught:
        await table_store.commit_turn(window, activity_id="act-1",
                                      messages=turn("hello", "second reply"))
    # THEN the first reply comes back and nothing was written
    assert caught.value.turn is not None and caught.value.turn.reply is not None
    assert caught.value.turn.reply.content == "first reply"
    assert await raw_rows(azurite_connection_string, table_name, "d") == rows_before
    stored = await table_store.get_turn("d", "act-1")
    assert stored is not None and [m.content for m in stored.messages] == ["hello", "first reply"]
    assert await table_store.get_turn("d", "act-unknown") is None


async def test_delivery_is_recorded(table_store: TableConversationStore) -> None:
    await commit(table_store, "e", "act-1", turn("hello", "reply"))
    assert (await table_store.get_turn("e", "act-1")).delivered is False  # type: ignore[union-attr]
    await table_store.mark_delivered("e", "act-1")
    assert (await table_store.get_turn("e", "act-1")).delivered is True  # type: ignore[union-attr]


async def test_a_100k_character_message_round_trips_and_a_longer_one_is_refused(
        table_store: TableConversationStore, azurite_connection_string: str, table_name: str) -> None:
    # GIVEN a message of exactly the limit, half of it outside the BMP (two UTF-16 units each)
    longest = ("a🎉" * (MAX_MESSAGE_CHARS // 2))
    assert len(longest) == MAX_MESSAGE_CHARS
    await commit(table_store, "big", "act-1", turn(longest, "ok"))
    # THEN it round-trips intact
    messages = await table_store.list_messages("big")
    assert messages[0].content == longest
    # WHEN a longer one is committed THEN it is refused and nothing is written
    rows_before = await raw_rows(azurite_connection_string, table_name, "big")
    with pytest.raises(MessageTooLarge):
        await commit(table_store, "big", "act-2", turn(longest + "!", "never"))
    assert await raw_rows(azurite_connection_string, table_name, "big") == rows_before


async def test_a_turn_over_the_transaction_limits_is_refused(table_store: TableConversationStore) -> None:
    too_many = [ChatMessage(role="user", content=str(i)) for i in range(99)]
    with pytest.raises(TurnTooLarge):
        await commit(table_store, "t", "act-1", too_many)
    too_heavy = [ChatMessage(role="user", content="x" * MAX_MESSAGE_CHARS) for _ in range(40)]
    with pytest.raises(TurnTooLarge):
        await commit(table_store, "t", "act-2", too_heavy)
    assert await table_store.list_messages("t") == []


async def seed(store: TableConversationStore, conversation_id: str, messages: int) -> None:
    """Store `messages` messages as user/assistant pairs, as many pairs per transaction as a
    turn may hold."""
    pairs, per_turn = messages // 2, MAX_TURN_MESSAGES // 2
    for start in range(0, pairs, per_turn):
        batch = []
        for index in range(start, min(pairs, start + per_turn)):
            batch += turn(f"question {index}", f"answer {index}")
        await commit(store, conversation_id, f"seed-{start}", batch, window_messages=0)


async def test_clear_removes_every_row_of_one_conversation_only(
        table_store: TableConversationStore, azurite_connection_string: str, table_name: str) -> None:
    # GIVEN a conversation of 250 messages and a neighbour
    await seed(table_store, "doomed", 250)
    await commit(table_store, "neighbour", "n-1", turn("keep", "me"))
    neighbour_rows = await raw_rows(azurite_connection_string, table_name, "neighbour")
    # WHEN the first is cleared
    removed = await table_store.clear("doomed")
    # THEN none of its message rows remain, only its head as a tombstone (no text, the counters),
    # and the neighbour is untouched
    assert removed >= 250
    assert_tombstone(await raw_rows(azurite_connection_string, table_name, "doomed"), last_seq=250)
    assert await raw_rows(azurite_connection_string, table_name, "neighbour") == neighbour_rows
    # AND the cleared conversation starts afresh
    await commit(table_store, "doomed", "again", turn("new", "start"))
    assert [m.content for m in await table_store.list_messages("doomed")] == ["new", "start"]


async def test_a_turn_loaded_before_a_clear_cannot_commit_into_it(
        table_store: TableConversationStore) -> None:
    await commit(table_store, "r", "act-1", turn("one", "1"))
    window = await table_store.load_window("r", token_budget=BIG_BUDGET, max_messages=10)
    await table_store.clear("r")
    with pytest.raises(ConversationConflict):
        await table_store.commit_turn(window, activity_id="act-2", messages=turn("two", "2"))
    assert await table_store.list_messages("r") == []


async def test_rows_read_per_turn_do_not_grow_with_history(table_store: TableConversationStore) -> None:
    # GIVEN a short and a long conversation, and a window that holds 8 messages
    await seed(table_store, "short", 10)
    await seed(table_store, "long", 5_000)

    async def turn_then_load(conversation_id: str) -> tuple[ConversationWindow, ConversationWindow]:
        first = await table_store.load_window(conversation_id, token_budget=BIG_BUDGET,
                                              max_messages=8)
        await table_store.commit_turn(first, activity_id=f"{conversation_id}-next",
                                      messages=turn("more", "yes"))
        again = await table_store.load_window(conversation_id, token_budget=BIG_BUDGET,
                                              max_messages=8)
        return first, again

    # WHEN each has a turn with that window, and loads it again
    (_, short), (long_first, long) = await turn_then_load("short"), await turn_then_load("long")
    # THEN a window the head's copy could not answer yet came from a range query of few rows
    # (one page: it asks for one more row than the window can hold)
    assert long_first.round_trips <= 3 and long_first.rows_read <= 1 + 11
    # AND after a turn, each load is one point read of the head, whatever the history
    assert (short.rows_read, short.round_trips) == (long.rows_read, long.round_trips) == (1, 1)
    assert len(short.messages) == len(long.messages) == 8


def tool_turn(index: int, calls: int) -> list[ChatMessage]:
    """A user message, an assistant asking for `calls` tools, their results, and the answer."""
    ids = [f"call-{index}-{n}" for n in range(calls)]
    asking = ChatMessage(role="assistant", content=None, tool_calls=tuple(
        ToolCall(id=call_id, name="lookup", arguments='{"q": "x"}') for call_id in ids))
    results = [ChatMessage(role="tool", content=f"result {call_id} " * (index % 7 + 1),
                           tool_call_id=call_id) for call_id in ids]
    return [ChatMessage(role="user", content=f"question {index} " * (index % 5 + 1)), asking,
            *results, ChatMessage(role="assistant", content=f"answer {index}")]


async def test_a_window_from_the_heads_copy_equals_one_read_from_the_rows(
        table_store: TableConversationStore, azurite_connection_string: str, table_name: str) -> None:
    # GIVEN two copies of one conversation of turns of different sizes, some with tool calls,
    # committed turn by turn with the windows a bot would use; the second's head has no copy
    for conversation_id in ("mixed", "mixed-rows"):
        for index in range(30):
            messages = tool_turn(index, index % 3) if index % 2 else turn(f"q{index} " * index, "a")
            await commit(table_store, conversation_id, f"m-{index}", messages, window_messages=12)
    await forget_the_copy(azurite_connection_string, table_name, "mixed-rows")
    # WHEN windows of many budgets and caps are loaded from each
    answered_by_the_copy = 0
    for budget in (0, 5, 40, 90, 150, 300, 600, 10_000):
        for cap in (1, 2, 5, 12, 40):
            copied = await table_store.load_window("mixed", token_budget=budget, max_messages=cap)
            read = await table_store.load_window("mixed-rows", token_budget=budget, max_messages=cap)
            # THEN the second came from the rows, most of the first from the head alone (a
            # window larger than the copy was kept for is read from the rows), and they agree
            answered_by_the_copy += copied.round_trips == 1
            assert read.round_trips >= 2, (budget, cap)
            assert [(m.role, m.content, m.tool_calls, m.tool_call_id) for m in copied.messages] == \
                [(m.role, m.content, m.tool_calls, m.tool_call_id) for m in read.messages], (budget, cap)
            assert copied.tokens == read.tokens
    assert answered_by_the_copy >= 25


async def test_a_turn_too_large_to_copy_still_loads_whole(table_store: TableConversationStore) -> None:
    # GIVEN a turn whose escaped JSON is far over the head copy's limit, then a small one
    big = "é" * MAX_MESSAGE_CHARS  # 6 characters each once escaped
    await commit(table_store, "big", "b-1", turn(big, "noted"))
    await commit(table_store, "big", "b-2", turn("and?", "done"))
    # WHEN the window is loaded
    window = await table_store.load_window("big", token_budget=BIG_BUDGET, max_messages=100)
    # THEN it holds all four messages, the big one intact
    assert [m.content for m in window.messages] == [big, "noted", "and?", "done"]


async def test_after_a_clear_the_copy_answers_only_new_messages(
        table_store: TableConversationStore) -> None:
    # GIVEN a conversation with a cached window, cleared, then one new turn
    await commit(table_store, "again", "a-1", turn("old", "old reply"))
    await table_store.clear("again")
    await commit(table_store, "again", "a-2", turn("new", "new reply"))
    # WHEN it is loaded
    window = await table_store.load_window("again", token_budget=BIG_BUDGET, max_messages=100)
    # THEN one point read answers it, with only the new turn
    assert [m.content for m in window.messages] == ["new", "new reply"]
    assert (window.rows_read, window.round_trips) == (1, 1)


async def test_the_window_holds_whole_turns_within_the_token_budget(
        table_store: TableConversationStore) -> None:
    # GIVEN turns of known size
    for index in range(6):
        await commit(table_store, "w", f"a{index}", turn(f"q{index} " + "x" * 30, f"r{index}"))
    full = await table_store.load_window("w", token_budget=BIG_BUDGET, max_messages=100)
    per_turn = full.tokens // 6
    # WHEN the budget fits two and a half turns
    window = await table_store.load_window("w", token_budget=per_turn * 5 // 2, max_messages=100)
    # THEN the two newest whole turns come back, starting at a user message
    assert [m.content[:2] for m in window.messages] == ["q4", "r4", "q5", "r5"]
    assert window.tokens <= per_turn * 5 // 2


async def test_a_commit_racing_the_same_activity_on_another_instance_is_a_duplicate(
        table_store: TableConversationStore) -> None:
    # GIVEN two instances that loaded the conversation before either committed activity X
    await commit(table_store, "race", "a0", turn("zero", "0"))
    first = await table_store.load_window("race", token_budget=BIG_BUDGET, max_messages=10)
    second = await table_store.load_window("race", token_budget=BIG_BUDGET, max_messages=10)
    await table_store.commit_turn(first, activity_id="X", messages=turn("x", "first reply"))
    # WHEN the second commits X with its stale window (the head's ETag fails before the marker)
    with pytest.raises(DuplicateActivity) as caught:
        await table_store.commit_turn(second, activity_id="X", messages=turn("x", "second reply"))
    # THEN it is told X is in, with the first reply, not merely "conflict"
    assert caught.value.turn is not None and caught.value.turn.reply is not None
    assert caught.value.turn.reply.content == "first reply"


async def test_concurrent_clears_both_succeed_and_remove_everything(
        table_store: TableConversationStore, azurite_connection_string: str, table_name: str) -> None:
    await seed(table_store, "twice", 250)
    results = await asyncio.gather(table_store.clear("twice"), table_store.clear("twice"))
    assert sum(results) >= 250
    assert_tombstone(await raw_rows(azurite_connection_string, table_name, "twice"), last_seq=250)
    assert await table_store.clear("never-stored") == 0


def test_the_size_check_counts_what_goes_on_the_wire() -> None:
    from shared.store import check_turn

    # 40 messages of 20,000 CJK characters: 2.4 MB as UTF-8, 4.8 MB as the SDK's escaped JSON
    cjk = [ChatMessage(role="tool", content="会" * 20_000, tool_call_id=str(i)) for i in range(40)]
    with pytest.raises(TurnTooLarge):
        check_turn(cjk)
    check_turn([ChatMessage(role="tool", content="a" * 20_000, tool_call_id=str(i)) for i in range(40)])


async def test_environment_proxies_are_used_only_when_asked_for(
        azurite_connection_string: str, table_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN an HTTP proxy variable pointing at a port where nothing listens
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    direct = TableConversationStore.from_connection_string(azurite_connection_string,
                                                           table_name=table_name)
    proxied = TableConversationStore.from_connection_string(azurite_connection_string,
                                                            table_name=table_name, env_proxy=True)
    try:
        # WHEN each checks storage
        await direct.ping()
        # THEN the store that was not asked to honour it goes direct, and the other goes to the
        # (dead) proxy and reports storage unavailable
        with pytest.raises(StorageUnavailable):
            await proxied.ping()
    finally:
        await direct.close()
        await proxied.close()


async def test_a_silent_storage_fails_within_the_read_timeout(
        table_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a "storage" that accepts connections and never answers, and short client timeouts
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setitem(CLIENT_OPTIONS, "read_timeout", 0.3)
    monkeypatch.setitem(CLIENT_OPTIONS, "retry_total", 0)
    store = TableConversationStore.from_connection_string(
        azurite_connection_string(port=port), table_name=table_name)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        # WHEN the store checks storage
        with pytest.raises(StorageUnavailable):
            await store.ping()
        # THEN it gave up after the read timeout, not the transport's default of minutes
        assert loop.time() - started < 3
    finally:
        await store.close()
        server.close()


async def test_a_conversation_read_from_its_rows_is_answered_by_the_copy_after_one_turn(
        table_store: TableConversationStore, azurite_connection_string: str,
        table_name: str) -> None:
    # GIVEN a conversation that starts with an assistant message, whose head has no copy (as one
    # stored by an earlier version)
    await commit(table_store, "legacy", "w", [ChatMessage(role="assistant", content="welcome")])
    await commit(table_store, "legacy", "a-1", turn("hi", "hello"))
    await forget_the_copy(azurite_connection_string, table_name, "legacy")
    # WHEN a turn loads its window (from the rows) and commits, and the window is loaded again
    first = await table_store.load_window("legacy", token_budget=BIG_BUDGET, max_messages=100)
    await table_store.commit_turn(first, activity_id="a-2", messages=turn("again", "sure"))
    again = await table_store.load_window("legacy", token_budget=BIG_BUDGET, max_messages=100)
    # THEN the first read the rows, the second only the head, and it holds what the rows hold
    # (whole turns: the welcome before any user message is no turn's part)
    assert first.round_trips == 2
    assert (again.rows_read, again.round_trips) == (1, 1)
    assert [m.content for m in again.messages] == ["hi", "hello", "again", "sure"]
    assert list(again.messages) == (await table_store.list_messages("legacy"))[1:]
    # AND the copy holds the rows' properties, not the service's metadata of the read
    async with TableClient.from_connection_string(azurite_connection_string,
                                                  table_name=table_name) as table:
        copy = (await table.get_entity(encode_key("legacy"), "h"))["cache"]
    assert '"content": "hello"' in copy and "odata.etag" not in copy and "Timestamp" not in copy


class CommitAfterTheHeadRead(AsyncHTTPPolicy):  # type: ignore[type-arg]
    """Runs `action` once, right after the first point read of a head answers."""

    def __init__(self, action: Callable[[], Awaitable[None]]) -> None:
        super().__init__()
        self.action: Callable[[], Awaitable[None]] | None = action

    async def send(self, request: PipelineRequest) -> PipelineResponse:  # type: ignore[type-arg]
        response = await self.next.send(request)
        http = request.http_request
        if self.action is not None and http.method == "GET" and "RowKey='h'" in http.url:
            action, self.action = self.action, None
            await action()
        return response


async def test_a_row_read_skips_turns_committed_after_its_head(
        table_store: TableConversationStore, azurite_connection_string: str, table_name: str) -> None:
    # GIVEN a conversation read from its rows, and another instance that commits a turn between
    # this instance's read of the head and its read of the rows
    await commit(table_store, "racing", "r-1", turn("first", "one"))
    await forget_the_copy(azurite_connection_string, table_name, "racing")
    racer = CommitAfterTheHeadRead(lambda: commit(table_store, "racing", "r-2", turn("second", "two")))
    store = TableConversationStore(table=TableClient.from_connection_string(
        azurite_connection_string, table_name=table_name, per_call_policies=[racer]))
    try:
        # WHEN the window is loaded
        window = await store.load_window("racing", token_budget=BIG_BUDGET, max_messages=100)
        # THEN it is the conversation as that head knew it, and committing on it conflicts
        assert racer.action is None
        assert [m.content for m in window.messages] == ["first", "one"]
        with pytest.raises(ConversationConflict):
            await store.commit_turn(window, activity_id="r-3", messages=turn("third", "3"))
    finally:
        await store.close()


async def test_a_table_deleted_under_a_running_store_is_made_again_without_losing_the_turn(
        table_store: TableConversationStore, azurite_connection_string: str, table_name: str) -> None:
    # GIVEN a store that made its table, and the table deleted behind its back
    await commit(table_store, "gone", "g-1", turn("one", "1"))
    async with TableClient.from_connection_string(azurite_connection_string,
                                                  table_name=table_name) as table:
        await table.delete_table()
    # WHEN the next turn loads and commits
    window = await table_store.load_window("gone", token_budget=BIG_BUDGET, max_messages=100)
    await table_store.commit_turn(window, activity_id="g-2", messages=turn("two", "2"))
    # THEN the table exists again and holds that turn
    assert [m.content for m in await table_store.list_messages("gone")] == ["two", "2"]


async def test_storage_refusing_our_credentials_is_our_error_not_the_callers(
        azurite_connection_string: str, table_name: str) -> None:
    # GIVEN a store whose account key is wrong
    wrong = azurite_connection_string.replace("AccountKey=Eby8", "AccountKey=AAAA")
    store = TableConversationStore.from_connection_string(wrong, table_name=table_name)
    try:
        # WHEN it loads a window THEN the error is a 500 that names the setting to check
        with pytest.raises(StorageForbidden) as caught:
            await store.load_window("c", token_budget=100, max_messages=10)
    finally:
        await store.close()
    assert http_status_for(caught.value) == 500
    assert "CHAT_STORAGE_CONNECTION_STRING" in str(caught.value)


async def test_long_activity_ids_never_push_the_head_past_a_propertys_limit(
        table_store: TableConversationStore) -> None:
    # GIVEN 40 turns whose activity IDs are as long as allowed (1,024 characters, non-ASCII)
    ids = [f"{index:04d}" + "é" * 1_020 for index in range(40)]
    # WHEN they are committed one after another
    for activity_id in ids:
        await commit(table_store, "long-ids", activity_id, turn("q", "a"))
    # THEN every commit landed, and the newest activities are still recognised as committed
    assert len(await table_store.list_messages("long-ids")) == 80
    window = await table_store.load_window("long-ids", token_budget=BIG_BUDGET, max_messages=10,
                                           activity_id=ids[-1])
    assert window.committed_activity
    # AND an older one is still caught as a duplicate by its marker row
    with pytest.raises(DuplicateActivity):
        await table_store.commit_turn(window, activity_id=ids[0], messages=turn("q", "again"))


async def test_an_activity_id_the_store_cannot_keep_is_refused_before_anything_else(
        table_store: TableConversationStore) -> None:
    # WHEN a window is loaded for an activity ID over 1,024 characters THEN it is refused at once
    with pytest.raises(BadRequest):
        await table_store.load_window("c", token_budget=100, max_messages=10,
                                      activity_id="x" * 1_025)


async def test_a_storage_that_trickles_its_answer_fails_within_the_total_deadline(
        table_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a "storage" that answers one byte every 0.1 s (never silent for a whole read timeout)
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setitem(CLIENT_OPTIONS, "read_timeout", 0.5)
    monkeypatch.setitem(CLIENT_OPTIONS, "retry_total", 0)
    monkeypatch.setitem(CLIENT_OPTIONS, "deadline", 1.0)
    store = TableConversationStore(table=TableClient.from_connection_string(
        azurite_connection_string(port=port), table_name=table_name), create_table=False)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        # WHEN the store loads a window
        with pytest.raises(StorageUnavailable, match="took over"):
            await store.load_window("c", token_budget=100, max_messages=10)
        # THEN it gave up at the total deadline, not after the whole slow answer
        assert loop.time() - started < 3
    finally:
        await store.close()
        server.close()
