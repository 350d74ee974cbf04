"""The webhook end to end: POST /api/messages over real HTTP, the real function app, Azurite.

The worker is `devtools.host` (the real `function_app` through the pinned Functions Python worker
library on uvicorn, what `make run` serves) in its own process, with auth off, so replies go to a
local Bot Connector stand-in (`FakeConnector`); the model is the local OpenAI-compatible
`FakeModelServer`. Both stand-ins and the load generator run in this process's event loop. Phases:

overhead     one turn at a time, alternating between conversations holding 10 and 5,000 stored
             messages (seeded with the store into the worker's table: a fresh 10-message one per
             turn, two 5,000-message ones taking turns), model latency 0. A turn's overhead is its
             POST wall time minus the time the model server spent answering it (measured in its
             handler). The window is CHAT_HISTORY_MAX_MESSAGES=8, which both sizes fill (the
             head's copy answers both), so p50(5,000)/p50(10) isolates history length.
throughput   64 conversations at once against one worker, model latency 0: turns per second.
in flight    then, on that worker, 200 conversations at once with model latency 1 s: wall seconds.
contention   20 messages at once to ONE conversation, alternating between TWO workers (same table),
             10 rounds: is every message stored exactly once; model calls per stored turn.
breakdown    the overhead phase again, briefly, on `benchmarks.traced_host` (the same app with
             timing probes): where a turn's time goes; CPU per turn of worker, Azurite and this
             process (load generator and stand-ins); each store call's client and Azurite CPU; the
             openai SDK's own CPU per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import math
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import aiohttp
import psutil
from aiohttp import web

from devtools.fake_channel import FakeConnector
from devtools.fake_model import FakeModelServer
from devtools.host import DevHostProcess
from shared.store import TableConversationStore

from .chart import line_chart
from .common import HERE, RESULTS, ROOT, azurite_version, code_version, machine, median, now_iso
from .store import exchange
from .traced_host import TRACE_ENV, TracedHostProcess

SIZES = (10, 5_000)
WINDOW_MESSAGES = 8  # both sizes fill it
TOKEN_BUDGET = 8_000  # the worker's CHAT_HISTORY_TOKEN_BUDGET (its default)
OVERHEAD_WARMUP = 20  # turns per size, not measured
OVERHEAD_TURNS = 300  # measured turns per size
LARGE_CONVERSATIONS = 2  # 5,000-message conversations share the turns: each grows by ≤ 6.4 %
THROUGHPUT_LANES = 64
THROUGHPUT_TURNS = 10  # per lane, after one warm-up turn each
INFLIGHT = 200
SLOW_MODEL_SECONDS = 1.0
CONTENTION_POSTS = 20
CONTENTION_ROUNDS = 10
BREAKDOWN_TURNS = 60  # per size, after 10 warm-up
TARGETS = {"overhead_p50_ms": 25.0, "overhead_p99_ms": 80.0, "overhead_ratio_5000_10": 1.2,
           "model_calls_per_turn": 1.5}
CHART = HERE / "turn_cost.png"
EVENT = ROOT / "tests" / "events" / "message.json"


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default)."""
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(samples: Sequence[float]) -> dict[str, float]:
    return {"p50": round(percentile(samples, 50), 2), "p90": round(percentile(samples, 90), 2),
            "p99": round(percentile(samples, 99), 2), "max": round(max(samples), 2),
            "n": len(samples)}


# -- the local stand-ins -----------------------------------------------------------------------


class TimedModelServer(FakeModelServer):
    """`FakeModelServer` that also adds up the seconds its handler spends on requests, and notes
    when each request arrived and the most it held at once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.busy_seconds = 0.0
        self.arrivals: list[float] = []
        self.in_flight = self.most_in_flight = 0

    async def _handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        self.arrivals.append(started)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await super()._handle(request)
        finally:
            self.in_flight -= 1
            self.busy_seconds += time.perf_counter() - started


_TEMPLATE: dict[str, Any] = json.loads(EVENT.read_text())


def message(text: str, *, conversation_id: str, service_url: str) -> dict[str, Any]:
    """A Teams personal-chat message activity (tests/events/message.json) with a fresh ID."""
    activity = copy.deepcopy(_TEMPLATE)
    activity.update(id=uuid.uuid4().hex, text=text, serviceUrl=service_url)
    activity["conversation"]["id"] = conversation_id
    return activity


def question(tag: str) -> str:
    return f"[{tag}] {exchange(0)[0].content}"


# -- workers -------------------------------------------------------------------------------------


@dataclass
class Worker:
    """One worker process (the dev host) and what was seen of it."""

    host: DevHostProcess
    process: psutil.Process | None = None
    hwm: float | None = None
    rss_samples_mb: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.host.url

    def vm_hwm_mb(self) -> float | None:
        """The kernel's peak resident set size of the worker (VmHWM), MB."""
        if self.process is None:
            return None
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def sample(self) -> None:
        if self.process is not None:
            with contextlib.suppress(psutil.Error):
                self.rss_samples_mb.append(self.process.memory_info().rss / 2**20)


