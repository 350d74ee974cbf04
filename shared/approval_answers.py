"""A person's answer to an approval card, checked and recorded at the webhook, inside the invoke's window.

    Approve / Deny (an `adaptiveCard/action` invoke, or an older client's `Action.Submit`), or a
    plain-text "approve" / "deny" → the conversation's order head → checked → one conditional
    write of the decision on its parked record → a wake-up queued → the answered card

Everything is checked against the parked record of the conversation the answer came from, never
against what the answer says of itself: the decision ID must be the one waiting in *this*
conversation (an answer from another one finds nothing), the arguments hash the one on the card,
the person the one asked (`CHAT_APPROVERS=requester`, the default) and the request neither
expired nor decided. The decision is written with the head's ETag, so of two clicks one records
it and the other is told what was decided; nothing runs twice, and nothing runs here: the drain
resumes the turn (`shared/approvals.py`). A refusal is an invoke error the person can read.
Display names reach the card only, never the log.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal

from . import telemetry
from .activity import Activity
from .approval_card import (
    APPROVE_VERB,
    DENY_VERB,
    ApprovalRequest,
    ShownCall,
    answered_card,
    parse_answer,
)
from .card_actions import ActionError, CardAction, CardReply, ShowCard
from .inbox import Inbox, OrderHead, TurnTicket
from .messages import Outcome, ToolDecision
from .pending import Pending
from .speakers import clean_name

__all__ = ["VERBS", "ApprovalAnswers"]

log = logging.getLogger(__name__)

VERBS = (APPROVE_VERB, DENY_VERB)
_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
KIND = "approval"


@dataclass(frozen=True, kw_only=True)
class _Answer:
    """What an answer says: which request, for which arguments, approve or deny."""

    decision_id: str
    sha256: str | None
    outcome: Literal["approved", "denied"]


class ApprovalAnswers:
    """Records answers to approval cards (the handler of `VERBS`, and of plain-text answers)."""

    def __init__(self, *, inbox: Inbox, clock: Callable[[], float] = time.time) -> None:
        self.inbox = inbox
        self.clock = clock

    async def on_card(self, action: CardAction) -> CardReply:
        """A press of Approve or Deny."""
        decision_id, sha256 = action.data.get("decisionId"), action.data.get("sha256")
        if not isinstance(decision_id, str) or not _ID.match(decision_id) or \
                not isinstance(sha256, str) or not _SHA.match(sha256):
            return ActionError(status=400, code="BadRequest",
                               message="this answer does not name a request; nothing was done")
        answer = _Answer(decision_id=decision_id, sha256=sha256,
                         outcome="approved" if action.verb == APPROVE_VERB else "denied")
        return await self._record(action.activity, answer)

    async def on_text(self, activity: Activity) -> str | None:
        """A message that answers the plain-text question ("approve" or "deny"): what to reply.
        None: not an answer (no request waits here, or the text is not one): an ordinary message."""
        said = parse_answer(activity.message_text)
        if said is None:
            return None
        head = await self.inbox.read_head(activity.conversation_id)
        pending = head.parked if head is not None else None
        if pending is None or pending.kind != KIND or not pending.card_id:
            return None  # nothing was asked (yet): an ordinary message
        reply = await self._record(activity, _Answer(
            decision_id=pending.id, sha256=None,
            outcome="approved" if said == "approve" else "denied"), head=head)
        if isinstance(reply, ActionError):
            return reply.message
        if isinstance(reply, ShowCard):  # its plain text says what was decided
            return str(reply.card.get("fallbackText") or "Noted.")
        return "Noted."

    async def _record(self, activity: Activity, answer: _Answer, *,
                      head: OrderHead | None = None) -> CardReply:
        conversation = activity.conversation_id
        head = head or await self.inbox.read_head(conversation)
        pending = head.parked if head is not None else None
        # Only this conversation's waiting request: an answer from elsewhere finds nothing.
        if pending is None or pending.kind != KIND or pending.id != answer.decision_id:
            log.info("an approval answer for a request that does not wait here; refused")
            return ActionError(status=404, code="NotFound",
                               message="this request is not waiting for an answer in this "
                               "conversation; nothing was done")
        if answer.sha256 is not None and answer.sha256 != pending.detail.get("sha256"):
            log.warning("an approval answer for other arguments than the request's; refused")
            return ActionError(status=400, code="BadRequest",
                               message="this answer is for other arguments than the request; "
                               "nothing was done")
        who = activity.user
        if not pending.detail.get("anyone") and (not who.id or who.id != pending.asked):
            log.info("an approval answer from someone who was not asked; refused")
            return ActionError(status=403, code="Forbidden",
                               message=f"only {pending.asked_name or 'the person who asked'} can "
                               "answer this request")
        now = self.clock()
        name = clean_name(activity.sender.get("name")) or ""

        def decide(current: OrderHead) -> OrderHead | None:
            parked = current.parked
            if parked is None or parked.id != pending.id or not parked.waiting or \
                    parked.expired(now):
                return None
            return replace(current, parked=parked.decide(answer.outcome, by=who.id or "",
                                                          by_name=name, at=now))

        written = await self.inbox.change_head(conversation, decide, read=head)
        if written is None:  # decided meanwhile, expired, or gone: say which
            current = await self.inbox.read_head(conversation)
            now_parked = current.parked if current is not None else None
            if now_parked is None or now_parked.id != pending.id:
                return ActionError(status=404, code="NotFound",
                                   message="this request is no longer waiting for an answer")
            log.info("an approval answer for a request already %s", now_parked.state
                     if not now_parked.waiting else "expired")
            return ShowCard(answered_card(_request(now_parked), _decision(now_parked, now),
                                          again=not now_parked.waiting))
        decided = written.parked
        assert decided is not None
        await self.inbox.enqueue(TurnTicket(conversation_id=conversation,
                                            activity_id=decided.activity_ids[-1],
                                            enqueued_at=time.time(), kind="wake"))
        for _, tool, origin in _tools(decided):
            telemetry.tool_decided(name=tool, origin=origin, reason=KIND, outcome=answer.outcome)
        log.info("approval answer recorded: %s", answer.outcome)
        return ShowCard(answered_card(_request(decided), _decision(decided, now)))


def _tools(pending: Pending) -> list[tuple[str, str, str]]:
    try:
        return [(str(c[0]), str(c[1]), str(c[2])) for c in json.loads(pending.detail["calls"])]
    except (KeyError, ValueError, TypeError, IndexError):
        return []


def _request(pending: Pending) -> ApprovalRequest:
    """The request as the answered card shows it: the tools and where they run (the arguments
    rest with the turn, not on the order head)."""
    return ApprovalRequest(decision_id=pending.id,
                           calls=tuple(ShownCall(tool=tool, origin=origin, arguments="")
                                       for _, tool, origin in _tools(pending)),
                           sha256=pending.detail.get("sha256", ""),
                           expires_at=datetime.fromtimestamp(pending.expires_at, UTC))


def _decision(pending: Pending, now: float) -> ToolDecision:
    outcome: Outcome = "approved" if pending.state == "approved" else \
        "denied" if pending.state == "denied" else \
        "superseded" if pending.state == "superseded" else "expired"
    return ToolDecision(outcome=outcome,
                        at=datetime.fromtimestamp(pending.decided_at or now, UTC),
                        by=pending.decided_by_name or None)
