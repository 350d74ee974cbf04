"""Waiting for a sign-in, durably: a turn parked at a tool call until its user signs in.

    the model calls a tool that acts as the user, who is not signed in → the turn pauses before
    the round runs (`shared/prompt.py`, a held call of reason `signin`) → `park`: a `Pending`
    record (who must sign in, to which connection, until when, each held call's arguments hash)
    and the turn so far → the drain parks it (`shared/order.py`) → `ask`: the OAuth card
    (`shared/signin.py`: in a group chat, to the person's one-to-one chat) → no worker waits →
    the user signs in (Teams' silent exchange, the button's page and its code, a typed code):
    the webhook decides the parked turn and wakes the drain (`SignIn._wake`) → `resume`: the
    held round runs (each call once, `RunOnceJournal`), now with the user's token, and the turn
    goes on with the model and is answered; or `close` (expired, or a newer message came first):
    nothing runs and the turn so far is stored with the calls declined.

The record holds no token: the resumed turn asks the token service again (`shared/user_tokens.py`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from .activity import Activity
from .approvals import RunOnceJournal, RunResumed, SavedTurn, store_declined
from .errors import ChatstateError
from .inbox import Inbox
from .messages import Outcome, ToolDecision
from .order import Answered, Unit, UnitOutcome
from .order import Paused as Parked
from .pause import PausedTurn, arguments_sha256
from .pending import Pending
from .settings import Settings
from .signin import SIGN_IN, SignIn
from .speakers import clean_name
from .store import ConversationStore
from .tokens import count_message_tokens
from .tools import Function
from .turn import Resume

__all__ = ["KIND", "SignIns"]

log = logging.getLogger(__name__)

KIND = SIGN_IN


class SignIns:
    """The waiter of turns parked until their user signs in (`kind` "signin")."""

    kind = KIND
    #: How a paused turn's stream ends (the card follows as its own message).
    note = "Before I go on, I need you to sign in."

    def __init__(self, *, settings: Settings, store: ConversationStore, inbox: Inbox,
                 signin: SignIn, tools: Callable[[], Awaitable[dict[str, Function]]],
                 run_resumed: RunResumed, clock: Callable[[], float] = time.time) -> None:
        """`tools`: the turn's tools by name (which connection each needs); `run_resumed`: runs a
        resumed turn and delivers its answer (`Answerer.answer_resumed`)."""
        self.settings = settings
        self.store = store
        self.inbox = inbox
        self.signin = signin
        self.tools = tools
        self.run_resumed = run_resumed
        self.clock = clock

    async def park(self, paused: PausedTurn, activity: Activity) -> Parked:
        """The record and saved state of a turn that paused answering `activity` (its last
        message) until its sender signs in to the held calls' connection."""
        functions = await self.tools()
        held = [call for call, _ in paused.held_calls()]
        connections = [access.connection for call in held
                       if (function := functions.get(call.name)) is not None
                       and (access := function.as_user) is not None]
        sender = activity.user
        pending = Pending(
            kind=KIND, activity_ids=(activity.id,), asked=sender.id or "",
            asked_name=clean_name(activity.sender.get("name")) or "",
            expires_at=self.clock() + self.settings.signin.wait_seconds,
            detail={"connection": connections[0] if connections else "",
                    "calls": json.dumps([[call.id, arguments_sha256(call.arguments)]
                                         for call in held])})
        return Parked(pending=pending, saved=SavedTurn(paused=paused, ran={}).to_bytes())

    async def ask(self, unit: Unit, pending: Pending, activity: Activity) -> Pending:
        """Send the OAuth card, noted as the sign-in this parked turn waits for."""
        for kept in unit.kept:  # the paused turn's stream ended with a note: not to be resumed
            if kept.stream is not None:
                await self.inbox.forget_stream(unit.conversation_id, kept.activity_id)
        connection = pending.detail.get("connection", "")
        if connection not in self.signin.connections:
            log.warning("a parked sign-in names no connection of ours; it waits until it expires")
            return pending
        try:
            await self.signin.ask(activity, connection, parked_id=pending.id,
                                  expires_at=datetime.fromtimestamp(pending.expires_at, UTC))
        except ChatstateError as exc:  # the token service or the connector: the turn still waits
            log.warning("the sign-in card was not sent (%s); the turn waits until it expires",
                        type(exc).__name__)
            return pending
        return replace(pending, card_id="sent")

    async def resume(self, unit: Unit, pending: Pending, activities: Sequence[Activity],
                     saved: bytes) -> UnitOutcome:
        """The user signed in: run the held round (with their token now), go on with the turn."""
        state = _read(saved)
        if state is None or not activities:
            return Answered()
        # The hashes are the record's (what was held); a saved call whose arguments differ
        # (the saved turn changed under us) gets none, so it does not run.
        hashes = _hashes(pending)
        decision = ToolDecision(outcome="approved", reason=KIND,
                                at=datetime.fromtimestamp(pending.decided_at or self.clock(), UTC),
                                by=pending.asked_name or None, by_id=pending.decided_by or None)
        decisions = {held.call_id: replace(decision, arguments_sha256=hashes.get(held.call_id))
                     for held in state.paused.held}
        journal = RunOnceJournal(inbox=self.inbox, conversation_id=unit.conversation_id,
                                 activity_id=unit.activity_ids[-1], pending_id=pending.id,
                                 saved=state)
        resume = Resume(paused=state.paused, decisions=decisions, activity_ids=unit.activity_ids,
                        run_once=journal)
        needed = sum(count_message_tokens(message) for message in state.paused.messages)
        log.info("the user signed in; the parked turn goes on")
        return await self.run_resumed(unit, activities, resume, needed)

    async def close(self, unit: Unit, pending: Pending, activities: Sequence[Activity],
                    saved: bytes, *, why: str) -> None:
        """Expired or superseded: nothing runs; the turn so far is stored with the held calls
        declined (the model reads that the user did not sign in)."""
        state = _read(saved)
        outcome: Outcome = "superseded" if why == "superseded" else "expired"
        if state is not None:
            await store_declined(self.store, unit, state.paused,
                                 ToolDecision(outcome=outcome, reason=KIND,
                                              at=datetime.fromtimestamp(self.clock(), UTC)),
                                 attempts=self.settings.turn_max_attempts)
        log.info("a sign-in was waited for and %s; nothing ran", outcome)


def _read(saved: bytes) -> SavedTurn | None:
    try:
        return SavedTurn.from_bytes(saved)
    except ValueError as exc:
        log.warning("a parked turn could not be read (%s); dropped", exc)
        return None


def _hashes(pending: Pending) -> dict[str, str]:
    """The arguments hash of each held call, as the record says."""
    try:
        return {str(call_id): str(sha) for call_id, sha in
                json.loads(pending.detail.get("calls", "[]"))}
    except (ValueError, TypeError):
        return {}
