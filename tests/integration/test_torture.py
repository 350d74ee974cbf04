"""A short run of the randomized concurrency test (`make torture` runs it long)."""

from __future__ import annotations

import io
import re

from tests.integration.torture import INVARIANTS, torture


async def test_a_short_seeded_run_keeps_every_invariant(azurite_connection_string: str) -> None:
    # GIVEN two instances on one table, seeded random histories and storage faults
    out = io.StringIO()
    # WHEN three rounds of 40 operations run
    passed = await torture(azurite_connection_string, seed=20, rounds=3, duration=None,
                           shrink_seconds=30, out=out)
    # THEN every invariant held, and the output names each one it checked
    report = out.getvalue()
    assert passed, report
    assert all(invariant in report for invariant in INVARIANTS)
    assert "passed: seed 20, 3 rounds, " in report
    # AND replies streamed into Teams personal chats, and the user stopped some of them midway
    figures = re.search(r"(\d+) replies streamed, (\d+) stopped by the user", report)
    assert figures is not None, report
    assert int(figures[1]) > 0 and int(figures[2]) > 0, report
    # AND the budgets were checked against the model's billing, and some turns met their limits
    budgets = re.search(r"budgets checked in (\d+) accounts \((\d+) budget replies\)", report)
    assert budgets is not None, report
    assert int(budgets[1]) > 0 and int(budgets[2]) > 0, report
