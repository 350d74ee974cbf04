"""One conversation, one order, measured through the dev host with the turn queue, against the queue before it.

Two sides, each the real app served by `devtools.host` from its own checkout, on the same Azurite,
venv and stand-ins: **after** (this checkout) and **before** (commit `BASELINE`, the turn queue
before issue 26: each accepted message its own queue message and its own turn, in any order),
exported with `git archive` into a temporary folder. Auth is off (replies go to the loopback
connector stand-in, which enforces Teams' streaming contract); summaries are off. Clocks are this
process's, except the pickup, which the `answer` function logs. Phases:

accept      ACCEPT_ROUNDS × ACCEPTS messages per side (after WARMUP untimed), one at a time,
            alternating sides, each to a new personal chat (streaming on: the webhook sends
            "Thinking…" before its 200): POST → 200, first with the `answer` trigger polling
            another queue service (nothing answers in the webhook's process, as on Flex
            Consumption, where `answer` scales on instances of its own), then with it answering
            in the same process (earlier turns waiting on a model that takes 60 s).
pickup      PICKUPS messages per side to new personal chats, 0.65 s apart alternating sides (each
            side's queue polling caught in different states of its backoff), a model that answers
            at once: enqueue → the drain starting (the log: the ticket's enqueue time → picked up,
            then → "holding the conversation"); before: enqueue → picked up, where its turn starts;
            and 200 → the model asked.
burst       BURSTS trials per side: in a personal chat, a message whose answer takes the model 2 s,
            then three more 0.3 s apart while it runs: model calls, replies, the last message's
            200 → the last reply, Teams' rules broken.
throughput  CONVERSATIONS × MESSAGES over TWO workers per side (two dev host processes on one table
            and one queue, as two instances), a model that answers at once, streaming off (as in
            group chats and Web Chat: in a personal chat Teams' one streaming request a second
            would set the pace), THROUGHPUT_ROUNDS rounds, sides alternating:
              conversational  each conversation sends its next message when the last one's reply
                              came: turns/s; a message's POST → its reply; a conversation's first
                              POST → its last reply
              rapid           each conversation sends its messages back to back (each after the
                              last 200): messages answered/s, turns, model calls; a
                              conversation's last POST → its last reply (the spread shows whether
                              conversations wait for each other); stored in order?
storage     the same two workers per side behind a counting proxy (devtools/storage_counter.py):
              alone  ALONE conversations × 2 messages, one message at a time, each left to go quiet:
                     requests during the POST (the webhook) and after its 200 (the answer), for a
                     conversation's first message and for a later one
              rapid  one rapid round, counted until the queue is empty and storage has gone quiet
                     (a ticket that finds its conversation held leaves a wake-up for the hold's end)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import psutil
from aiohttp import web
from azure.storage.queue.aio import QueueClient

from devtools.azurite import azurite_connection_string, free_port, start_service, stop_process
from devtools.fake_channel import FakeConnector
from devtools.fake_model import FakeModelServer
from devtools.storage_counter import Counts, Seen, StorageCounter, endpoints
from shared.inbox import inbox_table_name

from .common import ROOT, azurite_version, code_version, machine, median, now_iso
from .webhook import Worker, _history, cpu_seconds, message, percentile, post, worker_env, workers

#: Today's queue, before the order (issue 26's parent on main).
BASELINE = "e2ec774"
ACCEPTS = 100
ACCEPT_ROUNDS = 3
WARMUP = 3
PICKUPS = 20
BURSTS = 5
BURST_FIRST_SECONDS = 2.0
CONVERSATIONS = 20
MESSAGES = 5
THROUGHPUT_ROUNDS = 3
ALONE = 5
QUIET_SECONDS = 1.0
TARGETS = {"post_to_200_p99_ms": 100.0}
SIDES = ("after", "before")
_REPLY = re.compile(r"reply to '(.*)' after \d+ messages")
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*) "
                       r"\[conversation='([^']*)' activity='([^']*)'\]$", re.MULTILINE)
_PICKED_UP = re.compile(r"picked up after (\d+) ms \((arrival|dequeue 1 )")

#: Hosts stopped with turns still waiting on the model: the stand-in's "cannot write to closing
#: transport" tracebacks that follow are expected, and not printed.
logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


# -- the stand-ins --------------------------------------------------------------------------------


class AskedModel(FakeModelServer):
    """Notes when each request came and the user texts it carried (its default reply names the
    newest: "reply to '<text>' after N messages")."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[float, tuple[str, ...]]] = []

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        users = tuple(str(m.get("content")) for m in body.get("messages", []) if m.get("role") == "user")
        self.asked.append((time.perf_counter(), users))
        return await super()._handle(request)

    def calls(self, tag: str) -> int:
        """Requests whose newest user message carries `tag`."""
        return sum(1 for _, users in self.asked if users and users[-1].startswith(tag))

    def first_asked(self, text: str) -> float | None:
        return next((at for at, users in self.asked if users and users[-1] == text), None)