def worker_env(connection_string: str, table_name: str, model: FakeModelServer) -> dict[str, str]:
    return {
        "CHAT_STORAGE_CONNECTION_STRING": connection_string,
        "CHAT_TABLE_NAME": table_name,
        "OPENAI_BASE_URL": model.base_url,
        "OPENAI_MODEL": "bench-model",
        "CHAT_MODEL_TIMEOUT_SECONDS": "30",
        "CHAT_INSTRUCTIONS": "You are a helpful, concise assistant in a chat.",
        "CHAT_HISTORY_MAX_MESSAGES": str(WINDOW_MESSAGES),
        "CHAT_HISTORY_TOKEN_BUDGET": str(TOKEN_BUDGET),
        # The unstreamed path, comparable with earlier runs: benchmarks/streaming.py streams.
        "CHAT_STREAMING": "off",
        # The reply within the POST, comparable with earlier runs: benchmarks/queue.py measures
        # the turn queue. The queue trigger is declared all the same: its connection, own queue.
        "CHAT_ANSWER_MODE": "inline",
        "AzureWebJobsStorage": connection_string,
        "CHAT_TURN_QUEUE": f"bench-{table_name.lower()}",
        # Capped at 8 messages, the window would fold a summary every third turn: the rolling
        # summary's cost is benchmarks/long_chat.py's to measure, at the default window.
        "CHAT_SUMMARY": "off",
    }


@contextlib.asynccontextmanager
async def workers(envs: Sequence[dict[str, str]], *, traced: bool = False,
                  root: Path = ROOT) -> AsyncIterator[list[Worker]]:
    """Start one worker per env (from the checkout at `root`: another commit's tree, for a before
    and after); sample their RSS every 50 ms until they stop."""
    started = [Worker(host=TracedHostProcess(env=env) if traced else DevHostProcess(env=env, root=root))
               for env in envs]
    try:
        for worker in started:
            await asyncio.to_thread(worker.host.start)
            worker.process = psutil.Process(worker.host.pid)
        sampler = asyncio.create_task(_sample(started))
        try:
            yield started
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            for worker in started:
                worker.sample()
    finally:
        for worker in started:
            worker.hwm = worker.vm_hwm_mb()
            await asyncio.to_thread(worker.host.stop)


async def _sample(started: Iterable[Worker]) -> None:
    while True:
        for worker in started:
            worker.sample()
        await asyncio.sleep(0.05)


@dataclass
class Posted:
    status: int
    ms: float
    body: bytes
    retry_after: float | None = None


async def post(http: aiohttp.ClientSession, worker: Worker, activity: dict[str, Any]) -> Posted:
    body = json.dumps(activity).encode()
    started = time.perf_counter()
    try:
        async with http.post(f"{worker.url}/api/messages", data=body,
                             headers={"Content-Type": "application/json"}) as response:
            content = await response.read()
            status = response.status
            retry_after = response.headers.get("Retry-After")
    except (aiohttp.ClientError, TimeoutError) as exc:
        content, status, retry_after = repr(exc).encode(), 0, None
    return Posted(status=status, ms=(time.perf_counter() - started) * 1000, body=content,
                  retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None)


# -- seeding --------------------------------------------------------------------------------------


async def seed(connection_string: str, table_name: str, conversations: dict[str, int]) -> None:
    """Store `n` messages in each conversation (user/assistant pairs, 49 a transaction).

    Each commit is made with the worker's window, as the bot's own turns are: so the head's copy
    of the newest turns is what a conversation grown by the bot would have (one imported by other
    means pays one range query on its first turn; tests/integration/test_store_table.py covers that path).
    """
    store = TableConversationStore.from_connection_string(connection_string, table_name=table_name)
    limit = asyncio.Semaphore(8)

    async def one(conversation_id: str, messages: int) -> None:
        async with limit:
            pairs = messages // 2
            for start in range(0, pairs, 49):
                batch = [m for index in range(start, min(pairs, start + 49)) for m in exchange(index)]
                window = await store.load_window(conversation_id, token_budget=TOKEN_BUDGET,
                                                 max_messages=WINDOW_MESSAGES)
                await store.commit_turn(window, activity_id=f"seed-{start}", messages=batch)

    try:
        await store.ping()
        await asyncio.gather(*(one(cid, n) for cid, n in conversations.items()))
    finally:
        await store.close()


# -- CPU accounting ------------------------------------------------------------------------------


def azurite_process(connection_string: str) -> psutil.Process | None:
    """The process listening on the connection string's table port (Azurite), if it can be seen."""
    endpoint = next((part.split("=", 1)[1] for part in connection_string.split(";")
                     if part.startswith("TableEndpoint=")), None)
    port = urlparse(endpoint).port if endpoint else None
    if port is None:
        return None
    with contextlib.suppress(psutil.Error):
        for connection in psutil.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr and \
                    connection.laddr.port == port and connection.pid:
                return psutil.Process(connection.pid)
    return None


