"""The turn's logging context: every line names its conversation and activity, and is bounded."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shared.logs import MAX_LOG_CHARS, install, turn_context


async def test_every_line_of_a_turn_names_it_and_no_line_is_unbounded(
        caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN the turn context installed, and a turn that logs from its own task and a child task
    install()
    log = logging.getLogger("chatstate.test")
    caplog.set_level(logging.INFO)

    async def child() -> None:
        log.info("from a task the turn started")

    with turn_context("conv-1", "act-1"):
        # WHEN it logs a short line, a 900 KB one, and a line from a child task
        log.info("short %s", "line")
        log.warning("huge body: %s", "x" * 900_000)
        await asyncio.create_task(child())
    log.info("after the turn")
    # THEN each line of the turn carries both IDs, the huge one is cut, and later lines carry none
    lines = [record.getMessage() for record in caplog.records]
    assert all(line.endswith("[conversation='conv-1' activity='act-1']") for line in lines[:3])
    assert len(lines[1]) < MAX_LOG_CHARS + 200 and "more characters" in lines[1]
    assert caplog.records[0].conversation_id == "conv-1"  # type: ignore[attr-defined]
    assert lines[3] == "after the turn"
