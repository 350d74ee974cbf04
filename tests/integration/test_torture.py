"""A short run of the randomized concurrency test (`make torture` runs it long)."""

from __future__ import annotations

import io
import re

from tests.integration.torture import INVARIANTS, torture


async def test_a_short_seeded_run_keeps_every_invariant(azurite_connection_string: str) -> None:
    # GIVEN the webhook and two answer workers on one table and queue, seeded random histories,
    # storage faults, killed workers and extra queue messages
    out = io.StringIO()
    # WHEN four rounds of 40 operations run (enough that some streams are stopped by the user,
    # whatever the timing)
    passed = await torture(azurite_connection_string, seed=20, rounds=4, duration=None,
                           shrink_seconds=30, out=out)
    # THEN every invariant held, and the output names each one it checked
    report = out.getvalue()
    assert passed, report
    assert all(invariant in report for invariant in INVARIANTS)
    assert "passed: seed 20, 4 rounds, " in report
    # AND the messages went through the queue: accepted and answered, with workers killed and
    # wake-ups handed out again along the way
    path = re.search(r"(\d+) messages accepted, (\d+) answers .* (\d+) workers killed, "
                     r"(\d+) extra queue messages", report)
    assert path is not None, report
    assert all(int(figure) > 0 for figure in path.groups()), report
    # AND replies streamed into Teams personal chats, and the user stopped some of them midway
    figures = re.search(r"(\d+) replies streamed, (\d+) stopped by the user", report)
    assert figures is not None, report
    assert int(figures[1]) > 0 and int(figures[2]) > 0, report
    # AND the budgets were checked against the model's billing, and some turns met their limits
    budgets = re.search(r"budgets checked in (\d+) accounts \((\d+) budget replies\)", report)
    assert budgets is not None, report
    assert int(budgets[1]) > 0 and int(budgets[2]) > 0, report