def cpu_seconds(process: psutil.Process | None) -> float:
    if process is None:
        return math.nan
    try:
        times = process.cpu_times()
    except psutil.Error:
        return math.nan
    return float(times.user + times.system)


# -- phases -----------------------------------------------------------------------------------------


@dataclass
class Bench:
    connection_string: str
    http: aiohttp.ClientSession
    model: TimedModelServer
    connector: FakeConnector
    azurite: psutil.Process | None
    errors: dict[str, int] = field(default_factory=dict)

    def table(self) -> str:
        return "bench" + uuid.uuid4().hex[:12]

    def env(self, table_name: str) -> dict[str, str]:
        return worker_env(self.connection_string, table_name, self.model)

    def activity(self, text: str, conversation_id: str) -> dict[str, Any]:
        return message(text, conversation_id=conversation_id, service_url=self.connector.url)

    def replies_to(self, activity_ids: Iterable[str]) -> int:
        wanted = set(activity_ids)
        return sum(1 for reply in self.connector.messages() if reply.get("replyToId") in wanted)

    def count_errors(self, phase: str, results: Iterable[Posted]) -> int:
        bad = [result for result in results if result.status != 200]
        for result in bad[:3]:
            _log(f"    {phase}: HTTP {result.status}: {result.body[:200]!r}")
        self.errors[phase] = self.errors.get(phase, 0) + len(bad)
        return len(bad)


async def seed_sizes(bench: Bench, worker: Worker, *, small: int, label: str,
                     large: list[str] | None) -> tuple[list[str], list[str]]:
    """`small` new conversations of 10 messages (one turn each), and the 5,000-message ones (new
    unless given)."""
    tag = uuid.uuid4().hex[:6]
    smalls = [f"a:{label}-{SIZES[0]}-{tag}-{n}" for n in range(small)]
    larges = large or [f"a:{label}-{SIZES[1]}-{tag}-{n}" for n in range(LARGE_CONVERSATIONS)]
    started = time.perf_counter()
    await seed(bench.connection_string, worker.host.env["CHAT_TABLE_NAME"],
               {**dict.fromkeys(smalls, SIZES[0]), **({} if large else dict.fromkeys(larges, SIZES[1]))})
    _log(f"    seeded {len(smalls)} conversations of {SIZES[0]}" +
         ("" if large else f" and {len(larges)} of {SIZES[1]:,}") +
         f" in {time.perf_counter() - started:.1f}s")
    return smalls, larges


async def overhead_turns(bench: Bench, worker: Worker, *, warmup: int, turns: int, label: str,
                         large: list[str] | None = None,
                         cpu_of: Sequence[psutil.Process | None] = ()) -> Measured:
    """One turn at a time, alternating sizes; per size: wall, model and overhead ms."""
    small, large = await seed_sizes(bench, worker, small=warmup + turns, label=label, large=large)
    measured = Measured(samples={size: {"wall": [], "model": [], "overhead": []} for size in SIZES},
                        large=large)
    ids: list[str] = []
    results: list[Posted] = []
    started = time.perf_counter()
    for index in range(warmup + turns):
        if index == warmup:
            measured.cpu_before = [cpu_seconds(process) for process in cpu_of]
            started = time.perf_counter()
        lanes = [(SIZES[0], small[index]), (SIZES[1], large[index % len(large)])]
        for size, conversation_id in lanes if index % 2 == 0 else lanes[::-1]:
            activity = bench.activity(question(f"{label}-{size}-{index}"), conversation_id)
            model_before = bench.model.busy_seconds
            result = await post(bench.http, worker, activity)
            model_ms = (bench.model.busy_seconds - model_before) * 1000
            if index < warmup:
                continue
            ids.append(activity["id"])
            results.append(result)
            measured.samples[size]["wall"].append(result.ms)
            measured.samples[size]["model"].append(model_ms)
            measured.samples[size]["overhead"].append(result.ms - model_ms)
    measured.cpu_after = [cpu_seconds(process) for process in cpu_of]
    measured.wall_s = time.perf_counter() - started
    bench.count_errors(label, results)
    missing = len(ids) - bench.replies_to(ids)
    if missing:
        bench.errors[f"{label}_replies_missing"] = missing
    return measured


@dataclass
class Measured:
    samples: dict[int, dict[str, list[float]]]
    large: list[str] = field(default_factory=list)
    cpu_before: list[float] = field(default_factory=list)
    cpu_after: list[float] = field(default_factory=list)
    wall_s: float = 0.0


