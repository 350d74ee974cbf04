"""The dev host with timing probes on the turn's steps, for the webhook benchmark's breakdown.

    python -m benchmarks.traced_host --port N      (with CHATSTATE_BENCH_TRACE=/path/to/trace.jsonl)

It is `devtools.host` serving the real `function_app`, with a `perf_counter` around each step a
message turn takes (`ChatBot.handle`, the store's `load_window` / `commit_turn` / `mark_delivered`,
`ChatModel.complete`, `BotConnector.send`). Each handled activity appends one JSON line: its ID,
the whole `handle` time and every step as `[name, start offset ms, duration ms]`. Nothing else
changes; the probes cost microseconds. The benchmark's headline figures come from the plain
`devtools.host`; this one only explains where a turn's time goes.
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devtools.host import DevHostProcess

TRACE_ENV = "CHATSTATE_BENCH_TRACE"
#: With this set to a path, the whole worker runs under cProfile and writes its stats there on exit.
PROFILE_ENV = "CHATSTATE_BENCH_PROFILE"

_steps: contextvars.ContextVar[tuple[float, list[list[Any]]] | None] = contextvars.ContextVar(
    "chatstate_bench_steps", default=None)


def _probe(owner: type, name: str, label: Callable[..., str] | str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            current = _steps.get()
            if current is not None:
                origin, steps = current
                step = label if isinstance(label, str) else label(*args, **kwargs)
                steps.append([step, round((started - origin) * 1000, 3),
                              round((time.perf_counter() - started) * 1000, 3)])

    setattr(owner, name, timed)


def install(trace_path: Path) -> None:
    """Wrap the turn's steps; every handled activity appends one line to `trace_path`."""
    from shared.bot import ChatBot
    from shared.connector import BotConnector
    from shared.model import ChatModel
    from shared.store import TableConversationStore

    trace = trace_path.open("a", buffering=1, encoding="utf-8")
    for method in ("load_window", "commit_turn", "mark_delivered", "get_turn"):
        _probe(TableConversationStore, method, f"store.{method}")
    _probe(ChatModel, "complete", "model.complete")
    _probe(BotConnector, "send",
           lambda *args, **kwargs: f"connector.send:{kwargs.get('activity', {}).get('type')}")
    handle = ChatBot.handle

    @functools.wraps(handle)
    async def traced_handle(self: ChatBot, *, body: bytes, headers: Any) -> Any:
        started = time.perf_counter()
        steps: list[list[Any]] = []
        token = _steps.set((started, steps))
        try:
            return await handle(self, body=body, headers=headers)
        finally:
            _steps.reset(token)
            try:
                activity_id = json.loads(body).get("id")
            except ValueError:
                activity_id = None
            trace.write(json.dumps({"activity": activity_id,
                                    "handle_ms": round((time.perf_counter() - started) * 1000, 3),
                                    "steps": steps}) + "\n")

    ChatBot.handle = traced_handle  # type: ignore[method-assign]


class TracedHostProcess(DevHostProcess):
    """`DevHostProcess`, but running `python -m benchmarks.traced_host` (same arguments, same env)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(module="benchmarks.traced_host", **options)


def main(argv: list[str] | None = None) -> None:
    from devtools import host

    install(Path(os.environ[TRACE_ENV]))
    profile_path = os.environ.get(PROFILE_ENV)
    if not profile_path:
        host.main(argv)
        return
    import cProfile
    import signal

    # uvicorn re-raises the SIGTERM it shut down on: make that an exit that runs the `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        host.main(argv)
    finally:
        profiler.disable()
        profiler.dump_stats(profile_path)


if __name__ == "__main__":
    main(sys.argv[1:])
