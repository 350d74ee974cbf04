"""Timer triggers: their schedules read as the host reads them, and a loop that fires them.

A schedule may be an app-setting expression such as `%CHAT_RETENTION_SCHEDULE%`, resolved from the
environment at start (an unset setting stops the start with the function's name, as it stops the
host). After each run the next occurrence is taken from the time it ends, so an overrunning run
skips occurrences instead of piling them up; a wake-up that finds a whole occurrence missed (the
machine slept) runs once with `past_due` true. Schedule status is not kept across restarts (the
host keeps it in storage when `use_monitor` is on), so `past_due` never carries over a restart.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from devtools import ncrontab, rpc
from devtools.worker import IndexedFunction

_SETTING = re.compile(r"%([^%]+)%")
_NEVER = "0001-01-01T00:00:00"


class TimerSetupError(ValueError):
    """A timer function's schedule cannot be used; the message names the function."""


@dataclass(frozen=True)
class TimerFunction:
    function: IndexedFunction
    schedule: ncrontab.Schedule
    run_on_startup: bool


def timer_functions(functions: list[IndexedFunction], *, environ: Mapping[str, str]) -> list[TimerFunction]:
    """The app's timer functions with their schedules resolved and parsed."""
    timers = []
    for function in functions:
        trigger = function.trigger
        if trigger.get("type") != "timerTrigger":
            continue
        try:
            expression = resolve_settings(str(trigger.get("schedule", "")), environ=environ)
            schedule = ncrontab.parse(expression)
        except ValueError as exc:
            raise TimerSetupError(f"timer function {function.name!r}: {exc}") from exc
        timers.append(TimerFunction(function, schedule, bool(trigger.get("runOnStartup"))))
    return timers


def resolve_settings(expression: str, *, environ: Mapping[str, str]) -> str:
    """`%NAME%` replaced by the app setting NAME, as the host's binding expressions are."""
    def setting(found: re.Match[str]) -> str:
        name = found.group(1)
        if not environ.get(name):
            raise ValueError(f"the app setting {name!r} named by {expression!r} is not set")
        return environ[name]

    return _SETTING.sub(setting, expression)


def timer_info(*, past_due: bool, last: datetime | None, next_at: datetime) -> rpc.TypedData:
    """The trigger's value as the host sends it (TimerInfo as JSON); `func.TimerRequest` reads it."""
    now = datetime.now(UTC)
    return rpc.TypedData(json=json.dumps({
        "Schedule": {"AdjustForDST": True},
        "ScheduleStatus": {"Last": last.isoformat() if last else _NEVER, "Next": next_at.isoformat(),
                           "LastUpdated": now.isoformat()},
        "IsPastDue": past_due}))


Run = Callable[[TimerFunction, rpc.TypedData, str], Awaitable[object]]


class TimerLoop:
    """Fires each timer function on its schedule until cancelled."""

    def __init__(self, timers: list[TimerFunction], *, run: Run) -> None:
        self.timers = timers
        self.run = run
        self.last: dict[str, datetime] = {}

    async def run_forever(self) -> None:
        await asyncio.gather(*(self._one(timer) for timer in self.timers))

    async def _one(self, timer: TimerFunction) -> None:
        if timer.run_on_startup:
            await self._fire(timer, scheduled=datetime.now(UTC), past_due=False, reason="Timer fired on startup")
        due = timer.schedule.next_after(datetime.now(UTC))
        while True:
            await asyncio.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds()))
            woke = datetime.now(UTC)
            if woke < due:  # the sleep returned a hair early
                continue
            past_due = timer.schedule.next_after(due) <= woke
            await self._fire(timer, scheduled=due, past_due=past_due,
                             reason=f"Timer fired at {woke.isoformat(timespec='milliseconds')}")
            due = timer.schedule.next_after(datetime.now(UTC))

    async def _fire(self, timer: TimerFunction, *, scheduled: datetime, past_due: bool, reason: str) -> None:
        data = timer_info(past_due=past_due, last=self.last.get(timer.function.name),
                          next_at=timer.schedule.next_after(scheduled))
        self.last[timer.function.name] = scheduled
        await self.run(timer, data, reason)

    def status(self, name: str) -> tuple[datetime | None, datetime]:
        """The last scheduled run and the next one of timer `name` (for a run called now)."""
        timer = next(t for t in self.timers if t.function.name == name)
        return self.last.get(name), timer.schedule.next_after(datetime.now(UTC))