async def overhead_phase(bench: Bench) -> dict[str, Any]:
    _log(f"  overhead: {OVERHEAD_TURNS} turns at {SIZES[0]} and at {SIZES[1]:,} stored messages, "
         f"window {WINDOW_MESSAGES} messages, model latency 0")
    table_name = bench.table()
    async with workers([bench.env(table_name)]) as (worker,):
        run = await overhead_turns(bench, worker, warmup=OVERHEAD_WARMUP, turns=OVERHEAD_TURNS,
                                   label="overhead")
    measured = run.samples
    per_size = {str(size): summary(measured[size]["overhead"]) for size in SIZES}
    everything = [ms for size in SIZES for ms in measured[size]["overhead"]]
    return {
        "overhead_ms": {"p50": round(percentile(everything, 50), 2),
                        "p99": round(percentile(everything, 99), 2)},
        "overhead_ms_by_size": per_size,
        "overhead_ratio_5000_10": round(percentile(measured[SIZES[1]]["overhead"], 50) /
                                        percentile(measured[SIZES[0]]["overhead"], 50), 3),
        "wall_ms_by_size": {str(size): summary(measured[size]["wall"]) for size in SIZES},
        "model_server_ms_median": {str(size): round(median(measured[size]["model"]), 3)
                                   for size in SIZES},
        "worker_peak_rss_mb": _peak(worker),
        "table": table_name,
        "large": run.large,
    }


async def throughput_phase(bench: Bench) -> dict[str, Any]:
    _log(f"  throughput: {THROUGHPUT_LANES} conversations at once, {THROUGHPUT_TURNS} turns each, "
         f"one worker, model latency 0")
    tag = uuid.uuid4().hex[:6]
    lanes = [f"a:throughput-{tag}-{n}" for n in range(THROUGHPUT_LANES)]
    results: list[Posted] = []
    ids: list[str] = []

    async def lane(conversation_id: str, turns: int, keep: bool) -> None:
        for index in range(turns):
            activity = bench.activity(question(f"tp-{index}"), conversation_id)
            result = await post(bench.http, worker, activity)
            if keep:
                results.append(result)
                ids.append(activity["id"])

    async with workers([bench.env(bench.table())]) as (worker,):
        await asyncio.gather(*(lane(cid, 1, False) for cid in lanes))  # creates the conversations
        cpu_before = cpu_seconds(worker.process), cpu_seconds(bench.azurite)
        started = time.perf_counter()
        await asyncio.gather(*(lane(cid, THROUGHPUT_TURNS, True) for cid in lanes))
        wall = time.perf_counter() - started
        cpu_after = cpu_seconds(worker.process), cpu_seconds(bench.azurite)
        inflight = await inflight_phase(bench, worker)
    errors = bench.count_errors("throughput", results)
    turns = len(results) - errors
    missing = len(ids) - bench.replies_to(ids)
    if missing:
        bench.errors["throughput_replies_missing"] = missing
    return {
        "throughput_turns_per_s": round(turns / wall, 1),
        "throughput": {"conversations": THROUGHPUT_LANES, "turns": len(results), "errors": errors,
                       "wall_s": round(wall, 2), "latency_ms": summary([r.ms for r in results]),
                       "worker_cpu_percent": round((cpu_after[0] - cpu_before[0]) / wall * 100),
                       "azurite_cpu_percent": round((cpu_after[1] - cpu_before[1]) / wall * 100)},
        **inflight,
        "worker_peak_rss_mb": _peak(worker),
    }


async def inflight_phase(bench: Bench, worker: Worker) -> dict[str, Any]:
    _log(f"  in flight: {INFLIGHT} conversations at once, model latency {SLOW_MODEL_SECONDS:g} s, "
         f"same worker")
    tag = uuid.uuid4().hex[:6]
    activities = [bench.activity(question(f"slow-{n}"), f"a:slow-{tag}-{n}") for n in range(INFLIGHT)]
    bench.model.latency = SLOW_MODEL_SECONDS
    calls_before = bench.model.calls
    bench.model.most_in_flight = 0
    try:
        cpu_before = cpu_seconds(worker.process), cpu_seconds(bench.azurite)
        started = time.perf_counter()
        results = await asyncio.gather(*(post(bench.http, worker, a) for a in activities))
        wall = time.perf_counter() - started
        cpu_after = cpu_seconds(worker.process), cpu_seconds(bench.azurite)
    finally:
        bench.model.latency = 0.0
    worker_cpu, azurite_cpu = (after - before for after, before in zip(cpu_after, cpu_before, strict=True))
    arrivals = [at - started for at in bench.model.arrivals[calls_before:]]
    errors = bench.count_errors("inflight", results)
    return {
        "inflight_200_wall_s": round(wall, 2),
        "inflight": {"turns": INFLIGHT, "errors": errors, "model_latency_s": SLOW_MODEL_SECONDS,
                     "model_calls": bench.model.calls - calls_before,
                     "model_calls_most_at_once": bench.model.most_in_flight,
                     "model_calls_arrived_s": {"first": round(min(arrivals), 2),
                                               "median": round(median(arrivals), 2),
                                               "last": round(max(arrivals), 2)},
                     "latency_ms": summary([r.ms for r in results]),
                     "replies": bench.replies_to(a["id"] for a in activities),
                     "worker_cpu_s": round(worker_cpu, 2),
                     "azurite_cpu_s": round(azurite_cpu, 2),
                     # One Python process runs on one core: no worker can finish these turns
                     # sooner than its CPU seconds, nor sooner than one model latency.
                     "cpu_bound_floor_s": round(max(worker_cpu, SLOW_MODEL_SECONDS), 2)},
    }