class Deliveries:
    """The messages the connector stand-in took, by conversation: when each arrived and the user
    text its answer names."""

    def __init__(self, connector: FakeConnector) -> None:
        self.connector = connector
        self.by_conversation: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self._records = 0
        self._activities = 0
        self._arrived: dict[int, float] = {}

    def update(self) -> None:
        requests, activities = self.connector.requests, self.connector.activities
        for record in requests[self._records:]:
            self._arrived[id(record["activity"])] = record["at"]
        self._records = len(requests)
        for activity in activities[self._activities:]:
            at = self._arrived.pop(id(activity), time.perf_counter())
            if activity.get("type") == "message":
                named = _REPLY.search(str(activity.get("text", "")))
                self.by_conversation[activity["conversation"]["id"]].append(
                    (at, named[1] if named else ""))
        self._activities = len(activities)

    def named(self, conversation_id: str) -> set[str]:
        return {text for _, text in self.by_conversation[conversation_id]}

    def answered(self, conversation_id: str, texts: Sequence[str], *, ordered: bool) -> bool:
        """Every text answered: named by a reply, or (in order) followed by one that is."""
        named = self.named(conversation_id)
        return texts[-1] in named if ordered else all(text in named for text in texts)

    def last(self, conversation_id: str) -> float:
        return max(at for at, _ in self.by_conversation[conversation_id])

    async def until(self, done: Callable[[], bool], *, seconds: float) -> bool:
        deadline = time.perf_counter() + seconds
        self.update()
        while not done():
            if time.perf_counter() > deadline:
                return False
            await asyncio.sleep(0.01)
            self.update()
        return True


# -- the two sides ----------------------------------------------------------------------------------


@contextlib.contextmanager
def baseline_tree(commit: str = BASELINE) -> Iterator[Path]:
    """The files of `commit` in a temporary folder (run with this venv: the requirements are the same)."""
    with tempfile.TemporaryDirectory(prefix="chatstate-before-") as folder:
        archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
        yield Path(folder)


@dataclass
class Bench:
    connection_string: str
    http: aiohttp.ClientSession
    model: AskedModel
    connector: FakeConnector
    deliveries: Deliveries
    roots: dict[str, Path]
    loads: dict[str, list[float]] = field(default_factory=dict)
    #: POSTs refused (status and reason); each was sent again.
    refused: list[str] = field(default_factory=list)

    def env(self, side: str, *, streaming: bool, storage: str | None = None,
            trigger_storage: str | None = None) -> dict[str, str]:
        """A side's worker settings, on a table and queue of its own (`storage`: through a proxy;
        `trigger_storage`: where the `answer` trigger polls, if not there)."""
        name = f"ord{side[:2]}{uuid.uuid4().hex[:12]}"
        through = storage or self.connection_string
        return {**worker_env(through, name, self.model), "AzureWebJobsStorage": trigger_storage or through,
                "CHAT_ANSWER_MODE": "queue", "CHAT_STREAMING": "on" if streaming else "off",
                "CHAT_TURN_QUEUE": f"q-{name}", "CHAT_MODEL_TIMEOUT_SECONDS": "90"}

    @contextlib.asynccontextmanager
    async def hosts(self, *, count: int, streaming: bool,
                    trigger_storage: str | None = None) -> AsyncIterator[dict[str, list[Worker]]]:
        """`count` workers per side, each side's on one table and queue."""
        envs = {side: self.env(side, streaming=streaming, trigger_storage=trigger_storage) for side in SIDES}
        async with workers([envs["after"]] * count, root=self.roots["after"]) as after, \
                workers([envs["before"]] * count, root=self.roots["before"]) as before:
            yield {"after": after, "before": before}

    def activity(self, text: str, conversation_id: str) -> dict[str, Any]:
        """A message of the conversation's own person (each conversation a different user of one
        tenant, as in a company's Teams)."""
        activity = message(text, conversation_id=conversation_id, service_url=self.connector.url)
        person = uuid.uuid5(uuid.NAMESPACE_URL, conversation_id)
        activity["from"] = {**activity["from"], "id": f"29:{person.hex}", "aadObjectId": str(person)}
        return activity

    async def posted(self, worker: Worker, text: str, conversation_id: str) -> float:
        return await self.send(worker, self.activity(text, conversation_id))

    async def send(self, worker: Worker, activity: dict[str, Any]) -> float:
        """POST one activity, sent again after a refusal as the channel would (after its
        Retry-After, twice at most; each refusal counted): the accepted POST's milliseconds."""
        for attempt in range(3):
            result = await post(self.http, worker, activity)
            if result.status == 200:
                return result.ms
            # Status 0: this process's connection to the worker was reset (an idle keep-alive
            # connection the worker had closed), not a refusal of the worker's.
            self.refused.append(f"{result.status} {result.body[:120]!r}")
            _log(f"    refused ({'sent again' if attempt < 2 else 'given up'}): {self.refused[-1]}")
            await asyncio.sleep(result.retry_after or 1.0)
        raise RuntimeError(f"not accepted: {self.refused[-1]}")

    def note_load(self, phase: str) -> None:
        self.loads.setdefault(phase, []).append(_load())


