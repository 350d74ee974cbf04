"""NCRONTAB schedules as Azure Functions timer triggers read them: six fields, seconds first.

    {second} {minute} {hour} {day} {month} {day-of-week}      e.g. "0 */5 * * * *", "0 30 9 * * Mon-Fri"

Each field takes `*`, a number, a range `a-b`, a step `*/n` or `a-b/n` or `a/n`, and lists of those
(`1,15,30`); months and days of the week also by their English three-letter names; Sunday is 0.
As in NCrontab (which the Functions host uses), a day must match both the day-of-month and the
day-of-week field. Times are UTC, as in Azure without WEBSITE_TIME_ZONE (which Linux plans,
Flex Consumption included, do not support).
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_MONTHS = {name.lower(): number for number, name in enumerate(calendar.month_abbr) if name}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (  # name, lowest, highest, names
    ("second", 0, 59, {}), ("minute", 0, 59, {}), ("hour", 0, 23, {}),
    ("day", 1, 31, {}), ("month", 1, 12, _MONTHS), ("day-of-week", 0, 6, _DAYS))
_TIMESPAN = re.compile(r"^\d+(\.\d+)?:\d{2}:\d{2}$|^\d{2}:\d{2}:\d{2}$")
_SEARCH_YEARS = 5


class ScheduleError(ValueError):
    """The expression is not a schedule the Functions host would accept."""


@dataclass(frozen=True)
class Schedule:
    """A parsed NCRONTAB expression; `next_after` gives its occurrences."""

    expression: str
    seconds: frozenset[int]
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday

    def next_after(self, moment: datetime) -> datetime:
        """The first occurrence strictly after `moment` (an aware datetime), in UTC."""
        at = moment.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)
        limit = at + timedelta(days=366 * _SEARCH_YEARS)
        while at < limit:
            if at.month not in self.months:
                at = _first_of_next_month(at)
            elif at.day not in self.days or (at.isoweekday() % 7) not in self.weekdays:
                at = (at + timedelta(days=1)).replace(hour=0, minute=0, second=0)
            elif at.hour not in self.hours:
                at = (at + timedelta(hours=1)).replace(minute=0, second=0)
            elif at.minute not in self.minutes:
                at = (at + timedelta(minutes=1)).replace(second=0)
            elif at.second not in self.seconds:
                at += timedelta(seconds=1)
            else:
                return at
        raise ScheduleError(f"{self.expression!r} never fires (no occurrence in {_SEARCH_YEARS} years)")


def parse(expression: str) -> Schedule:
    """Parse a six-field NCRONTAB expression; `ScheduleError` says what is wrong."""
    text = expression.strip()
    if _TIMESPAN.match(text):
        raise ScheduleError(f"{expression!r} is a TimeSpan schedule, which Functions accepts only on "
                            "App Service plans, not on Consumption or Flex Consumption: use NCRONTAB")
    parts = text.split()
    if len(parts) != len(_FIELDS):
        raise ScheduleError(f"{expression!r} has {len(parts)} fields; an NCRONTAB schedule has six: "
                            "{second} {minute} {hour} {day} {month} {day-of-week}")
    values = [_field(part, *spec) for part, spec in zip(parts, _FIELDS, strict=True)]
    schedule = Schedule(text, *values)
    schedule.next_after(datetime(2000, 1, 1, tzinfo=UTC))  # one that never fires is refused now
    return schedule


def _field(text: str, name: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    chosen: set[int] = set()
    for item in text.split(","):
        span, _, step_text = item.partition("/")
        try:
            step = int(step_text) if step_text else 1
        except ValueError:
            raise ScheduleError(f"{name} field {text!r}: step {step_text!r} is not a number") from None
        if step < 1:
            raise ScheduleError(f"{name} field {text!r}: the step must be at least 1")
        if span == "*":
            start, end = low, high
        elif "-" in span:
            first, _, last = span.partition("-")
            start, end = _value(first, name, low, high, names), _value(last, name, low, high, names)
        else:
            start = _value(span, name, low, high, names)
            end = high if step_text else start
        if start > end:
            raise ScheduleError(f"{name} field {text!r}: the range {span!r} runs backwards")
        chosen.update(range(start, end + 1, step))
    return frozenset(chosen)


def _value(text: str, name: str, low: int, high: int, names: dict[str, int]) -> int:
    number = names.get(text.lower()) if names else None
    if number is None:
        try:
            number = int(text)
        except ValueError:
            raise ScheduleError(f"{name} field: {text!r} is not a number"
                                + (f" or one of {', '.join(names)}" if names else "")) from None
    if not low <= number <= high:
        raise ScheduleError(f"{name} field: {number} is outside {low}-{high}")
    return number


def _first_of_next_month(at: datetime) -> datetime:
    year, month = (at.year + 1, 1) if at.month == 12 else (at.year, at.month + 1)
    return at.replace(year=year, month=month, day=1, hour=0, minute=0, second=0)