async def contention_phase(bench: Bench) -> dict[str, Any]:
    _log(f"  contention: {CONTENTION_POSTS} messages at once to one conversation over two workers, "
         f"{CONTENTION_ROUNDS} rounds, model latency 0")
    table_name = bench.table()
    rounds: list[dict[str, Any]] = []
    latencies: list[float] = []
    async with workers([bench.env(table_name), bench.env(table_name)]) as pair:
        for number in range(CONTENTION_ROUNDS):
            conversation_id = f"a:contention-{uuid.uuid4().hex[:8]}"
            activities = [bench.activity(question(f"race-{number}-{k}"), conversation_id)
                          for k in range(CONTENTION_POSTS)]
            calls_before = bench.model.calls
            results = await asyncio.gather(*(post(bench.http, pair[k % 2], activity)
                                             for k, activity in enumerate(activities)))
            calls = bench.model.calls - calls_before
            stored_once = _stored_once(await _history(bench.http, pair[0], conversation_id), activities)
            latencies += [r.ms for r in results]
            round_: dict[str, Any] = {
                "stored_once": stored_once, "statuses": _counts(r.status for r in results),
                "model_calls": calls, "p99_ms": round(percentile([r.ms for r in results], 99), 1)}
            bench.count_errors("contention", results)
            # What a channel that honours Retry-After would get: each refused message once more.
            refused = [(k, a) for k, (a, r) in enumerate(zip(activities, results, strict=True))
                       if r.status != 200]
            if refused:
                await asyncio.sleep(max(results[k].retry_after or 1.0 for k, _ in refused))
                again = await asyncio.gather(*(post(bench.http, pair[k % 2], a) for k, a in refused))
                history = await _history(bench.http, pair[0], conversation_id)
                round_["after_one_retry"] = {
                    "statuses": _counts(r.status for r in again),
                    "stored_once": _stored_once(history, activities),
                    "messages_stored": len(history),
                    "model_calls": bench.model.calls - calls_before}
            rounds.append(round_)
    stored = sum(r["stored_once"] for r in rounds)
    calls = sum(r["model_calls"] for r in rounds)
    return {
        "posted": CONTENTION_POSTS,
        "stored_once": min(r["stored_once"] for r in rounds),
        "rounds_all_stored_once": f"{sum(r['stored_once'] == CONTENTION_POSTS for r in rounds)}/{len(rounds)}",
        "model_calls_per_turn": round(calls / max(1, stored), 3),
        "p99_ms": round(percentile(latencies, 99), 1),
        "p50_ms": round(percentile(latencies, 50), 1),
        "rounds": rounds,
        "workers": 2,
        "note": (f"{CONTENTION_ROUNDS} rounds of {CONTENTION_POSTS} posts, each to a new conversation, "
                 "alternating between the two workers; stored_once is the worst round, "
                 "model_calls_per_turn and the latencies cover every round; a refused post (503 "
                 "conversation_busy) is not retried for these figures: after_one_retry shows what a "
                 "retry honouring Retry-After adds"),
        "worker_peak_rss_mb": max(_peak(worker) or 0 for worker in pair),
    }


def _stored_once(history: list[dict[str, Any]], activities: list[dict[str, Any]]) -> int:
    """How many activities are stored exactly once: one user message, then one reply."""
    return sum(1 for a in activities
               if [m["role"] for m in history if m.get("activityId") == a["id"]] == ["user", "assistant"])


async def _history(http: aiohttp.ClientSession, worker: Worker, conversation_id: str) -> list[dict[str, Any]]:
    async with http.get(f"{worker.url}/api/conversations/{quote(conversation_id, safe='')}/messages") as response:
        response.raise_for_status()
        return list((await response.json())["messages"])


def _counts(values: Iterable[int]) -> dict[str, int]:
    counted: dict[str, int] = {}
    for value in values:
        counted[str(value)] = counted.get(str(value), 0) + 1
    return counted


def _peak(worker: Worker) -> float | None:
    hwm = worker.hwm or worker.vm_hwm_mb()
    sampled = max(worker.rss_samples_mb, default=0.0)
    best = max(hwm or 0.0, sampled)
    return round(best, 1) if best else None