def _conversation(kind: str) -> tuple[str, str]:
    """A new personal chat's ID and the tag its texts start with."""
    tag = uuid.uuid4().hex[:10]
    return f"a:{kind}-{tag}", tag


def _sides(index: int) -> tuple[str, ...]:
    """Both sides, who goes first alternating."""
    return SIDES if index % 2 == 0 else SIDES[::-1]


# -- phases ------------------------------------------------------------------------------------------


async def accept_phase(bench: Bench) -> dict[str, Any]:
    """POST → 200 with the `answer` function elsewhere (its trigger polls another, empty, queue
    service: on Flex Consumption `answer` runs on instances of its own, never the webhook's), then
    with it in the webhook's process (the dev host's one process: each accepted message's drain
    starts beside the next POST)."""
    bench.model.latency = 60.0
    found: dict[str, dict[str, Any]] = {}
    queue_port = free_port()
    elsewhere = start_service("queue", port=queue_port)
    polled = azurite_connection_string(port=free_port(), queue_port=queue_port)  # no table there
    try:
        for where, trigger in (("alone", polled), ("beside_answer", None)):
            times: dict[str, list[float]] = {side: [] for side in SIDES}
            async with bench.hosts(count=1, streaming=True, trigger_storage=trigger) as hosts:
                bench.note_load("accept")
                for number in range(WARMUP + ACCEPTS * ACCEPT_ROUNDS):
                    for side in _sides(number):
                        conversation, tag = _conversation("accept")
                        ms = await bench.posted(hosts[side][0], f"{tag} question {number}", conversation)
                        if number >= WARMUP:
                            times[side].append(ms)
                bench.note_load("accept")
            found[where] = {side: _posts(posts) for side, posts in times.items()}
    finally:
        bench.model.latency = 0.0
        stop_process(elsewhere)
    return {side: {**found["alone"][side], "beside_answer": found["beside_answer"][side]} for side in SIDES}


def _posts(posts: list[float]) -> dict[str, Any]:
    rounds = [posts[i * ACCEPTS:(i + 1) * ACCEPTS] for i in range(ACCEPT_ROUNDS)]
    return {"p50_ms": round(percentile(posts, 50), 1), "p99_ms": round(percentile(posts, 99), 1),
            "max_ms": round(max(posts), 1), "posts": len(posts),
            "rounds_p50_ms": [round(percentile(r, 50), 1) for r in rounds],
            "rounds_p99_ms": [round(percentile(r, 99), 1) for r in rounds]}


@dataclass
class Pickup:
    activity_id: str
    text: str
    conversation_id: str
    answered_at: float  # the POST's 200


async def pickup_and_burst_phases(bench: Bench) -> tuple[dict[str, Any], dict[str, Any]]:
    async with bench.hosts(count=1, streaming=True) as hosts:
        bench.note_load("pickup")
        posted: dict[str, list[Pickup]] = {side: [] for side in SIDES}
        for number in range(PICKUPS):
            for side in _sides(number):
                conversation, tag = _conversation("pickup")
                activity = bench.activity(f"{tag} pickup", conversation)
                await bench.send(hosts[side][0], activity)
                posted[side].append(Pickup(activity_id=activity["id"], text=activity["text"],
                                           conversation_id=conversation, answered_at=time.perf_counter()))
                await asyncio.sleep(0.65)
        every = [p for side in SIDES for p in posted[side]]
        if not await bench.deliveries.until(lambda: all(
                bench.deliveries.named(p.conversation_id) for p in every), seconds=60):
            raise RuntimeError("the pickup phase's messages were not all answered")
        bench.note_load("pickup")
        pickups = {side: _pickups(hosts[side][0], posted[side], bench.model) for side in SIDES}
        _log("order: burst phase")
        bench.note_load("burst")
        trials: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
        bench.model.latency = BURST_FIRST_SECONDS
        try:
            for number in range(BURSTS):
                for side in _sides(number):
                    trials[side].append(await _burst(bench, hosts[side][0], ordered=side == "after"))
        finally:
            bench.model.latency = 0.0
        bench.note_load("burst")
    bursts = {side: {"model_calls": median([t["model_calls"] for t in trials[side]]),
                     "replies": median([t["replies"] for t in trials[side]]),
                     "last_message_to_reply_s": round(median([t["last_message_to_reply_s"]
                                                               for t in trials[side]]), 3),
                     "teams_rules_broken": sum(sum(t["broken"].values()) for t in trials[side]),
                     "trials": trials[side]} for side in SIDES}
    return pickups, bursts


