"""Spend limits: the counters a conversation's head keeps, and the one check made before a model call.

The counters ride in the head row (`Spend`), so reading them costs nothing (the turn reads the head
anyway) and each commit updates them in the turn's own transaction. A turn over a limit gets a short
polite reply, no model call and nothing stored; `limit_reached` is the one place that says so (a log
line with the stable key `spend_limit_reached`, and the metric hook beside it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from . import telemetry
from .messages import utc_day
from .settings import DataSettings

__all__ = ["LIMIT_REPLIES", "Limit", "Spend", "limit_reached", "over_limit"]

log = logging.getLogger(__name__)

Limit = Literal["turns_per_minute", "daily_tokens"]

#: What the user reads instead of an answer (not AI-generated: the bot wrote it, not the model).
LIMIT_REPLIES: dict[Limit, str] = {
    "turns_per_minute": "You're sending messages faster than I can answer. Please wait a minute "
                        "and send that one again.",
    "daily_tokens": "This conversation has reached today's usage limit, so I can't answer right "
                    "now. Please try again tomorrow.",
}


@dataclass(frozen=True, slots=True)
class Spend:
    """A conversation's spend counters: turns in the current UTC minute, model tokens today."""

    #: Minutes since the epoch of the minute `minute_turns` counts (0: none yet).
    minute: int = 0
    minute_turns: int = 0
    #: The UTC day (YYYY-MM-DD) `day_tokens` counts ("": none yet).
    day: str = ""
    day_tokens: int = 0

    def turns_in_minute(self, now: datetime) -> int:
        return self.minute_turns if self.minute == _minute(now) else 0

    def tokens_on_day(self, now: datetime) -> int:
        return self.day_tokens if self.day == _day(now) else 0

    def after_turn(self, now: datetime, *, tokens: int, turns: int = 1) -> Spend:
        """The counters once a turn that spent `tokens` commits at `now` (`turns`: 0 when the
        turn was counted already, when it reserved its place)."""
        return Spend(minute=_minute(now), minute_turns=self.turns_in_minute(now) + turns,
                     day=_day(now), day_tokens=self.tokens_on_day(now) + max(0, tokens))


def over_limit(spend: Spend, limits: DataSettings, now: datetime) -> Limit | None:
    """The limit a new turn at `now` would pass, or None. Checked before the model call, so the
    turn that crosses the daily limit is answered; the next one is not."""
    if limits.max_turns_per_minute is not None and \
            spend.turns_in_minute(now) >= limits.max_turns_per_minute:
        return "turns_per_minute"
    if limits.daily_token_limit is not None and \
            spend.tokens_on_day(now) >= limits.daily_token_limit:
        return "daily_tokens"
    return None


def limit_reached(limit: Limit, spend: Spend, now: datetime) -> None:
    """Say that a turn was refused for `limit`: the log line (stable key `spend_limit_reached`)
    and the metric (`chatstate.spend_limit_reached`, attribute `limit`) belong here only."""
    log.warning("spend_limit_reached limit=%s turns_this_minute=%d tokens_today=%d; no model call",
                limit, spend.turns_in_minute(now), spend.tokens_on_day(now))
    telemetry.spend_limit_reached(limit)


def _minute(now: datetime) -> int:
    return int(now.timestamp()) // 60


def _day(now: datetime) -> str:
    return utc_day(now)