async def breakdown_phase(bench: Bench, table_name: str, large: list[str]) -> dict[str, Any]:
    """Where a turn's time goes: step timings on the traced worker, CPU per turn by process, the
    client/Azurite split of each store call, and the openai SDK's own cost."""
    _log(f"  breakdown: {BREAKDOWN_TURNS} turns per size on benchmarks.traced_host (timing probes), "
         f"same table")
    with tempfile.TemporaryDirectory(prefix="chatstate-bench-") as scratch:
        trace = Path(scratch) / "trace.jsonl"
        env = {**bench.env(table_name), TRACE_ENV: str(trace)}
        async with workers([env], traced=True) as (worker,):
            run = await overhead_turns(bench, worker, warmup=10, turns=BREAKDOWN_TURNS, label="trace",
                                       large=large,
                                       cpu_of=(worker.process, bench.azurite, psutil.Process()))
        lines = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    measured, count = run.samples, 2 * BREAKDOWN_TURNS
    steps: dict[str, list[float]] = {}
    for turn in lines[-count:]:  # the measured turns are the last ones the worker handled
        seen: dict[str, float] = {}
        for name, _, ms in turn["steps"]:
            seen[name] = seen.get(name, 0.0) + ms
        seen[HANDLE] = turn["handle_ms"]
        for name, ms in seen.items():
            steps.setdefault(name, []).append(ms)
    wall_all = [ms for size in SIZES for ms in measured[size]["wall"]]
    cpu = {name: round((after - before) / count * 1000, 2) for name, before, after in
           zip(CPU_NAMES, run.cpu_before, run.cpu_after, strict=True)}
    return {
        "turns": count,
        "post_wall_ms_median": round(median(wall_all), 2),
        "step_ms_median": {name: round(median(values), 2) for name, values in sorted(steps.items())},
        "http_and_host_ms_median": round(median(wall_all) - median(steps[HANDLE]), 2),
        "cpu_ms_per_turn": cpu,
        "wall_ms_per_turn": round(run.wall_s / count * 1000, 2),
        "store_calls": await store_calls(bench, table_name),
        "openai_sdk": await openai_sdk_cost(bench),
    }


HANDLE = "handle (the whole turn in the app)"
CPU_NAMES = ("worker", "azurite", "load generator + stand-ins")


async def store_calls(bench: Bench, table_name: str, calls: int = 100) -> dict[str, dict[str, float]]:
    """Each store call of a turn made from this process: wall, this process's CPU, Azurite's CPU."""
    conversations = [f"a:ops-{uuid.uuid4().hex[:6]}-{n}" for n in range(calls)]
    await seed(bench.connection_string, table_name, dict.fromkeys(conversations, SIZES[0]))
    store = TableConversationStore.from_connection_string(bench.connection_string, table_name=table_name)
    me = psutil.Process()
    windows: dict[str, Any] = {}
    found: dict[str, dict[str, float]] = {}
    try:
        for name in ("load_window", "commit_turn", "mark_delivered"):
            before = time.perf_counter(), cpu_seconds(me), cpu_seconds(bench.azurite)
            for index, conversation_id in enumerate(conversations):
                activity_id = f"ops-{index}"
                if name == "load_window":
                    windows[conversation_id] = await store.load_window(
                        conversation_id, token_budget=8_000, max_messages=WINDOW_MESSAGES,
                        activity_id=activity_id)
                elif name == "commit_turn":
                    await store.commit_turn(windows[conversation_id], activity_id=activity_id,
                                            messages=exchange(index))
                else:
                    await store.mark_delivered(conversation_id, activity_id)
            after = time.perf_counter(), cpu_seconds(me), cpu_seconds(bench.azurite)
            wall, client, azurite = ((a - b) / calls * 1000 for a, b in zip(after, before, strict=True))
            found[name] = {"wall_ms": round(wall, 2), "client_cpu_ms": round(client, 2),
                           "azurite_cpu_ms": round(azurite, 2)}
    finally:
        await store.close()
    return found


