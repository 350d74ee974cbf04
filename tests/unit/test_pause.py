"""The paused turn's JSON form: it survives storage whole, and what is read back is checked."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from shared.messages import Attachment, ChatMessage, Citation, Sender, ToolCall, ToolDecision, Usage
from shared.pause import HeldCall, PausedTurn, arguments_sha256, declined_reason, round_sha256
from shared.tools import Source

AT = datetime(2026, 3, 4, 14, 5, tzinfo=UTC)
CALL = ToolCall(id="c2", name="delete_notes", arguments='{"topic": "drafts"}')


def paused() -> PausedTurn:
    return PausedTurn(
        messages=(
            ChatMessage(role="user", content="delete my drafts", name="Ada", activity_id="a1",
                        sender=Sender(id="u1", aad_id="aad-1"), timestamp=AT,
                        attachments=(Attachment(name="x.txt", content_type="text/plain", size=3),)),
            ChatMessage(role="assistant", content=None, timestamp=AT, model="m",
                        tool_calls=(ToolCall(id="c1", name="search_docs", arguments="{}"),)),
            ChatMessage(role="tool", content="found", tool_call_id="c1", name="search_docs",
                        timestamp=AT, citations=(Citation(position=1, title="t"),)),
            ChatMessage(role="assistant", content=None, timestamp=AT, model="m", tool_calls=(CALL,),
                        usage=Usage(prompt_tokens=5, completion_tokens=2))),
        held=(HeldCall(call_id="c2", reason="approval"),), usage=Usage(prompt_tokens=9),
        model="m", sources=(Source(title="Doc", url="https://example.com/doc", snippet="s"),),
        rounds=1)


def test_a_paused_turn_survives_json_whole() -> None:
    # GIVEN a paused turn WHEN it goes through JSON text and back THEN nothing is lost
    original = paused()
    assert PausedTurn.from_json(json.loads(json.dumps(original.to_json()))) == original


@pytest.mark.parametrize(("change", "reason"), [
    (lambda d: d.update(format=2), "known format"),
    (lambda d: d["messages"][0].update(role="system-override"), "known role"),
    (lambda d: d["messages"][0].update(content=7), "content must be text"),
    (lambda d: d.update(held=[{"callId": "not-in-the-round", "reason": "approval"}]),
     "every held call"),
    (lambda d: d.update(held=[]), "every held call"),
    (lambda d: d["messages"].pop(), "ends with the assistant message"),
    (lambda d: d.update(rounds=-1), "rounds must be a whole number"),
    (lambda d: d["messages"][2].update(decision={"outcome": "approved-by-me", "at": "x"}),
     "not a decision outcome"),
    (lambda d: d.pop("usage"), "not a paused turn"),
])
def test_a_paused_turn_read_back_is_checked(change: Any, reason: str) -> None:
    # GIVEN a stored paused turn, altered
    data = json.loads(json.dumps(paused().to_json()))
    change(data)
    # WHEN it is read back THEN it is refused, saying why
    with pytest.raises(ValueError, match=reason):
        PausedTurn.from_json(data)


def test_only_an_approval_of_exactly_these_arguments_lets_a_held_call_run() -> None:
    approval = ToolDecision(outcome="approved", at=AT, arguments_sha256=arguments_sha256(CALL.arguments))
    assert declined_reason(approval, CALL) is None
    # a single space of difference is another call
    other = ToolCall(id="c2", name="delete_notes", arguments='{"topic":  "drafts"}')
    assert declined_reason(approval, other) == "not run: the approval was for other arguments"
    assert declined_reason(None, CALL) == "not run: nobody has answered for this call"
    # and a round's hash changes with any call's name or arguments, or their order
    first, second = CALL, ToolCall(id="c3", name="add", arguments="{}")
    assert len({round_sha256([first, second]), round_sha256([second, first]),
                round_sha256([first]), round_sha256([other, second])}) == 4
