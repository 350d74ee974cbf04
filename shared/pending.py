"""A turn waiting for a person: what was asked, of whom, until when, and what they decided.

A turn that must wait for a person (an `ask` tool's approval, a sign-in) is parked in its
conversation's order (`shared/order.py`): this record rides on the inbox's order head, so a
decision is one conditional write there, and the turn so far is kept with the parked activity's
row (`Inbox.save_turn`). Nothing in it is text from outside but `asked_name` (a display name,
shown on the card) and `detail` values we wrote (a tool's name, an arguments hash, a connection
name); none of it is logged.

    waiting ──decide──▶ approved | denied | signed_in      (the drain resumes the turn)
       │
       ├──expires_at passes──▶ expired                       (closed: nothing runs)
       └──a newer message arrives──▶ superseded              (closed: nothing runs)
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Self, cast

__all__ = ["DECIDED", "Decision", "Pending", "PendingState"]

PendingState = Literal["waiting", "approved", "denied", "signed_in", "expired", "superseded"]
Decision = Literal["approved", "denied", "signed_in"]
#: States a person's answer puts the record in: the turn resumes.
DECIDED: frozenset[str] = frozenset({"approved", "denied", "signed_in"})
#: At most this many characters of JSON ride on the order head (an entity property holds 64 KiB).
MAX_PENDING_CHARS = 16_000


@dataclass(frozen=True, kw_only=True)
class Pending:
    """One parked turn's question (`kind`: "approval", "signin"), identified by a random `id`
    that the card's action data carries back."""

    kind: str
    #: The activities of the parked unit, oldest first; the last one's row keeps the turn so far.
    activity_ids: tuple[str, ...]
    #: Who may answer: the channel user ID of the person asked (in a group chat, the requester).
    asked: str
    asked_name: str = ""
    expires_at: float
    #: Small kind-specific facts we wrote ourselves (tool, server, arguments hash, connection).
    detail: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    state: PendingState = "waiting"
    decided_by: str = ""
    decided_by_name: str = ""
    decided_at: float = 0.0
    #: The card's activity ID, once sent (its refresh replaces it).
    card_id: str = ""

    @property
    def waiting(self) -> bool:
        return self.state == "waiting"

    @property
    def decided(self) -> bool:
        return self.state in DECIDED

    def expired(self, now: float) -> bool:
        return self.waiting and now >= self.expires_at

    def decide(self, state: PendingState, *, by: str = "", by_name: str = "",
               at: float) -> Pending:
        return replace(self, state=state, decided_by=by, decided_by_name=by_name, decided_at=at)

    def to_json(self) -> str:
        data = asdict(self)
        data["activity_ids"] = list(self.activity_ids)
        text = json.dumps(data, ensure_ascii=True, separators=(",", ":"))
        if len(text) > MAX_PENDING_CHARS:
            raise ValueError(f"a pending record holds at most {MAX_PENDING_CHARS:,} characters")
        return text

    @classmethod
    def from_json(cls, text: str) -> Self:
        """The record as stored; a `ValueError` for anything else (it is read back: checked)."""
        data: Any = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a pending record is a JSON object")
        try:
            ids = data["activity_ids"]
            detail = data.get("detail") or {}
            if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
                raise ValueError("activity_ids must be a non-empty list of strings")
            if not isinstance(detail, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in detail.items()):
                raise ValueError("detail must map strings to strings")
            state = str(data.get("state", "waiting"))
            if state not in ("waiting", *DECIDED, "expired", "superseded"):
                raise ValueError(f"unknown state {state[:40]!r}")
            return cls(kind=str(data["kind"]), activity_ids=tuple(ids), asked=str(data["asked"]),
                       asked_name=str(data.get("asked_name", "")),
                       expires_at=float(data["expires_at"]), detail=dict(detail),
                       id=str(data["id"]), state=cast(PendingState, state),
                       decided_by=str(data.get("decided_by", "")),
                       decided_by_name=str(data.get("decided_by_name", "")),
                       decided_at=float(data.get("decided_at", 0.0)),
                       card_id=str(data.get("card_id", "")))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a pending record: {type(exc).__name__} {exc}") from None