async def openai_sdk_cost(bench: Bench, calls: int = 100) -> dict[str, Any]:
    """CPU ms per call of `ChatModel.complete` with no network (an in-memory transport), for the
    request the worker sent and for a default-window request of a long conversation; beside the
    SDK's typed path, `create(messages=...)`, which walks every message through its TypedDict
    transform (`ChatModel` passes them in `extra_body` instead)."""
    import httpx2

    from shared.model import build_model
    from shared.settings import load_settings

    sent = next((r["messages"] for r in reversed(bench.model.requests) if len(r["messages"]) > 3), None)
    if sent is None:
        return {}
    answer = {"id": "x", "object": "chat.completion", "created": 0, "model": "bench-model",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    transport = httpx2.MockTransport(lambda request: httpx2.Response(200, json=answer))
    settings = load_settings({"OPENAI_BASE_URL": "http://model.invalid/v1", "OPENAI_MODEL": "bench-model"})
    model = build_model(settings.model, http_client=httpx2.AsyncClient(transport=transport))
    # A default-window request for a long conversation: 8,000 tokens of these messages.
    default = [sent[0]] + [m.to_openai() for index in range(32) for m in exchange(index)] + [sent[-1]]
    found: dict[str, Any] = {}
    try:
        for label, messages in ((f"{len(sent)} messages (this benchmark's window)", sent),
                                (f"{len(default)} messages (default window, long conversation)", default)):
            found[label] = {
                "complete_ms": round(await _cpu_ms(lambda m=messages: model.complete(m), calls), 2),
                "typed_create_ms": round(await _cpu_ms(
                    lambda m=messages: model.client.chat.completions.create(
                        model="bench-model", messages=m, max_tokens=1000), calls), 2)}
    finally:
        await model.close()
    return found


async def _cpu_ms(call: Any, calls: int) -> float:
    for _ in range(5):
        await call()
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1000


# -- run ------------------------------------------------------------------------------------------------


async def run(connection_string: str) -> dict[str, Any]:
    """Run every phase, print the figures, draw the chart; return the `webhook` section."""
    started = time.perf_counter()
    _log(f"webhook benchmark on {azurite_version()}, {machine(brief=True)}")
    model = TimedModelServer()
    connector = FakeConnector()
    await model.start()
    await connector.start()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=60))
    bench = Bench(connection_string=connection_string, http=http, model=model, connector=connector,
                  azurite=azurite_process(connection_string))
    try:
        overhead = await overhead_phase(bench)
        throughput = await throughput_phase(bench)
        contention = await contention_phase(bench)
        breakdown = await breakdown_phase(bench, overhead.pop("table"), overhead.pop("large"))
    finally:
        await http.close()
        await connector.stop()
        await model.stop()
    peaks = {"overhead": overhead.pop("worker_peak_rss_mb"),
             "throughput_and_inflight": throughput.pop("worker_peak_rss_mb"),
             "contention": contention.pop("worker_peak_rss_mb")}
    results: dict[str, Any] = {
        "overhead_ms": overhead["overhead_ms"],
        "overhead_ratio_5000_10": overhead["overhead_ratio_5000_10"],
        "throughput_turns_per_s": throughput["throughput_turns_per_s"],
        "inflight_200_wall_s": throughput["inflight_200_wall_s"],
        "contention": contention,
        "peak_rss_mb": max(value or 0.0 for value in peaks.values()),
        "overhead_ms_by_size": overhead["overhead_ms_by_size"],
        "wall_ms_by_size": overhead["wall_ms_by_size"],
        "model_server_ms_median": overhead["model_server_ms_median"],
        "throughput": throughput["throughput"],
        "inflight": throughput["inflight"],
        "peak_rss_mb_by_phase": peaks,
        "breakdown": breakdown,
        "errors": bench.errors,
        "targets": TARGETS,
        "settings": {"CHAT_HISTORY_MAX_MESSAGES": WINDOW_MESSAGES, "CHAT_HISTORY_TOKEN_BUDGET": TOKEN_BUDGET,
                     "auth": "off (no CLIENT_ID): replies go to the loopback FakeConnector",
                     "overhead_turns_per_size": OVERHEAD_TURNS, "warmup_turns_per_size": OVERHEAD_WARMUP},
        "storage": azurite_version(),
        "machine": machine(),
        "code": code_version(),
        "measured_at": now_iso(),
        "seconds": round(time.perf_counter() - started),
    }
    _print(results)
    _chart(results)
    return results


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _print(r: dict[str, Any]) -> None:
    o, by = r["overhead_ms"], r["overhead_ms_by_size"]
    t, i, c, b = r["throughput"], r["inflight"], r["contention"], r["breakdown"]
    print()
    print("Webhook: POST /api/messages over HTTP → dev host (real function_app) → Azurite; local "
          "OpenAI-compatible model and Bot Connector stand-ins")
    print(f"{r['storage']}, {r['machine']}; code {r['code']}")
    print(f"window CHAT_HISTORY_MAX_MESSAGES={WINDOW_MESSAGES}: conversations of {SIZES[0]} and of "
          f"{SIZES[1]:,} messages both fill it, so their ratio isolates history length")
    print()
    print(f"turn overhead beyond the model call, ms (POST wall − model server time; model latency 0; "
          f"{OVERHEAD_TURNS} turns per size after {OVERHEAD_WARMUP} warm-up, alternating)")
    print(f"  {'stored':>8} | {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}")
    for size in SIZES:
        row = by[str(size)]
        print(f"  {size:>8,} | {row['p50']:>6.1f} {row['p90']:>6.1f} {row['p99']:>6.1f} {row['max']:>6.1f}")
    print(f"  {'both':>8} | {o['p50']:>6.1f} {'':>6} {o['p99']:>6.1f}")
    p50_ok, p99_ok = o["p50"] < TARGETS["overhead_p50_ms"], o["p99"] < TARGETS["overhead_p99_ms"]
    print(f"  p50 {o['p50']:.1f} ms (target < {TARGETS['overhead_p50_ms']:g}: {_met(p50_ok)}), "
          f"p99 {o['p99']:.1f} ms (target < {TARGETS['overhead_p99_ms']:g}: {_met(p99_ok)})")
    ratio, ratio_target = r["overhead_ratio_5000_10"], TARGETS["overhead_ratio_5000_10"]
    print(f"  ratio p50({SIZES[1]:,}) / p50({SIZES[0]}) = {ratio:.2f} (target ≤ {ratio_target:g}: "
          f"{_met(ratio <= ratio_target)})")
    print(f"  model server time per turn (median, subtracted above): {r['model_server_ms_median']} ms")
    print()
    print(f"throughput, {t['conversations']} conversations at once, one worker, model latency 0: "
          f"{r['throughput_turns_per_s']:.1f} turns/s ({t['turns']} turns in {t['wall_s']:.1f} s, "
          f"{t['errors']} errors; latency p50 {t['latency_ms']['p50']:.0f} ms, p99 "
          f"{t['latency_ms']['p99']:.0f} ms; CPU: worker {t['worker_cpu_percent']} %, Azurite "
          f"{t['azurite_cpu_percent']} %)")
    print(f"in flight, {i['turns']} conversations at once, model latency {i['model_latency_s']:g} s, "
          f"one worker: {r['inflight_200_wall_s']:.2f} s wall ({i['errors']} errors, {i['replies']} "
          f"replies; latency p50 {i['latency_ms']['p50']:.0f} ms, max {i['latency_ms']['max']:.0f} ms)")
    arrived = i["model_calls_arrived_s"]
    print(f"  model calls reached the model {arrived['first']:.2f}–{arrived['last']:.2f} s after the "
          f"posts (median {arrived['median']:.2f} s), at most {i['model_calls_most_at_once']} at once")
    print(f"  worker CPU {i['worker_cpu_s']:.2f} s (+ Azurite {i['azurite_cpu_s']:.2f} s on the other "
          f"core): on one core no worker finishes sooner than max(CPU, model latency) = "
          f"{i['cpu_bound_floor_s']:.2f} s; one turn at a time would take ≥ "
          f"{i['turns'] * i['model_latency_s']:.0f} s")
    calls_ok = c["model_calls_per_turn"] <= TARGETS["model_calls_per_turn"]
    print(f"contention, {c['posted']} at once to one conversation over 2 workers, {len(c['rounds'])} "
          f"rounds: stored exactly once {c['stored_once']}/{c['posted']} in the worst round "
          f"({_met(c['stored_once'] == c['posted'])}; rounds with all {c['posted']}: "
          f"{c['rounds_all_stored_once']}), model calls per stored turn "
          f"{c['model_calls_per_turn']:.2f} (target ≤ {TARGETS['model_calls_per_turn']:g}: "
          f"{_met(calls_ok)}), p50 {c['p50_ms']:.0f} ms, p99 {c['p99_ms']:.0f} ms")
    for number, round_ in enumerate(c["rounds"], start=1):
        retry = round_.get("after_one_retry")
        print(f"    round {number}: stored once {round_['stored_once']}, model calls {round_['model_calls']}, "
              f"statuses {round_['statuses']}, p99 {round_['p99_ms']:.0f} ms" +
              (f"; after one retry of the refused: stored once {retry['stored_once']}, statuses "
               f"{retry['statuses']}" if retry else ""))
    print(f"peak RSS of a worker: {r['peak_rss_mb']:.1f} MB (by phase: {r['peak_rss_mb_by_phase']})")
    print()
    steps = b["step_ms_median"]
    print(f"where a turn's time goes: traced worker, {b['turns']} turns, medians, ms: POST wall "
          f"{b['post_wall_ms_median']:.1f} = app {steps[HANDLE]:.1f} + HTTP/uvicorn/host "
          f"{b['http_and_host_ms_median']:.1f}")
    for name, ms in steps.items():
        print(f"    {name:<38} {ms:>6.2f}")
    print(f"  CPU per turn, ms: {b['cpu_ms_per_turn']} (wall per turn {b['wall_ms_per_turn']:.1f} ms, "
          f"{machine(brief=True)})")
    print("  each store call from this process (wall / client CPU / Azurite CPU, ms): " + "; ".join(
        f"{name} {v['wall_ms']:.1f} / {v['client_cpu_ms']:.1f} / {v['azurite_cpu_ms']:.1f}"
        for name, v in b["store_calls"].items()))
    for label, v in b["openai_sdk"].items():
        print(f"  openai SDK with no network, {label}: ChatModel.complete {v['complete_ms']:.1f} ms CPU; "
              f"the SDK's typed create(messages=...) {v['typed_create_ms']:.1f} ms")
    if any(r["errors"].values()):
        print(f"errors: {r['errors']}")
    print()


