"""The offline stand-in streams at a visible pace (injected here, to keep the test short)."""

from __future__ import annotations

import itertools
import time

import httpx2

from shared.model import build_model
from shared.offline import STREAM_PACE_SECONDS, offline_transport
from shared.settings import load_settings


async def test_the_offline_stand_in_streams_piece_by_piece_at_its_pace() -> None:
    # GIVEN the offline stand-in with a pace of 20 ms between pieces
    pace = 0.02
    model = build_model(load_settings({}).model,
                        http_client=httpx2.AsyncClient(transport=offline_transport(pace=pace)))
    arrivals: list[float] = []
    started = time.perf_counter()

    async def on_text(text: str) -> None:
        arrivals.append(time.perf_counter() - started)

    # WHEN a streamed reply is asked for
    completion = await model.complete([{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "hello there"}], on_text=on_text)
    # THEN the text arrives in several pieces, at least `pace` apart, and whole at the end
    assert len(arrivals) >= 5
    assert all(later - earlier >= pace * 0.9 for earlier, later in itertools.pairwise(arrivals))
    assert str(completion.message.content).startswith("[offline stand-in")
    # AND the default pace shows a few updates a reply where Teams shows one a second
    assert 0.2 <= STREAM_PACE_SECONDS <= 0.5
