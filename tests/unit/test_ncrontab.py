"""NCRONTAB schedules read as the Functions host reads them (unit tests, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from devtools import ncrontab
from devtools.timers import resolve_settings


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def occurrences(expression: str, start: str, count: int) -> list[str]:
    schedule, moment, found = ncrontab.parse(expression), at(start), []
    for _ in range(count):
        moment = schedule.next_after(moment)
        found.append(moment.strftime("%a %Y-%m-%d %H:%M:%S"))
    return found


def test_the_first_field_is_seconds() -> None:
    # GIVEN "every 5 minutes" in six fields, and "every 15 seconds"
    # WHEN their next occurrences are taken
    # THEN the first field counts seconds, as in Functions
    assert occurrences("0 */5 * * * *", "2026-12-02T10:03:20", 2) == [
        "Wed 2026-12-02 10:05:00", "Wed 2026-12-02 10:10:00"]
    assert occurrences("*/15 * * * * *", "2026-12-02T10:03:20", 2) == [
        "Wed 2026-12-02 10:03:30", "Wed 2026-12-02 10:03:45"]


def test_names_ranges_and_lists() -> None:
    # GIVEN 09:30 on weekdays, and 1st and 15th of January and July at midnight
    # WHEN the next occurrences are taken from a Friday evening
    # THEN the weekend is skipped and the named months are honoured
    assert occurrences("0 30 9 * * Mon-Fri", "2026-12-04T18:00:00", 2) == [
        "Mon 2026-12-07 09:30:00", "Tue 2026-12-08 09:30:00"]
    assert occurrences("0 0 0 1,15 Jan,jul *", "2026-12-02T00:00:00", 3) == [
        "Fri 2027-01-01 00:00:00", "Fri 2027-01-15 00:00:00", "Thu 2027-07-01 00:00:00"]


def test_a_day_must_match_both_day_fields() -> None:
    # GIVEN the 13th that is also a Friday (NCrontab ANDs the two day fields)
    # WHEN the next occurrences are taken
    # THEN only Friday the 13ths fire
    assert occurrences("0 0 12 13 * Fri", "2026-01-01T00:00:00", 2) == [
        "Fri 2026-02-13 12:00:00", "Fri 2026-03-13 12:00:00"]


@pytest.mark.parametrize(("expression", "says"), [
    ("0 */5 * * *", "has 5 fields"),
    ("00:05:00", "TimeSpan"),
    ("0 61 * * * *", "outside 0-59"),
    ("0 0 0 * Foo *", "not a number"),
    ("0 0 0 30 Feb *", "never fires"),
    ("0 0 0 * * 5-1", "runs backwards"),
    ("*/0 * * * * *", "at least 1"),
])
def test_a_bad_schedule_is_refused_with_a_reason(expression: str, says: str) -> None:
    # GIVEN an expression the host would not accept
    # WHEN it is parsed
    # THEN it is refused, saying why
    with pytest.raises(ncrontab.ScheduleError, match=says):
        ncrontab.parse(expression)


def test_an_app_setting_expression_is_resolved_from_the_environment() -> None:
    # GIVEN a schedule given as %CHAT_RETENTION_SCHEDULE%
    # WHEN it is resolved with the setting set, and without it
    # THEN the setting's value is used, and a missing one is named
    assert resolve_settings("%CHAT_RETENTION_SCHEDULE%",
                            environ={"CHAT_RETENTION_SCHEDULE": "0 0 3 * * *"}) == "0 0 3 * * *"
    with pytest.raises(ValueError, match="CHAT_RETENTION_SCHEDULE"):
        resolve_settings("%CHAT_RETENTION_SCHEDULE%", environ={})
