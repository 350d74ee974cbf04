"""A user's or a tenant's spend on one UTC day: its counters, its open reservations, and the pure
rules that change them (no I/O; the store writes a `Ledger` with one conditional write).

A ledger is one row of the conversations table, in the account's own partition (`Account.key`:
`~budget-user-<encoded ID>`, `~budget-tenant-<encoded ID>`), row key the UTC day. It is both the
budget's counter and the day's usage record (kept for the retention period):

    tokens, input_tokens, cached_tokens, output_tokens   settled: what the model calls billed
    calls, turns                                          model calls settled, turns admitted
    minute, minute_turns, minute_turn_ids                 turns in the current UTC minute, and
                                                          which (a retried turn counts once)
    reservations                                          open worst cases: id, tokens, expiry
    models                                                tokens by model (an estimated cost)

A model call first `reserve`s its worst case (the prompt plus the reply's maximum) if the budget
has room for it, `used + reserved + this <= limit`, then `settle`s what it really cost, which
removes its reservation. A reservation past its expiry (its worker died) counts no more.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Literal

from .keys import encode_key
from .messages import Usage

__all__ = ["MAX_RESERVATIONS", "Account", "Ledger", "Level", "ModelTokens", "Reservation",
           "Shortfall"]

Level = Literal["user", "tenant"]
#: A ledger holds at most this many open reservations (about 30 characters of JSON each); a call
#: past it is refused as if the budget were full, until some settle.
MAX_RESERVATIONS = 500
#: At most this many models are named in a day's breakdown; the rest are counted as "other".
MAX_MODELS = 16
#: The turns of the current minute a ledger remembers (12 characters each), so that a retry of one
#: (a queue's redelivery, a failed attempt tried again) is not counted as another turn.
MAX_MINUTE_TURN_IDS = 120


@dataclass(frozen=True, slots=True)
class Account:
    """Who a budget belongs to: a user (their Entra object ID, else the channel's user ID) or a
    tenant (the activity's Entra tenant ID)."""

    level: Level
    id: str

    @property
    def key(self) -> str:
        """The account's partition key; `~b` never starts a conversation's (`shared/keys.py`)."""
        return f"~budget-{self.level}-{encode_key(self.id)}"


@dataclass(frozen=True, slots=True)
class Reservation:
    """A model call's worst case, held until it settles or `expires` (seconds since the epoch)."""

    id: str
    tokens: int
    expires: int


@dataclass(frozen=True, slots=True)
class ModelTokens:
    model: str
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Shortfall:
    """Why a ledger refused: the limit that has no room (`daily_tokens`, `turns_per_minute`)."""

    limit: Literal["daily_tokens", "turns_per_minute"]


@dataclass(frozen=True, kw_only=True)
class Ledger:
    account: Account
    day: str
    tokens: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0
    turns: int = 0
    #: Minutes since the epoch of the minute `minute_turns` counts.
    minute: int = 0
    minute_turns: int = 0
    #: The turns counted in `minute` (`turn_id`s), the latest last.
    minute_turn_ids: tuple[str, ...] = ()
    reservations: tuple[Reservation, ...] = ()
    models: tuple[ModelTokens, ...] = ()
    #: The stored row's ETag; None: not stored yet.
    etag: str | None = None

    def reserved(self, now: float) -> int:
        """Tokens held by reservations still open at `now` (seconds since the epoch)."""
        return sum(r.tokens for r in self.reservations if r.expires > now)

    def admit(self, now: float, *, turn: str = "",
              turns_per_minute: int | None) -> Ledger | Shortfall:
        """This ledger with one turn more (in the day and in `now`'s minute), or the shortfall
        when the minute's turns are all taken. A `turn` counted already this minute (a retry of
        it) is not counted again."""
        minute = int(now) // 60
        current = self.minute == minute
        if turn and current and turn in self.minute_turn_ids:
            return self
        taken = self.minute_turns if current else 0
        if turns_per_minute is not None and taken >= turns_per_minute:
            return Shortfall("turns_per_minute")
        ids = self.minute_turn_ids if current else ()
        return replace(self, turns=self.turns + 1, minute=minute, minute_turns=taken + 1,
                       minute_turn_ids=(*ids, turn)[-MAX_MINUTE_TURN_IDS:] if turn else ids)

    def unadmit(self, now: float, *, turn: str = "") -> Ledger:
        """This ledger without a turn `admit` counted at `now` (its call was refused elsewhere)."""
        if self.minute != int(now) // 60:
            return replace(self, turns=max(0, self.turns - 1))
        return replace(self, turns=max(0, self.turns - 1),
                       minute_turns=max(0, self.minute_turns - 1),
                       minute_turn_ids=tuple(t for t in self.minute_turn_ids if t != turn))

    @staticmethod
    def turn_id(activity_id: str) -> str:
        """A turn's short name in `minute_turn_ids`: a hash of the activity it answers."""
        return hashlib.sha256(activity_id.encode()).hexdigest()[:12]

    def reserve(self, reservation: Reservation, *, limit: int | None, now: float) -> Ledger | Shortfall:
        """This ledger holding `reservation` (expired ones let go), if `limit` has room for it."""
        live = tuple(r for r in self.reservations if r.expires > now)
        if limit is not None and (self.tokens + sum(r.tokens for r in live) + reservation.tokens
                                  > limit or len(live) >= MAX_RESERVATIONS):
            return Shortfall("daily_tokens")
        return replace(self, reservations=(*live, reservation))

    def release(self, reservation_id: str) -> Ledger:
        return replace(self, reservations=tuple(r for r in self.reservations
                                                if r.id != reservation_id))

    def settle(self, usage: Usage, *, model: str, calls: int = 1,
               reservation_id: str | None = None) -> Ledger:
        """This ledger with `usage` spent (its reservation, if any, let go)."""
        ledger = self.release(reservation_id) if reservation_id is not None else self
        return replace(ledger, tokens=ledger.tokens + usage.total_tokens,
                       input_tokens=ledger.input_tokens + usage.prompt_tokens,
                       cached_tokens=ledger.cached_tokens + usage.cached_tokens,
                       output_tokens=ledger.output_tokens + usage.completion_tokens,
                       calls=ledger.calls + calls, models=_add_model(ledger.models, model, usage))

    def reservations_json(self) -> str:
        return json.dumps([[r.id, r.tokens, r.expires] for r in self.reservations],
                          separators=(",", ":"))

    def models_json(self) -> str:
        return json.dumps([[m.model, m.input_tokens, m.cached_tokens, m.output_tokens]
                           for m in self.models], separators=(",", ":"))

    @staticmethod
    def parse_reservations(text: str) -> tuple[Reservation, ...]:
        return tuple(Reservation(str(i), int(t), int(e)) for i, t, e in json.loads(text or "[]"))

    @staticmethod
    def parse_models(text: str) -> tuple[ModelTokens, ...]:
        return tuple(ModelTokens(str(m), int(i), int(c), int(o)) for m, i, c, o in
                     json.loads(text or "[]"))


def _add_model(models: tuple[ModelTokens, ...], model: str, usage: Usage) -> tuple[ModelTokens, ...]:
    name = model[:100] or "unknown"
    if all(m.model != name for m in models) and len(models) >= MAX_MODELS:
        name = "other"
    found = next((m for m in models if m.model == name), ModelTokens(name))
    added = ModelTokens(name, found.input_tokens + usage.prompt_tokens,
                        found.cached_tokens + usage.cached_tokens,
                        found.output_tokens + usage.completion_tokens)
    return (*(m for m in models if m.model != name), added)