def _log_times(worker: Worker) -> dict[str, dict[str, tuple[float, str]]]:
    """The host log's lines by activity: {activity: {"picked": (at, text), "holding": (at, text)}}."""
    found: dict[str, dict[str, tuple[float, str]]] = defaultdict(dict)
    for stamp, text, _, activity in _LOG_LINE.findall(worker.host.log_text()):
        at = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if text.startswith("picked up after"):
            found[activity].setdefault("picked", (at, text))
        elif text.startswith("holding the conversation"):
            found[activity].setdefault("holding", (at, text))
    return found


def _pickups(worker: Worker, posted: list[Pickup], model: AskedModel) -> dict[str, Any]:
    lines = _log_times(worker)
    queue_s, drain_s, asked_s = [], [], []
    for pickup in posted:
        seen = lines.get(pickup.activity_id, {})
        picked = _PICKED_UP.search(seen["picked"][1]) if "picked" in seen else None
        if picked is not None:
            waited = int(picked[1]) / 1000
            queue_s.append(waited)
            if "holding" in seen:  # after: the drain starts once it holds the conversation
                drain_s.append(waited + seen["holding"][0] - seen["picked"][0])
        asked = model.first_asked(pickup.text)
        if asked is not None:
            asked_s.append(asked - pickup.answered_at)
    start = drain_s or queue_s  # before: the turn starts where the message is picked up
    return {"start_median_s": round(median(start), 3), "start_p99_s": round(percentile(start, 99), 3),
            "queue_median_s": round(median(queue_s), 3), "queue_p99_s": round(percentile(queue_s, 99), 3),
            "asked_after_200_median_s": round(median(asked_s), 3),
            "asked_after_200_p99_s": round(percentile(asked_s, 99), 3),
            "measured": len(start), "start_s": [round(s, 3) for s in start]}


async def _burst(bench: Bench, worker: Worker, *, ordered: bool) -> dict[str, Any]:
    conversation, tag = _conversation("burst")
    texts = [f"{tag} {word}" for word in ("one", "two", "three", "four")]
    await bench.posted(worker, texts[0], conversation)
    if not await bench.deliveries.until(lambda: bench.model.first_asked(texts[0]) is not None, seconds=30):
        raise RuntimeError("the burst's first message never reached the model")
    for text in texts[1:]:
        await asyncio.sleep(0.3)
        await bench.posted(worker, text, conversation)
    last_posted = time.perf_counter()
    complete = await bench.deliveries.until(
        lambda: bench.deliveries.answered(conversation, texts, ordered=ordered), seconds=60)
    await asyncio.sleep(1.5)  # a late or duplicate reply would come now
    bench.deliveries.update()
    return {"model_calls": bench.model.calls(tag), "replies": len(bench.deliveries.by_conversation[conversation]),
            "last_message_to_reply_s": round(bench.deliveries.last(conversation) - last_posted, 3)
            if bench.deliveries.by_conversation[conversation] else None,
            "complete": complete, "broken": _kinds(bench.connector.streams.broken(conversation))}


def _kinds(broken: list[str]) -> dict[str, int]:
    """Teams' rules broken, counted by kind ("throttled: …", "overlapping: …")."""
    return dict(Counter(text.split(":", 1)[0] for text in broken))


async def _conversational(bench: Bench, pair: list[Worker], *, ordered: bool) -> dict[str, Any]:
    del ordered  # one message at a time: every message gets its own reply on both sides
    posts: list[float] = []
    latencies: list[float] = []

    conversations: list[str] = []

    async def one(index: int) -> tuple[float, float, str]:
        conversation, tag = _conversation("conv")
        conversations.append(conversation)
        first = time.perf_counter()
        for number in range(MESSAGES):
            text = f"{tag} m{number}"
            started = time.perf_counter()
            posts.append(await bench.posted(pair[(index + number) % 2], text, conversation))
            if not await bench.deliveries.until(lambda t=text: t in bench.deliveries.named(conversation),
                                                seconds=60):
                raise RuntimeError(f"no reply to {text!r}")
            latencies.append(bench.deliveries.last(conversation) - started)
        return first, bench.deliveries.last(conversation), tag

    done = await asyncio.gather(*(one(index) for index in range(CONVERSATIONS)))
    wall = max(end for _, end, _ in done) - min(start for start, _, _ in done)
    spans = [end - start for start, end, _ in done]
    turns = CONVERSATIONS * MESSAGES
    return {"wall_s": round(wall, 3), "turns_per_s": round(turns / wall, 2),
            "messages_per_s": round(turns / wall, 2),
            "model_calls_per_turn": round(sum(bench.model.calls(tag) for _, _, tag in done) / turns, 3),
            "reply_p50_s": round(percentile(latencies, 50), 3), "reply_p99_s": round(percentile(latencies, 99), 3),
            "conversation_s": _spread(spans), "post_p50_ms": round(percentile(posts, 50), 1),
            "post_p99_ms": round(percentile(posts, 99), 1), "conversations": conversations}


