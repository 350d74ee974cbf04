"""Telemetry's cost per turn: worker CPU with telemetry off and on (OTLP export), same turns.

`python -m benchmarks.run --only telemetry`. The webhook benchmark's overhead phase
(`benchmarks.webhook.overhead_turns`: one turn at a time, alternating conversations of 10 and
5,000 stored messages, model latency 0, streaming off) runs on two dev-host workers over the same
table: one with no exporter configured (telemetry off: the no-op helpers), one with
OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP collector stand-in in this process (every span and
metric recorded, batched, encoded and posted by the worker's exporter threads). Off and on
alternate, ROUNDS times each; the figure is the worker's CPU seconds (all its threads) over the
measured turns. Beside it, the cost of the no-op helpers a turn calls, measured in this process.
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any

import aiohttp

from devtools.fake_channel import FakeConnector
from devtools.otlp_collector import OtlpCollector

from .common import azurite_version, code_version, machine, median, now_iso
from .webhook import Bench, TimedModelServer, azurite_process, overhead_turns, workers

ROUNDS = 5
WARMUP = 10  # turns per size and run, not measured
TURNS = 150  # measured turns per size and run
TARGET_MS = 1.0


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _cpu_per_turn(bench: Bench, env: dict[str, str], *, label: str,
                        large: list[str] | None) -> tuple[float, float, list[str]]:
    """Worker CPU ms and wall ms per measured turn, and the large conversations used."""
    async with workers([env]) as (worker,):
        run = await overhead_turns(bench, worker, warmup=WARMUP, turns=TURNS, label=label,
                                   large=large, cpu_of=(worker.process,))
    turns = 2 * TURNS
    return ((run.cpu_after[0] - run.cpu_before[0]) / turns * 1000, run.wall_s / turns * 1000,
            run.large)


def noop_helpers_us(calls: int = 20_000) -> float:
    """µs per turn of the helpers a message turn calls when telemetry is off (in this process)."""
    from shared import telemetry

    assert not telemetry.state.enabled

    def one_turn() -> None:
        with telemetry.turn("message", "c") as stats:
            with telemetry.span("chatstate.auth"):
                pass
            with telemetry.span("chatstate.window.load") as span:
                span.set_attributes({})
            with telemetry.model_call(model="m", provider="openai", max_tokens=1, messages=[],
                                      failures=(Exception,)) as call:
                telemetry.completed(call, model="m", input_tokens=1, output_tokens=1,
                                    cached_tokens=0, finish_reason="stop", output=None)
            with telemetry.commit() as span:
                span.set_attribute("x", 1)
            for _ in range(2):
                with telemetry.span("chatstate.reply", {"chatstate.reply.kind": "message"}):
                    pass
            with telemetry.span("chatstate.delivered"):
                pass
            for _ in range(3):
                telemetry.storage_call("x", 0.0)
            stats.status = 200

    for _ in range(1_000):
        one_turn()
    started = time.process_time()
    for _ in range(calls):
        one_turn()
    return (time.process_time() - started) / calls * 1e6


async def run(connection_string: str) -> dict[str, Any]:
    started = time.perf_counter()
    _log(f"telemetry benchmark on {azurite_version()}, {machine(brief=True)}: {ROUNDS} rounds of "
         f"off/on, {TURNS} turns per size each after {WARMUP} warm-up")
    model, connector, collector = TimedModelServer(), FakeConnector(), OtlpCollector()
    for server in (model, connector, collector):
        await server.start()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=60))
    bench = Bench(connection_string=connection_string, http=http, model=model, connector=connector,
                  azurite=azurite_process(connection_string))
    table = "bench" + uuid.uuid4().hex[:12]
    # Streaming off: a streamed turn waits out Teams' one-update-a-second pace (about 1 s of wall
    # per turn here); the typing indicator and the reply are sent instead (two reply spans).
    off_env = {**bench.env(table), "CHAT_STREAMING": "off"}
    on_env = {**off_env, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    wall: dict[str, list[float]] = {"off": [], "on": []}
    large: list[str] | None = None
    try:
        for number in range(ROUNDS):
            # Which runs first alternates: a run's place in the round must not pass for its cost.
            order = (("off", off_env), ("on", on_env))
            for label, env in order if number % 2 == 0 else order[::-1]:
                ms, wall_ms, large = await _cpu_per_turn(bench, env, label=f"{label}{number}",
                                                         large=large)
                cpu[label].append(ms)
                wall[label].append(wall_ms)
                _log(f"  round {number + 1}, telemetry {label}: worker CPU {ms:.2f} ms/turn, "
                     f"wall {wall_ms:.2f} ms/turn")
    finally:
        await http.close()
        for server in (collector, connector, model):
            await server.stop()
    off, on = median(cpu["off"]), median(cpu["on"])
    # Each round runs off and on back to back: the median of those paired differences is less at
    # the mercy of what else the machine did during the run than the difference of medians.
    paired = median([b - a for a, b in zip(cpu["off"], cpu["on"], strict=True)])
    results: dict[str, Any] = {
        "worker_cpu_ms_per_turn": {"off": round(off, 3), "on": round(on, 3)},
        "overhead_cpu_ms_per_turn": round(paired, 3),
        "by_round": {label: [round(value, 3) for value in values] for label, values in cpu.items()},
        "wall_ms_per_turn_median": {label: round(median(values), 2) for label, values in wall.items()},
        "noop_helpers_us_per_turn": round(noop_helpers_us(), 2),
        "spans_received": len(collector.spans),
        "errors": bench.errors,
        "target_ms": TARGET_MS,
        "settings": {"rounds": ROUNDS, "turns_per_run": 2 * TURNS, "warmup_turns_per_size": WARMUP,
                     "on": "OTEL_EXPORTER_OTLP_ENDPOINT to a local collector stand-in (batched "
                           "http/protobuf export from the worker's threads)"},
        "storage": azurite_version(),
        "machine": machine(),
        "code": code_version(),
        "measured_at": now_iso(),
        "seconds": round(time.perf_counter() - started),
    }
    _print(results)
    return results


def _print(r: dict[str, Any]) -> None:
    c = r["worker_cpu_ms_per_turn"]
    overhead = r["overhead_cpu_ms_per_turn"]
    print()
    print(f"Telemetry: worker CPU per turn (median of {ROUNDS} runs of {2 * TURNS} turns each; "
          f"{r['machine']}; code {r['code']})")
    print(f"  off (no exporter)           {c['off']:6.2f} ms   runs {r['by_round']['off']}")
    print(f"  on  (OTLP to a collector)   {c['on']:6.2f} ms   runs {r['by_round']['on']}")
    print(f"  overhead                    {overhead:6.2f} ms (target < {TARGET_MS:g} ms: "
          f"{'met' if overhead < TARGET_MS else 'NOT met'})")
    print(f"  no-op helpers of one turn, telemetry off: {r['noop_helpers_us_per_turn']:.1f} µs")
    print(f"  wall per turn (median): {r['wall_ms_per_turn_median']}; spans received: "
          f"{r['spans_received']}")
    if any(r["errors"].values()):
        print(f"errors: {r['errors']}")
    print()
