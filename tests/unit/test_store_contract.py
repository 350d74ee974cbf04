"""The store contract: the core every backend has, and the capabilities a backend declares."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from shared.messages import ChatMessage, Usage
from shared.store import CAPABILITIES, InMemoryConversationStore, TableConversationStore


def test_the_table_backend_declares_every_capability_and_the_in_memory_one_budgets_only() -> None:
    # GIVEN the two backends WHEN asked what they have THEN each says
    assert TableConversationStore.capabilities == CAPABILITIES
    memory = InMemoryConversationStore()
    assert [c for c in sorted(CAPABILITIES) if memory.supports(c)] == ["budgets"]


async def test_a_capability_the_in_memory_store_lacks_says_so_instead_of_pretending() -> None:
    # GIVEN an in-memory store
    store = InMemoryConversationStore()
    # WHEN a user's data is asked of it THEN it refuses, naming what it lacks
    with pytest.raises(NotImplementedError, match="keeps no user index"):
        await store.export_user("29:u")
    with pytest.raises(NotImplementedError, match="keeps no retention index"):
        await store.purge_idle(before="2026-01-01", deadline=0.0)


async def test_the_in_memory_store_keeps_the_counters_through_a_clear() -> None:
    # GIVEN a conversation whose turn billed 400 tokens, at a fixed time
    noon = datetime(2026, 12, 2, 12, tzinfo=UTC)
    store = InMemoryConversationStore(clock=lambda: noon)
    window = await store.load_window("c", token_budget=1_000, max_messages=10)
    await store.commit_turn(window, activity_id="a", messages=[
        ChatMessage(role="user", content="q"), ChatMessage(role="assistant", content="a")],
        billed=Usage(prompt_tokens=300, completion_tokens=100))
    # WHEN it is cleared
    await store.clear("c")
    # THEN the counters are as the turn left them, and the messages are gone
    after = await store.load_window("c", token_budget=1_000, max_messages=10)
    assert after.messages == () and after.spend.tokens_on_day(noon) == 400
    assert after.spend.turns_in_minute(noon) == 1