async def _rapid(bench: Bench, pair: list[Worker], *, ordered: bool, verify: bool = True) -> dict[str, Any]:
    """`verify`: read each history back (is it stored in order?)."""
    posts: list[float] = []

    async def one(index: int) -> dict[str, Any]:
        conversation, tag = _conversation("rapid")
        texts = [f"{tag} m{number}" for number in range(MESSAGES)]
        first = time.perf_counter()
        for number, text in enumerate(texts):
            posts.append(await bench.posted(pair[(index + number) % 2], text, conversation))
        last_posted = time.perf_counter()
        complete = await bench.deliveries.until(
            lambda: bench.deliveries.answered(conversation, texts, ordered=ordered), seconds=120)
        return {"conversation": conversation, "tag": tag, "texts": texts, "first": first,
                "last_posted": last_posted, "end": bench.deliveries.last(conversation), "complete": complete}

    done = await asyncio.gather(*(one(index) for index in range(CONVERSATIONS)))
    await asyncio.sleep(1.0)  # late replies (a turn answered twice) would come now
    bench.deliveries.update()
    wall = max(d["end"] for d in done) - min(d["first"] for d in done)
    replies = sum(len(bench.deliveries.by_conversation[d["conversation"]]) for d in done)
    messages = CONVERSATIONS * MESSAGES
    in_order = 0
    for d in done if verify else ():
        history = await _history(bench.http, pair[0], d["conversation"])
        users = [m["content"] for m in history if m["role"] == "user"]
        in_order += users == d["texts"]
    return {"wall_s": round(wall, 3), "messages_per_s": round(messages / wall, 2),
            "turns_per_s": round(replies / wall, 2), "turns": replies,
            "model_calls": sum(bench.model.calls(d["tag"]) for d in done),
            "conversation_s": _spread([d["end"] - d["last_posted"] for d in done]),
            "complete": sum(d["complete"] for d in done), "stored_in_order": in_order if verify else None,
            "post_p50_ms": round(percentile(posts, 50), 1), "post_p99_ms": round(percentile(posts, 99), 1),
            "conversations": [d["conversation"] for d in done]}


def _round_pickups(pair: list[Worker], conversations: set[str]) -> dict[str, float]:
    """How long the round's messages waited in the queue (the `answer` function's log), and how
    many waited more than a second: a worker that stops polling while its running functions are
    more than host.json's newBatchThreshold leaves new messages waiting."""
    waited = [int(found[1]) / 1000 for worker in pair
              for _, text, conversation, _ in _LOG_LINE.findall(worker.host.log_text())
              if conversation in conversations and (found := _PICKED_UP.search(text))]
    return {"median": round(median(waited), 3), "max": round(max(waited), 3),
            "over_1s": sum(1 for w in waited if w > 1.0)}


def azurite_processes(connection_string: str) -> list[psutil.Process]:
    """The processes serving the connection string's table and queue ports (Azurite's two services)."""
    ports = {urlparse(url).port for url in endpoints(connection_string).values()}
    found = []
    with contextlib.suppress(psutil.Error):
        for connection in psutil.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr and \
                    connection.laddr.port in ports and connection.pid:
                found.append(psutil.Process(connection.pid))
    return found


def _cpu(processes: Sequence[psutil.Process | None]) -> float:
    return sum(cpu_seconds(process) for process in processes if process is not None)


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(median(values), 3), "max": round(max(values), 3)}


