"""Retention: one run of the purge of idle conversations (the `retention` timer function calls it).

A conversation is idle when its last turn was on a UTC day before `today - CHAT_RETENTION_DAYS`.
The store finds them through its day index (never by reading message rows), clears each one whose
head still says it is idle, and stops at the run's time budget; the index rows it did not reach are
where the next run starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from .messages import utc_day, utc_now
from .store import ConversationStore, PurgeReport

__all__ = ["RUN_BUDGET_SECONDS", "purge_idle"]

log = logging.getLogger(__name__)

#: One run stops starting new conversations after this long (a timer function on Flex Consumption
#: may run 30 minutes by default; a daily run that leaves work resumes it the next day).
RUN_BUDGET_SECONDS = 240.0


async def purge_idle(store: ConversationStore, *, days: int | None, now: datetime | None = None,
                     budget_seconds: float = RUN_BUDGET_SECONDS,
                     clock: Callable[[], float] = time.monotonic) -> PurgeReport | None:
    """Delete the conversations idle longer than `days` (None: retention is off, nothing done)."""
    if days is None:
        log.info("retention_run skipped: CHAT_RETENTION_DAYS is not set (conversations are kept)")
        return None
    before = utc_day((now or utc_now()) - timedelta(days=days))
    report = await store.purge_idle(before=before, deadline=clock() + budget_seconds, clock=clock)
    log.info("retention_run purged=%d kept=%d finished=%s idle_before=%s%s", report.purged,
             report.kept, report.finished, before,
             "" if report.finished else "; the next run resumes where this one stopped")
    return report