def _chart(r: dict[str, Any]) -> None:
    """Per-turn cost against stored history: the webhook's overhead beside the store's per-turn
    cost, chatstate's and the whole-partition baseline's (from the store section of results.json)."""
    series: dict[str, dict[float, float]] = {
        "chatstate webhook: turn overhead p50 (HTTP, model time excluded)":
            {size: r["overhead_ms_by_size"][str(size)]["p50"] for size in SIZES}}
    note = f"{r['storage']}; {machine(brief=True)}; window {WINDOW_MESSAGES} messages"
    try:
        store = json.loads(RESULTS.read_text())["store"]
        series["chatstate store: load_window + commit_turn (median)"] = {
            int(size): ms for size, ms in store["turn_ms_median"].items()}
        series["baseline store: whole-partition read + blind write (median)"] = {
            int(size): ms for size, ms in store["baseline_turn_ms_median"].items()}
        note += f"; store figures of {store['measured_at']}"
    except (OSError, ValueError, KeyError):
        note += "; no store figures in results.json"
    line_chart(CHART, series, title="Per-turn cost against stored history",
               xlabel="messages stored in the conversation (log scale)",
               ylabel="ms per turn (log scale)", log_x=True, log_y=True, note=note)
    print(f"chart: {CHART.relative_to(HERE.parent)}")