async def throughput_phase(bench: Bench) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {side: {"conversational": [], "rapid": []}
                                                        for side in SIDES}
    azurite = azurite_processes(bench.connection_string)
    async with bench.hosts(count=2, streaming=False) as hosts:
        for number in range(THROUGHPUT_ROUNDS):
            for mode, measure in (("conversational", _conversational), ("rapid", _rapid)):
                for side in _sides(number):
                    bench.note_load("throughput")
                    _log(f"order: throughput round {number + 1}, {mode}, {side}")
                    pair = hosts[side]
                    cpu = [_cpu([w.process for w in pair]), _cpu(azurite)]
                    found = await measure(bench, pair, ordered=side == "after")
                    workers_s, azurite_s = _cpu([w.process for w in pair]) - cpu[0], _cpu(azurite) - cpu[1]
                    turns = found.get("turns", CONVERSATIONS * MESSAGES)
                    found["cpu_ms_per_turn"] = {"workers": round(workers_s * 1000 / turns, 2),
                                                "azurite": round(azurite_s * 1000 / turns, 2)}
                    found["queue_pickup_s"] = _round_pickups(pair, set(found.pop("conversations")))
                    runs[side][mode].append(found)
        bench.note_load("throughput")
    return {side: {mode: _medians(found) for mode, found in modes.items()} for side, modes in runs.items()}


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over rounds of each figure (of each part of a spread), and the rounds."""
    summary: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            summary[key] = {part: round(median([r[key][part] for r in runs]), 3) for part in value}
        else:
            summary[key] = round(median([r[key] for r in runs]), 3)
    return {**summary, "rounds": runs}


async def storage_phase(bench: Bench) -> dict[str, Any]:
    counted: dict[str, Any] = {}
    for side in SIDES:
        counter = StorageCounter(bench.connection_string)
        await counter.start()
        try:
            env = bench.env(side, streaming=False, storage=counter.connection_string)
            async with workers([env, env], root=bench.roots[side]) as pair:
                _log(f"order: storage, {side}: one message at a time")
                alone = await _alone(bench, pair, counter, inbox=inbox_table_name(env["CHAT_TABLE_NAME"]))
                _log(f"order: storage, {side}: rapid (waits for the queue to empty)")
                rapid = await _counted_rapid(bench, pair, counter, env, ordered=side == "after")
        finally:
            await counter.stop()
        counted[side] = {"alone": alone, "rapid": rapid}
    return counted


async def _quiet(counter: StorageCounter, *, seconds: float = QUIET_SECONDS, limit: float = 60.0) -> None:
    """Until no storage work for `seconds` (idle polls aside), or `limit` seconds."""
    for _ in range(int(limit * 10)):
        if time.perf_counter() - counter.last_work >= seconds:
            return
        await asyncio.sleep(0.1)


_ANSWER_SIDE = ("get", "poll", "delete", "update")


async def _alone(bench: Bench, pair: list[Worker], counter: StorageCounter, *,
                 inbox: str) -> dict[str, Any]:
    parts: dict[str, dict[str, Counts]] = {which: {"webhook": Counts(), "answer": Counts()}
                                           for which in ("first", "later")}
    areas: dict[str, Counter[str]] = {"first": Counter(), "later": Counter()}
    for index in range(ALONE):
        conversation, tag = _conversation("alone")
        for number, which in enumerate(("first", "later")):
            text = f"{tag} m{number}"
            await _quiet(counter)
            before, start = counter.counts.copy(), len(counter.seen)
            await bench.posted(pair[(index + number) % 2], text, conversation)
            accepted = counter.counts.copy()
            if not await bench.deliveries.until(
                    lambda t=text, c=conversation: t in bench.deliveries.named(c), seconds=60):
                raise RuntimeError(f"no reply to {text!r}")
            await _quiet(counter)
            webhook, answer = accepted - before, counter.counts - accepted
            for key in [k for k in webhook.requests if k[1] in _ANSWER_SIDE]:  # a poll in the POST's time
                answer.requests[key] += webhook.requests.pop(key)
                answer.entities[key] += webhook.entities.pop(key, 0)
            parts[which]["webhook"] = _sum(parts[which]["webhook"], webhook)
            parts[which]["answer"] = _sum(parts[which]["answer"], answer)
            areas[which] += _areas(counter.seen[start:], inbox=inbox)
    return {which: {**{half: _per_message(counts, ALONE) for half, counts in halves.items()},
                    "by_area": _per(areas[which], ALONE)}
            for which, halves in parts.items()}


def _areas(seen: Sequence[Seen], *, inbox: str) -> Counter[str]:
    """Work requests by what they touch: the inbox table, the queue, the conversations table's
    conversation partitions, its index partitions (`~idx-`), its budget ledgers (`~budget-`)."""
    found: Counter[str] = Counter()
    for request in seen:
        if request.kind in ("poll", "setup"):
            continue
        resource = (request.target or request.path).rsplit("/", 1)[-1]
        found["queue" if request.service == "queue" else "inbox" if resource.startswith(inbox)
              else "budgets" if "~budget-" in resource else "indexes" if "~idx-" in resource
              else "conversations"] += 1
    return found


def _per(counted: Counter[str], divisor: int) -> dict[str, float]:
    return {key: round(value / divisor, 2) for key, value in sorted(counted.items())}


def _sum(a: Counts, b: Counts) -> Counts:
    return Counts(requests=a.requests + b.requests, entities=a.entities + b.entities)


async def _counted_rapid(bench: Bench, pair: list[Worker], counter: StorageCounter, env: dict[str, str],
                         *, ordered: bool) -> dict[str, Any]:
    await _quiet(counter)
    before, start = counter.counts.copy(), len(counter.seen)
    found = await _rapid(bench, pair, ordered=ordered, verify=False)
    queue = QueueClient.from_connection_string(bench.connection_string, env["CHAT_TURN_QUEUE"])
    try:
        for _ in range(180):  # the wake-ups left for a hold's end come back within CHAT_HOLD_SECONDS
            if not (await queue.get_queue_properties()).approximate_message_count:
                break
            await asyncio.sleep(0.5)
    finally:
        await queue.close()
    await _quiet(counter)
    counts = counter.counts - before
    messages = CONVERSATIONS * MESSAGES
    return {"per_message": _per_message(counts, messages),
            "by_area": _per(_areas(counter.seen[start:], inbox=inbox_table_name(env["CHAT_TABLE_NAME"])),
                            messages),
            "per_turn_requests": round(_work(counts) / max(1, found["turns"]), 2),
            "turns": found["turns"], "model_calls": found["model_calls"], "messages": messages,
            "idle_polls": counts.requests[("queue", "poll")]}


def _work(counts: Counts) -> int:
    return counts.total(kinds=("read", "query", "write", "batch", "put", "get", "delete", "update"))


def _per_message(counts: Counts, messages: int) -> dict[str, Any]:
    """Storage requests per message by kind, and the totals that matter against the targets."""
    return {"requests": round(_work(counts) / messages, 2),
            "table_reads": round(counts.total(service="table", kinds=("read", "query")) / messages, 2),
            "table_writes": round(counts.total(service="table", kinds=("write", "batch")) / messages, 2),
            "entities_written": round(counts.total(service="table", kinds=("write", "batch"),
                                                   entities=True) / messages, 2),
            "queue_operations": round(counts.total(service="queue", kinds=("put", "get", "delete", "update"))
                                      / messages, 2),
            "queue_messages_put": round(counts.requests[("queue", "put")] / messages, 2),
            "by_kind": counts.per(messages)}


# -- the run --------------------------------------------------------------------------------------------


async def run(connection_string: str) -> dict[str, Any]:
    started = time.perf_counter()
    _log(f"order benchmark on {azurite_version()}, {machine(brief=True)}, against {BASELINE}; "
         f"load average {_load()}")
    model = AskedModel()
    connector = FakeConnector()
    await model.start()
    await connector.start()
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=120))
    try:
        with baseline_tree() as before_root:
            bench = Bench(connection_string=connection_string, http=http, model=model, connector=connector,
                          deliveries=Deliveries(connector), roots={"after": ROOT, "before": before_root})
            _log("order: accept phase")
            accept = await accept_phase(bench)
            _log("order: pickup phase")
            pickup, burst = await pickup_and_burst_phases(bench)
            throughput = await throughput_phase(bench)
            counted = await storage_phase(bench)
    finally:
        await http.close()
        await connector.stop()
        await model.stop()
    results: dict[str, Any] = {
        "figures": {side: _figures(side, accept, pickup, burst, throughput, counted) for side in SIDES},
        "accept": accept, "pickup": pickup, "burst": burst, "throughput": throughput, "storage": counted,
        "targets": TARGETS, "baseline": BASELINE,
        "settings": {"workers": "two dev host processes per side on one table and one queue "
                                "(throughput, storage); one (accept, pickup, burst)",
                     "host.json queues": "batchSize 8, newBatchThreshold 4, maxPollingInterval 0.5 s",
                     "CHAT_SUMMARY": "off", "auth": "off"},
        "load_average": bench.loads, "refused_posts": bench.refused,
        "storage_emulator": azurite_version(), "machine": machine(), "code": code_version(),
        "measured_at": now_iso(), "seconds": round(time.perf_counter() - started),
    }
    _print(results)
    return results


def _figures(side: str, accept: dict[str, Any], pickup: dict[str, Any], burst: dict[str, Any],
             throughput: dict[str, Any], counted: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one side (docs quote these)."""
    conversational, rapid = throughput[side]["conversational"], throughput[side]["rapid"]
    alone = counted[side]["alone"]
    first = {half: alone["first"][half]["requests"] for half in ("webhook", "answer")}
    later = {half: alone["later"][half]["requests"] for half in ("webhook", "answer")}
    return {
        "post_to_200_p50_ms": accept[side]["p50_ms"], "post_to_200_p99_ms": accept[side]["p99_ms"],
        "post_to_200_beside_answer_p50_ms": accept[side]["beside_answer"]["p50_ms"],
        "post_to_200_beside_answer_p99_ms": accept[side]["beside_answer"]["p99_ms"],
        "pickup_median_s": pickup[side]["start_median_s"], "pickup_p99_s": pickup[side]["start_p99_s"],
        "burst_model_calls": burst[side]["model_calls"],
        "burst_last_message_to_reply_s": burst[side]["last_message_to_reply_s"],
        "turns_per_s": conversational["turns_per_s"],
        "conversation_spread_s": conversational["conversation_s"],
        "cpu_ms_per_turn": conversational["cpu_ms_per_turn"],
        "queue_pickup_max_s": max(rapid["queue_pickup_s"]["max"], conversational["queue_pickup_s"]["max"]),
        "rapid_messages_per_s": rapid["messages_per_s"], "rapid_turns_per_s": rapid["turns_per_s"],
        "rapid_model_calls": rapid["model_calls"], "rapid_spread_s": rapid["conversation_s"],
        "rapid_stored_in_order": rapid["stored_in_order"],
        "storage_requests_first_message": round(first["webhook"] + first["answer"], 2),
        "storage_requests_per_message": round(later["webhook"] + later["answer"], 2),
        "storage_by_area": alone["later"]["by_area"],
        "storage_requests_per_message_rapid": counted[side]["rapid"]["per_message"]["requests"],
        "queue_operations_per_message": round(alone["later"]["webhook"]["queue_operations"]
                                              + alone["later"]["answer"]["queue_operations"], 2),
    }


