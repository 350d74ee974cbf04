"""Ask before acting against a real Azurite: answers recorded with one conditional write of the
order head (many clicks, one decision), and a resumed round's calls run at most once however many
workers try (the running mark, then the recorded result)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, cast

import pytest

from shared.activity import parse_activity
from shared.approval_answers import ApprovalAnswers
from shared.approval_card import APPROVE_VERB, DENY_VERB
from shared.approvals import NOT_KNOWN, RunOnceJournal, SavedTurn
from shared.card_actions import ActionError, CardAction, ShowCard
from shared.inbox import Inbox, OrderHead
from shared.messages import ChatMessage, ToolCall, Usage
from shared.order import Conductor, Unit, Wait, _Hold, plan
from shared.pause import HeldCall, PausedTurn, arguments_sha256, round_sha256
from shared.pending import Pending
from shared.tools import ToolResult

CALL = ToolCall(id="c1", name="delete_notes", arguments='{"topic": "drafts"}')


@pytest.fixture
async def inbox(azurite_connection_string: str) -> AsyncIterator[Inbox]:
    box = Inbox.from_connection_string(azurite_connection_string,
                                       table_name="t" + uuid.uuid4().hex[:16],
                                       queue_name=f"q-{uuid.uuid4().hex[:12]}")
    try:
        yield box
    finally:
        await box.close()


def paused() -> PausedTurn:
    return PausedTurn(messages=(ChatMessage(role="user", content="delete my drafts"),
                                ChatMessage(role="assistant", tool_calls=(CALL,))),
                      held=(HeldCall(call_id="c1"),), usage=Usage(prompt_tokens=3), model="m")


async def parked(inbox: Inbox, conversation: str, *, expires_in: float = 600.0) -> Pending:
    """A conversation whose order head holds a waiting approval of CALL, asked of user-1."""
    pending = Pending(kind="approval", activity_ids=("a1",), asked="29:user-1", asked_name="Ada",
                      expires_at=time.time() + expires_in,
                      detail={"calls": json.dumps([["c1", "delete_notes", "mcp:demo",
                                                     arguments_sha256(CALL.arguments)]]),
                              "sha256": round_sha256([CALL])}, card_id="reply-1")
    await inbox.accept(b'{"type":"message"}', conversation_id=conversation, activity_id="a1")
    written = await inbox.change_head(conversation, lambda head: replace(head, parked=pending))
    assert written is not None
    return pending


def click(conversation: str, verb: str, pending: Pending, *, user: str = "29:user-1",
          sha256: str | None = None) -> CardAction:
    activity = parse_activity(json.dumps({
        "type": "invoke", "name": "adaptiveCard/action", "id": uuid.uuid4().hex,
        "conversation": {"id": conversation}, "from": {"id": user, "name": "Ada"},
        "value": {}}).encode(), {"Content-Type": "application/json"})
    return CardAction(verb=verb, activity=activity,
                      data={"decisionId": pending.id, "sha256": sha256 or pending.detail["sha256"]})


async def test_of_many_clicks_at_once_one_records_the_decision(inbox: Inbox) -> None:
    # GIVEN a waiting request
    conversation = f"a:{uuid.uuid4().hex}"
    pending = await parked(inbox, conversation)
    answers = ApprovalAnswers(inbox=inbox)
    # WHEN ten presses of Approve and Deny arrive at once
    replies = await asyncio.gather(*(answers.on_card(click(
        conversation, APPROVE_VERB if n % 2 else DENY_VERB, pending)) for n in range(10)))
    # THEN exactly one recorded a decision; the others were told it was already decided
    first = [r for r in replies if isinstance(r, ShowCard) and "Already decided" not in json.dumps(r.card)]
    again = [r for r in replies if isinstance(r, ShowCard) and "Already decided" in json.dumps(r.card)]
    assert len(first) == 1 and len(again) == 9
    head = await inbox.read_head(conversation)
    assert head is not None and head.parked is not None and head.parked.decided
    assert head.parked.decided_by == "29:user-1" and head.parked.decided_by_name == "Ada"
    # AND one wake-up was queued for the drain
    messages = [m async for m in inbox.queue.receive_messages(max_messages=32)]
    wakes = [json.loads(bytes(m.content)) for m in messages]
    assert [w["kind"] for w in wakes if w["activityId"] == "a1"].count("wake") == 1


async def test_an_expired_request_is_not_decided(inbox: Inbox) -> None:
    # GIVEN a request that expired a second ago
    conversation = f"a:{uuid.uuid4().hex}"
    pending = await parked(inbox, conversation, expires_in=-1.0)
    # WHEN Approve is pressed THEN the card says it expired, and nothing is recorded
    reply = await ApprovalAnswers(inbox=inbox).on_card(click(conversation, APPROVE_VERB, pending))
    assert isinstance(reply, ShowCard) and "Expired" in json.dumps(reply.card)
    head = await inbox.read_head(conversation)
    assert head is not None and head.parked is not None and head.parked.waiting


@pytest.mark.parametrize(("change", "status"), [
    ({"user": "29:mallory"}, 403),
    ({"sha256": "f" * 64}, 400),
])
async def test_an_answer_that_does_not_match_the_request_is_refused(
        inbox: Inbox, change: dict[str, Any], status: int) -> None:
    # GIVEN a waiting request
    conversation = f"a:{uuid.uuid4().hex}"
    pending = await parked(inbox, conversation)
    # WHEN an answer from someone else, or for other arguments, arrives
    reply = await ApprovalAnswers(inbox=inbox).on_card(click(conversation, APPROVE_VERB, pending,
                                                             **change))
    # THEN it is refused, and the request still waits
    assert isinstance(reply, ActionError) and reply.status == status
    head = await inbox.read_head(conversation)
    assert head is not None and head.parked is not None and head.parked.waiting


async def test_a_resumed_call_runs_once_however_many_workers_try(inbox: Inbox) -> None:
    # GIVEN a decided request, and a call that takes a moment
    conversation = f"a:{uuid.uuid4().hex}"
    pending = await parked(inbox, conversation)
    saved = SavedTurn(paused=paused(), ran={})
    await inbox.save_turn(conversation, "a1", saved.to_bytes())
    runs = 0

    async def run() -> ToolResult:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.2)
        return ToolResult(text="deleted")

    def journal(state: SavedTurn) -> RunOnceJournal:
        return RunOnceJournal(inbox=inbox, conversation_id=conversation, activity_id="a1",
                              pending_id=pending.id, saved=state)

    # WHEN five workers resume the same round at once
    results = await asyncio.gather(*(journal(saved)(CALL, run) for _ in range(5)))
    # THEN the call ran once; the others did not run it (its result not known yet to them)
    assert runs == 1
    assert sorted(r.text for r in results) == ["deleted", *[json.dumps({"error": NOT_KNOWN})] * 4]
    # AND a later attempt finds the recorded result and does not run it either
    stored = await inbox.load_turn(conversation, "a1")
    assert stored is not None
    later = await journal(SavedTurn.from_bytes(stored))(CALL, run)
    assert later.text == "deleted" and runs == 1


async def test_a_journal_for_a_request_no_longer_parked_runs_nothing(inbox: Inbox) -> None:
    # GIVEN a conversation whose parked request is gone (closed by another worker)
    conversation = f"a:{uuid.uuid4().hex}"
    pending = await parked(inbox, conversation)
    await inbox.change_head(conversation, lambda head: replace(head, parked=None))
    ran = []

    async def run() -> ToolResult:
        ran.append(1)
        return ToolResult(text="deleted")

    # WHEN a late worker resumes it THEN nothing runs
    result = await RunOnceJournal(inbox=inbox, conversation_id=conversation, activity_id="a1",
                                  pending_id=pending.id, saved=SavedTurn(paused=paused(), ran={}))(
        CALL, run)
    assert ran == [] and result.failed
    head = await inbox.read_head(conversation)
    assert isinstance(head, OrderHead) and head.parked is None


async def test_decisions_are_counted_by_outcome_without_the_arguments(
        inbox: Inbox, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN telemetry on, into memory, message capture off, and a waiting request
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    from shared import telemetry

    reader = InMemoryMetricReader()
    monkeypatch.setattr(telemetry, "state", telemetry.Telemetry.using(
        tracer_provider=TracerProvider(), meter_provider=MeterProvider(metric_readers=[reader])))
    conversation = f"a:{uuid.uuid4().hex}"
    pending = await parked(inbox, conversation)
    # WHEN it is denied
    await ApprovalAnswers(inbox=inbox).on_card(click(conversation, DENY_VERB, pending))
    # THEN one denial of delete_notes (mcp:demo) is counted, and no argument reached the metric
    data = reader.get_metrics_data()
    assert data is not None
    points = [(dict(p.attributes or {}), p.value) for r in data.resource_metrics
              for s in r.scope_metrics for m in s.metrics if m.name == "chatstate.tool.decisions"
              for p in m.data.data_points]
    assert points == [({"gen_ai.tool.name": "delete_notes", "chatstate.tool.origin": "mcp:demo",
                        "chatstate.decision.reason": "approval",
                        "chatstate.decision.outcome": "denied"}, 1)]
    assert "drafts" not in str(data)


async def test_a_saved_turn_whose_calls_are_not_the_approved_ones_runs_none(
        inbox: Inbox, table_store: Any) -> None:
    # GIVEN an approval of delete_notes(drafts), and a saved turn altered in storage to call
    # another tool with the same arguments
    from shared.approvals import Approvals
    from shared.connector import BotConnector
    from shared.inbox import Kept
    from shared.order import Unit
    from shared.pause import declined_reason
    from shared.settings import load_settings
    from shared.turn import Resume

    conversation = f"a:{uuid.uuid4().hex}"
    pending = (await parked(inbox, conversation)).decide("approved", by="29:user-1",
                                                        by_name="Ada", at=time.time())
    forged = ToolCall(id="c1", name="wipe_database", arguments=CALL.arguments)
    saved = SavedTurn(paused=replace(paused(), messages=(
        paused().messages[0], ChatMessage(role="assistant", tool_calls=(forged,)))), ran={})
    resumed: list[Resume] = []

    async def run_resumed(unit: Unit, activities: Any, resume: Resume, needed: int) -> Any:
        resumed.append(resume)
        return None

    async def tools() -> dict[str, Any]:
        return {}

    approvals = Approvals(settings=load_settings({}), store=table_store, inbox=inbox,
                          connector=BotConnector(credential=None), tools=tools,
                          run_resumed=run_resumed)
    activity = parse_activity(json.dumps({"type": "message", "id": "a1", "channelId": "test",
                                          "conversation": {"id": conversation}}).encode(),
                              {"Content-Type": "application/json"})
    # WHEN the drain resumes it
    await approvals.resume(Unit(conversation_id=conversation, kind="parked",
                                kept=(Kept(activity_id="a1", seq=1),), parked=pending),
                           pending, [activity], saved.to_bytes())
    # THEN the call goes to the model declined: its approval was for another call
    (resume,) = resumed
    assert declined_reason(resume.decisions["c1"], forged) == \
        "not run: the approval was for other arguments"


async def test_an_answer_recorded_as_the_drain_lets_go_keeps_the_drain_answering(
        inbox: Inbox) -> None:
    # GIVEN a drain holding a conversation whose turn it has just parked: its plan, from the head
    # it last read, is to wait for the person
    conversation = f"a:{uuid.uuid4().hex}"
    pending = await parked(inbox, conversation)
    conductor = Conductor(inbox=inbox, answerer=cast(Any, None))
    held = await inbox.change_head(conversation, lambda head: replace(
        head, holder="drain-1", held_until=time.time() + 30))
    assert held is not None
    kept = await inbox.waiting(conversation)
    step = plan(kept, held, now=time.time(), burst=True, max_burst=8)
    assert isinstance(step, Wait) and not step.wake
    # WHEN the person approves before the drain lets go
    reply = await ApprovalAnswers(inbox=inbox).on_card(click(conversation, APPROVE_VERB, pending))
    assert isinstance(reply, ShowCard)
    released = await _Hold(conductor, held, "drain-1").release(kept, step, planned_with=held)
    # THEN the drain keeps the conversation (its wake-up would wait for the hold to end), and
    # the head it reads again plans the approved turn
    assert released is False
    head = await inbox.read_head(conversation)
    assert head is not None and head.holder == "drain-1"
    assert isinstance(plan(kept, head, now=time.time(), burst=True, max_burst=8), Unit)
