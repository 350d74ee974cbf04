"""Ask before acting, durably: a turn parked at an `ask` tool call until a person answers.

    the model calls an `ask` tool → the turn pauses (`shared/pause.py`) → `park`: a `Pending`
    record (who is asked, until when, each held call's tool and arguments hash) and the turn so
    far → the drain parks it (`shared/order.py`: the record on the order head, the turn with the
    activity's inbox row) → `ask`: the card (`shared/approval_card.py`), or its plain text where
    the channel has no Adaptive Cards → no worker waits → the webhook records the answer
    (`shared/approval_answers.py`) and wakes the drain → `resume`: the held round runs as decided
    and the turn goes on with the model, is committed and answered; or `close` (expired, or a
    newer message came first): nothing runs, the turn so far is stored with each call declined,
    and the card says so.

Exactly once: `resume` runs each call of the held round through `RunOnceJournal`. Before a call
runs, a `running` mark goes on the order head with a conditional write (two workers cannot both
write it: the loser sees the mark); after, its result is saved with the turn. A retry finds the
result and uses it; a mark without a result (the worker died while the call ran) is reported to
the model as "not known whether it ran", never run again. The hash a person approved is read from
the order head and checked against the arguments read from the inbox row, where the call is made.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from . import telemetry
from .activity import Activity
from .approval_card import ApprovalRequest, ShownCall, answered_card, approval_card, fallback_text
from .card_actions import card_attachment
from .connector import BotConnector
from .errors import ConnectorError, ConversationConflict, DuplicateActivity
from .inbox import Inbox
from .messages import ChatMessage, Outcome, ToolCall, ToolDecision, Usage
from .order import Answered, Unit, UnitOutcome
from .order import Paused as Parked
from .pause import PausedTurn, arguments_sha256, declined_reason, round_sha256
from .pending import Pending
from .settings import Settings
from .speakers import clean_name
from .store import ConversationStore
from .tokens import count_message_tokens
from .tools import Function, Source, ToolResult
from .turn import Resume

__all__ = ["KIND", "Approvals", "RunOnceJournal", "SavedTurn", "card_channels"]

log = logging.getLogger(__name__)

KIND = "approval"
#: Channels that show Adaptive Cards with Universal Actions (`Action.Execute`); the Agents
#: Playground speaks as Teams. Others get the plain-text question.
card_channels = frozenset({"msteams"})
NOT_KNOWN = ("not known whether this call ran: the worker running it stopped before its result "
             "came back; it was not run again")
NOT_RUN = "not run: this round of calls waited for a person's answer, which did not come"
#: What a resumed turn is told to run (`Answerer.answer_resumed`).
RunResumed = Callable[[Unit, Sequence[Activity], Resume, int], Awaitable[UnitOutcome]]


@dataclass(frozen=True, kw_only=True)
class SavedTurn:
    """What rests with the parked activity's inbox row: the turn so far, and the results of the
    held round's calls that ran (by call ID)."""

    paused: PausedTurn
    ran: Mapping[str, ToolResult]

    def to_bytes(self) -> bytes:
        return json.dumps({"turn": self.paused.to_json(),
                           "ran": {call_id: _result_json(result) for call_id, result in
                                   self.ran.items()}}, ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SavedTurn:
        """Read back: ValueError for anything that is not a saved turn."""
        try:
            parsed = json.loads(data)
            ran = parsed.get("ran") or {}
            if not isinstance(ran, dict):
                raise ValueError("ran must be an object")
            return cls(paused=PausedTurn.from_json(parsed.get("turn")),
                       ran={str(call_id): _result(item) for call_id, item in ran.items()})
        except (AttributeError, TypeError, KeyError) as exc:
            raise ValueError(f"not a saved turn: {type(exc).__name__}") from None


class RunOnceJournal:
    """Runs each call of a resumed round at most once, across attempts and workers."""

    def __init__(self, *, inbox: Inbox, conversation_id: str, activity_id: str, pending_id: str,
                 saved: SavedTurn) -> None:
        self._inbox = inbox
        self._conversation_id = conversation_id
        self._activity_id = activity_id
        self._pending_id = pending_id
        self._saved = saved

    async def __call__(self, call: ToolCall,
                       run: Callable[[], Awaitable[ToolResult]]) -> ToolResult:
        recorded = self._saved.ran.get(call.id)
        if recorded is not None:
            log.info("a call of the resumed round ran before; its recorded result is used")
            return recorded
        if not await self._mark(call.id):
            log.warning("a call of the resumed round was started before and its result is not "
                        "known; not run again")
            return ToolResult(text=json.dumps({"error": NOT_KNOWN}), failed=True)
        result = await run()
        self._saved = replace(self._saved, ran={**self._saved.ran, call.id: result})
        await self._inbox.save_turn(self._conversation_id, self._activity_id,
                                    self._saved.to_bytes())
        return result

    async def _mark(self, call_id: str) -> bool:
        """Write the call's `running` mark on the parked record: False when it is there already
        (another attempt started the call) or the record is gone."""
        key = f"ran:{call_id}"

        def mark(head: Any) -> Any:
            parked = head.parked
            if parked is None or parked.id != self._pending_id or key in parked.detail:
                return None
            return replace(head, parked=replace(parked, detail={**parked.detail, key: "running"}))

        return await self._inbox.change_head(self._conversation_id, mark) is not None


class Approvals:
    """The waiter of parked approvals (`kind` "approval") for the conversation's order."""

    kind = KIND

    def __init__(self, *, settings: Settings, store: ConversationStore, inbox: Inbox,
                 connector: BotConnector, tools: Callable[[], Awaitable[dict[str, Function]]],
                 run_resumed: RunResumed, clock: Callable[[], float] = time.time) -> None:
        """`tools`: the turn's tools by name (where each runs, for the card); `run_resumed`:
        runs a resumed turn and delivers its answer (`Answerer.answer_resumed`)."""
        self.settings = settings
        self.store = store
        self.inbox = inbox
        self.connector = connector
        self.tools = tools
        self.run_resumed = run_resumed
        self.clock = clock

    # -- pausing ---------------------------------------------------------------------------------

    async def park(self, paused: PausedTurn, activity: Activity) -> Parked:
        """The record and saved state of a turn that paused answering `activity` (its last
        message): the person asked is its sender."""
        functions = await self.tools()
        calls = [[call.id, call.name, functions[call.name].origin if call.name in functions
                  else "unknown", arguments_sha256(call.arguments)] for call, _ in paused.held_calls()]
        sender = activity.user
        pending = Pending(
            kind=KIND, activity_ids=(activity.id,), asked=sender.id or "",
            asked_name=clean_name(activity.sender.get("name")) or "",
            expires_at=self.clock() + self.settings.approvals.expiry_seconds,
            detail={"calls": json.dumps(calls),
                    "sha256": round_sha256([call for call, _ in paused.held_calls()]),
                    "anyone": "" if self.settings.approvals.requester_only else "1",
                    "group": "1" if activity.in_group else ""})
        return Parked(pending=pending, saved=SavedTurn(paused=paused, ran={}).to_bytes())

    # -- the waiter ------------------------------------------------------------------------------

    async def ask(self, unit: Unit, pending: Pending, activity: Activity) -> Pending:
        """Send the card (or its plain text); the record with the message's ID (`card_id`)."""
        for kept in unit.kept:  # the paused turn's stream ended with a note: not to be resumed
            if kept.stream is not None:
                await self.inbox.forget_stream(unit.conversation_id, kept.activity_id)
        saved = await self._saved(unit)
        if saved is None:
            return pending
        request = self._request(pending, saved.paused)
        if activity.channel_id in card_channels:
            outgoing = {**activity.reply("", ai=False),
                        "attachments": [card_attachment(approval_card(request))]}
        else:
            outgoing = {**activity.reply(fallback_text(request), ai=False), "textFormat": "plain"}
        try:
            sent = await self.connector.send(service_url=activity.service_url,
                                             conversation_id=activity.conversation_id,
                                             activity=outgoing)
        except ConnectorError as exc:
            log.warning("the approval card was not sent (%s); the request waits until it "
                        "expires", type(exc).__name__)
            return pending
        log.info("asked for approval of %d call(s)", len(request.calls))
        return replace(pending, card_id=sent or "sent")

    async def resume(self, unit: Unit, pending: Pending, activities: Sequence[Activity],
                     saved: bytes) -> UnitOutcome:
        """The person answered: run the held round as they decided, go on with the turn."""
        state = _read(saved)
        if state is None or not activities:
            return Answered()
        decision = ToolDecision(outcome="approved" if pending.state == "approved" else "denied",
                                at=datetime.fromtimestamp(pending.decided_at or self.clock(), UTC),
                                by=pending.decided_by_name or None, by_id=pending.decided_by or None)
        approved = _approved_hashes(pending)
        if round_sha256([call for call, _ in state.paused.held_calls()]) != \
                pending.detail.get("sha256"):
            # The saved calls (names, arguments) are not those the person was shown: none runs.
            log.warning("a resumed turn's calls differ from the approved ones; none runs")
            approved = {}
        decisions = {held.call_id: replace(decision, arguments_sha256=approved.get(held.call_id))
                     for held in state.paused.held}
        await self._refresh(activities[-1], pending, state.paused, decision)
        journal = RunOnceJournal(inbox=self.inbox, conversation_id=unit.conversation_id,
                                 activity_id=unit.activity_ids[-1], pending_id=pending.id,
                                 saved=state)
        resume = Resume(paused=state.paused, decisions=decisions, activity_ids=unit.activity_ids,
                        run_once=journal)
        needed = sum(count_message_tokens(message) for message in state.paused.messages)
        return await self.run_resumed(unit, activities, resume, needed)

    async def close(self, unit: Unit, pending: Pending, activities: Sequence[Activity],
                    saved: bytes, *, why: str) -> None:
        """Expired or superseded: nothing runs; the turn so far is stored with every call of the
        held round declined (so the model reads what happened), and the card says so."""
        state = _read(saved)
        outcome: Outcome = "superseded" if why == "superseded" else "expired"
        decision = ToolDecision(outcome=outcome, at=datetime.fromtimestamp(self.clock(), UTC))
        if state is not None:
            await self._store_declined(unit, state.paused, decision)
            if activities:
                await self._refresh(activities[-1], pending, state.paused, decision)
        for name, origin in _tools_of(pending):
            telemetry.tool_decided(name=name, origin=origin, reason=KIND, outcome=outcome)
        log.info("an approval request %s; nothing ran", outcome)

    # -- the parts -------------------------------------------------------------------------------

    def _request(self, pending: Pending, paused: PausedTurn) -> ApprovalRequest:
        origins = {call_id: origin for call_id, _, origin, _ in _calls(pending)}
        shown = tuple(ShownCall(tool=call.name, origin=origins.get(call.id, "unknown"),
                                arguments=call.arguments) for call, _ in paused.held_calls())
        return ApprovalRequest(decision_id=pending.id, calls=shown,
                               sha256=pending.detail.get("sha256", ""),
                               expires_at=datetime.fromtimestamp(pending.expires_at, UTC),
                               requester=_requester(pending))

    async def _refresh(self, activity: Activity, pending: Pending, paused: PausedTurn,
                       decision: ToolDecision) -> None:
        """Show everyone the card's new state (its buttons gone); a failure costs only that."""
        if not pending.card_id or pending.card_id == "sent" or \
                activity.channel_id not in card_channels:
            return
        card = answered_card(self._request(pending, paused), decision)
        outgoing = {**activity.reply("", ai=False), "attachments": [card_attachment(card)]}
        try:
            await self.connector.update(service_url=activity.service_url,
                                        conversation_id=activity.conversation_id,
                                        activity_id=pending.card_id, activity=outgoing)
        except ConnectorError as exc:
            log.info("the approval card was not refreshed (%s)", type(exc).__name__)

    async def _store_declined(self, unit: Unit, paused: PausedTurn,
                              decision: ToolDecision) -> None:
        held = {h.call_id for h in paused.held}
        results = [ChatMessage(role="tool", tool_call_id=call.id, name=call.name,
                               content=json.dumps({"error": declined_reason(decision, call)
                                                   if call.id in held else NOT_RUN}),
                               decision=decision if call.id in held else None)
                   for call in paused.round]
        messages = (*paused.messages, *results)
        first, last = unit.activity_ids[0], unit.activity_ids[-1]
        for _ in range(self.settings.turn_max_attempts):
            window = await self.store.load_window(unit.conversation_id, token_budget=0,
                                                  max_messages=1, activity_id=first)
            if window.committed_activity:
                return
            try:
                await self.store.commit_turn(window, activity_id=last, messages=messages,
                                             billed=Usage(), more_activity_ids=unit.activity_ids[:-1])
            except ConversationConflict:
                continue
            except DuplicateActivity:
                return
            await self.store.mark_delivered(unit.conversation_id, last, reply_id=None)
            return
        raise ConversationConflict("the declined turn was not stored: other turns kept committing")

    async def _saved(self, unit: Unit) -> SavedTurn | None:
        data = await self.inbox.load_turn(unit.conversation_id, unit.activity_ids[-1])
        return _read(data) if data is not None else None


def _requester(pending: Pending) -> str | None:
    """Whom the card names as the one who may answer: a group chat's requester, unless anyone
    may (a personal chat has only them)."""
    if pending.detail.get("anyone") or pending.detail.get("group") != "1":
        return None
    return pending.asked_name or "the person who asked"


def _read(saved: bytes) -> SavedTurn | None:
    try:
        return SavedTurn.from_bytes(saved)
    except ValueError as exc:
        log.warning("a parked turn could not be read (%s); dropped", exc)
        return None


def _calls(pending: Pending) -> list[tuple[str, str, str, str]]:
    """The held calls a record names: (call ID, tool, origin, arguments SHA-256)."""
    try:
        calls = json.loads(pending.detail.get("calls", "[]"))
        return [(str(c[0]), str(c[1]), str(c[2]), str(c[3])) for c in calls]
    except (ValueError, TypeError, IndexError):
        return []


def _approved_hashes(pending: Pending) -> dict[str, str]:
    """The arguments hash of each held call, as the record (what the person saw) says."""
    if pending.state != "approved":
        return {}
    return {call_id: sha for call_id, _, _, sha in _calls(pending)}


def _tools_of(pending: Pending) -> list[tuple[str, str]]:
    return [(tool, origin) for _, tool, origin, _ in _calls(pending)]


def _result_json(result: ToolResult) -> dict[str, Any]:
    return {"text": result.text, "failed": result.failed,
            "sources": [{"title": s.title, "url": s.url, "snippet": s.snippet}
                        for s in result.sources]}


def _result(data: Any) -> ToolResult:
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise ValueError("a recorded result needs its text")
    sources = data.get("sources") or []
    return ToolResult(text=data["text"], failed=bool(data.get("failed")),
                      sources=tuple(Source(title=str(s.get("title") or ""), url=s.get("url"),
                                           snippet=str(s.get("snippet") or ""))
                                    for s in sources if isinstance(s, dict)))


