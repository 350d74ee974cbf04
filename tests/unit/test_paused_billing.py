"""A paused turn's model calls are billed once: those before the pause when it pauses, those after
when the resumed turn commits (the turn runner on the in-memory store, the model faked at the
transport under the real SDK)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import httpx2

from shared.activity import parse_activity
from shared.messages import ToolDecision
from shared.model import build_model
from shared.pause import arguments_sha256, decisions_for
from shared.prompt import ChatPrompt
from shared.settings import load_settings
from shared.store import InMemoryConversationStore
from shared.tools import tool
from shared.turn import Committed, Paused, Resume, TurnRunner

NOON = datetime(2026, 3, 4, 12, tzinfo=UTC)


@tool(policy="ask")
async def close_ticket(ticket: str) -> str:
    """Close a ticket (asks first)."""
    return f"closed {ticket}"


class Billing:
    """A tool call, then an answer; each call billed 100 + 10 tokens."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.calls += 1
        message: dict[str, Any] = {"role": "assistant", "content": "Closed."}
        if self.calls == 1:
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": "t1", "type": "function",
                "function": {"name": "close_ticket", "arguments": json.dumps({"ticket": "T-1"})}}]}
        return httpx2.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
            "choices": [{"index": 0, "finish_reason": "stop", "message": message}]})


async def test_a_paused_turns_calls_are_counted_once_across_the_pause() -> None:
    # GIVEN a turn runner whose model calls a tool that asks first
    settings = load_settings({"OPENAI_API_KEY": "sk-test", "CHAT_SUGGESTED_REPLIES": "off"})
    model = Billing()
    chat_model = build_model(settings.model,
                             http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(model)))
    store = InMemoryConversationStore(clock=lambda: NOON)
    runner = TurnRunner(settings=settings, store=store,
                        prompt=ChatPrompt(chat_model, functions=[close_ticket]))
    activity = parse_activity(json.dumps({"type": "message", "id": "a1", "text": "close T-1",
                                          "conversation": {"id": "c1"}}).encode(),
                              {"Content-Type": "application/json"})
    # WHEN the turn runs, it pauses: the first call is counted, nothing is stored
    paused = await runner.run(activity, "close T-1", needed=10, stream=None)
    assert isinstance(paused, Paused)
    window = await store.load_window("c1", token_budget=1_000, max_messages=10)
    assert window.spend.tokens_on_day(NOON) == 110 and window.messages == ()
    # AND when it is resumed, approved, it commits, counting the second call only
    (call, _), = paused.paused.held_calls()
    approval = ToolDecision(outcome="approved", at=NOON,
                            arguments_sha256=arguments_sha256(call.arguments))
    done = await runner.run(activity, "", needed=10, stream=None, resume=Resume(
        paused=paused.paused, decisions=decisions_for(paused.paused, approval),
        activity_ids=("a1",)))
    assert isinstance(done, Committed)
    window = await store.load_window("c1", token_budget=1_000, max_messages=10)
    # THEN the conversation counted both calls, once each, and stored the whole turn
    assert window.spend.tokens_on_day(NOON) == 220 and model.calls == 2
    assert [m.role for m in window.messages] == ["user", "assistant", "tool", "assistant"]
    await chat_model.close()