def _print(r: dict[str, Any]) -> None:
    after, before = r["figures"]["after"], r["figures"]["before"]

    def cpu(c: dict[str, float]) -> str:
        return f"{c['workers']:.1f} + {c['azurite']:.1f} ms"

    def spread(s: dict[str, float]) -> str:
        return f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f} s"

    rows = [
        ("POST → 200 p50 (the answer elsewhere)", f"{after['post_to_200_p50_ms']:.1f} ms",
         f"{before['post_to_200_p50_ms']:.1f} ms", ""),
        ("POST → 200 p99 (the answer elsewhere)", f"{after['post_to_200_p99_ms']:.1f} ms",
         f"{before['post_to_200_p99_ms']:.1f} ms",
         "≤ 100 ms: " + ("met" if after["post_to_200_p99_ms"] <= 100 else "NOT met")),
        ("POST → 200 p50 / p99, the answer in the same process",
         f"{after['post_to_200_beside_answer_p50_ms']:.1f} / {after['post_to_200_beside_answer_p99_ms']:.1f} ms",
         f"{before['post_to_200_beside_answer_p50_ms']:.1f} / {before['post_to_200_beside_answer_p99_ms']:.1f} ms",
         ""),
        ("pickup: enqueue → drain (before: turn) starts, median / p99",
         f"{after['pickup_median_s']:.3f} / {after['pickup_p99_s']:.3f} s",
         f"{before['pickup_median_s']:.3f} / {before['pickup_p99_s']:.3f} s", ""),
        ("burst of four: model calls", f"{after['burst_model_calls']}", f"{before['burst_model_calls']}", ""),
        ("burst of four: last message → last reply", f"{after['burst_last_message_to_reply_s']:.2f} s",
         f"{before['burst_last_message_to_reply_s']:.2f} s", ""),
        ("20 × 5, conversational: turns/s", f"{after['turns_per_s']:.1f}", f"{before['turns_per_s']:.1f}", ""),
        ("  CPU per turn: workers + Azurite", cpu(after["cpu_ms_per_turn"]), cpu(before["cpu_ms_per_turn"]), ""),
        ("  longest wait in the queue (either mode)", f"{after['queue_pickup_max_s']:.2f} s",
         f"{before['queue_pickup_max_s']:.2f} s", ""),
        ("  a conversation's 5 turns, min / median / max", spread(after["conversation_spread_s"]),
         spread(before["conversation_spread_s"]), ""),
        ("20 × 5, rapid: messages answered/s", f"{after['rapid_messages_per_s']:.1f}",
         f"{before['rapid_messages_per_s']:.1f}", ""),
        ("  turns/s; model calls", f"{after['rapid_turns_per_s']:.1f}; {after['rapid_model_calls']}",
         f"{before['rapid_turns_per_s']:.1f}; {before['rapid_model_calls']}", ""),
        ("  last POST → last reply, min / median / max", spread(after["rapid_spread_s"]),
         spread(before["rapid_spread_s"]), ""),
        ("  conversations stored in order", f"{after['rapid_stored_in_order']}/{CONVERSATIONS}",
         f"{before['rapid_stored_in_order']}/{CONVERSATIONS}", ""),
        ("storage requests, a conversation's first message", f"{after['storage_requests_first_message']}",
         f"{before['storage_requests_first_message']}", ""),
        ("storage requests per message (a later one)", f"{after['storage_requests_per_message']}",
         f"{before['storage_requests_per_message']}", ""),
        ("  of which queue operations", f"{after['queue_operations_per_message']}",
         f"{before['queue_operations_per_message']}", ""),
        ("storage requests per message, rapid", f"{after['storage_requests_per_message_rapid']}",
         f"{before['storage_requests_per_message_rapid']}", ""),
    ]
    print(f"\n| figure | after | before ({BASELINE}) | target |\n| --- | --- | --- | --- |")
    for name, a, b, target in rows:
        print(f"| {name} | {a} | {b} | {target} |")
    print(f"load average by phase: {r['load_average']}")
