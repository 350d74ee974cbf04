"""The conversation store's per-turn cost against stored history size, beside a whole-partition read.

One turn = `load_window` + `commit_turn` of a user/assistant pair, timed on the client against a
real Azurite, for conversations holding 10, 1,000 and 5,000 messages. Two windows are measured:

- the primary one, at most 8 messages (4,000 tokens): every size fills it, so each turn reads the
  same: the head row, whose copy of the newest turns answers the window (a conversation it cannot
  answer is read from its rows in one range query; then the head keeps a copy again), and the
  5,000/10 ratio isolates history length;
- the realistic one, at most 50 messages / 4,000 tokens (about 34 of these messages): 10 stored
  messages only partly fill it, so its 5,000/10 ratio also counts the window filling up (the
  head's copy is larger at 5,000).

Conversations are seeded through the store with the measured window, as the bot's own turns
build them, so the head's copy is what the bot would leave.

The baseline is what the Azure Functions OpenAI extension's assistant bindings do for each message:
query every row of the conversation's partition, then write the two new messages and merge the state
row in one batch without an ETag (last writer wins). It does not depend on a window.

Each history size, and each of the three measured sides, gets its own table: Azurite evaluates a
query's filter on every row of the table (Azure reads only the key range), so rows of other sizes or
sides would make the larger sizes look slower. The three sides of a size take turns, and rotate who
goes first; the sizes are seeded first and then measured turn by turn across sizes, so slow drift
(Azurite's growing heap, other load on the machine) does not fall on one size only.

A conversation grows by two messages a turn; so that "10 messages" stays near 10, a size gets as
many conversations as it needs for each to grow by at most 10 % while it is measured.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from shared.messages import ChatMessage, utc_now
from shared.store import TableConversationStore

from .chart import line_chart
from .common import HERE, azurite_version, code_version, machine, median, now_iso, p90

SIZES = (10, 1_000, 5_000)
TOKEN_BUDGET = 4_000
MAX_MESSAGES = 8  # the primary window: every size fills it
REALISTIC_MAX_MESSAGES = 50  # the secondary window: 4,000 tokens hold about 34 of these messages
WARMUP_TURNS = 5
MEASURED_TURNS = 100
MAX_GROWTH = 0.10
RATIO_TARGET = 1.2
CHART = HERE / "store_cost.png"

_QUESTION = "Could you remind me what we decided about the rollout plan and who owns each step? "
_ANSWER = ("Sure. We agreed to roll out region by region, starting with the smallest, and to wait a "
           "day between regions so the error budget can tell us whether to go on. Dana owns the "
           "runbook, Ken owns monitoring and the rollback switch, and you own the sign-off. ")


def exchange(index: int) -> list[ChatMessage]:
    """A user message (~150 characters) and its reply (~500), as a chat of everyday length has."""
    return [ChatMessage(role="user", content=f"[{index}] {_QUESTION * 2}".strip()),
            ChatMessage(role="assistant", content=f"[{index}] {_ANSWER * 2}".strip())]


class Ours:
    """chatstate's `TableConversationStore`: one point read of the head (its copy of the newest
    turns answers the window), one commit."""

    def __init__(self, connection_string: str, table_name: str, *, max_messages: int = MAX_MESSAGES) -> None:
        self.store = TableConversationStore.from_connection_string(connection_string,
                                                                   table_name=table_name)
        self.max_messages = max_messages

    async def seed(self, conversation_id: str, messages: int) -> None:
        """`messages` stored messages, 49 pairs a transaction, committed with the measured window
        as the bot's own turns are (so the head's copy of the newest turns is what the bot leaves)."""
        pairs = messages // 2
        for start in range(0, pairs, 49):
            batch = [m for index in range(start, min(pairs, start + 49)) for m in exchange(index)]
            window = await self.store.load_window(conversation_id, token_budget=TOKEN_BUDGET,
                                                  max_messages=self.max_messages)
            await self.store.commit_turn(window, activity_id=f"seed-{start}", messages=batch)

    async def turn(self, conversation_id: str, index: int) -> tuple[float, float, int]:
        """(load ms, commit ms, rows read) of one turn."""
        activity_id = f"turn-{index}"
        started = time.perf_counter()
        window = await self.store.load_window(conversation_id, token_budget=TOKEN_BUDGET,
                                              max_messages=self.max_messages, activity_id=activity_id)
        loaded = time.perf_counter()
        await self.store.commit_turn(window, activity_id=activity_id, messages=exchange(index))
        done = time.perf_counter()
        return (loaded - started) * 1000, (done - loaded) * 1000, window.rows_read

    async def close(self) -> None:
        await self.store.close()


class WholePartition:
    """The baseline: read the whole partition each turn, append without a concurrency check.

    Rows as the OpenAI extension lays them out: a state row, and one row per message in order.
    """

    STATE = "state"

    def __init__(self, connection_string: str, table_name: str) -> None:
        self.table = TableClient.from_connection_string(connection_string, table_name=table_name)

    @staticmethod
    def _message_row(pk: str, index: int, message: ChatMessage) -> dict[str, Any]:
        return {"PartitionKey": pk, "RowKey": f"msg-{index:07d}", "Content": message.content,
                "Role": message.role, "CreatedAt": message.timestamp}

    async def seed(self, conversation_id: str, messages: int) -> None:
        pk = conversation_id
        rows: list[dict[str, Any]] = [
            {"PartitionKey": pk, "RowKey": self.STATE, "Exists": True, "CreatedAt": utc_now(),
             "LastUpdatedAt": utc_now(), "TotalMessages": messages, "TotalTokens": 0}]
        rows += [self._message_row(pk, number, message) for number, message in enumerate(
            (m for index in range(messages // 2) for m in exchange(index)), start=1)]
        for start in range(0, len(rows), 100):
            await self.table.submit_transaction([("create", row) for row in rows[start:start + 100]])

    async def turn(self, conversation_id: str, index: int) -> tuple[float, float, int]:
        """(read ms, write ms, rows read) of one turn."""
        pk = conversation_id
        started = time.perf_counter()
        history: list[ChatMessage] = []
        state: dict[str, Any] | None = None
        rows = 0
        async for entity in self.table.query_entities("PartitionKey eq @pk", parameters={"pk": pk}):
            rows += 1
            if entity["RowKey"] == self.STATE:
                state = dict(entity)
            else:
                history.append(ChatMessage(role=entity["Role"], content=entity["Content"]))
        loaded = time.perf_counter()
        assert state is not None, f"baseline conversation {pk} was not seeded"
        total = int(state["TotalMessages"])
        user, reply = exchange(index)
        await self.table.submit_transaction([
            ("create", self._message_row(pk, total + 1, user)),
            ("create", self._message_row(pk, total + 2, reply)),
            ("update", {"PartitionKey": pk, "RowKey": self.STATE, "TotalMessages": total + 2,
                        "LastUpdatedAt": utc_now()}, {"mode": UpdateMode.MERGE}),
        ])
        done = time.perf_counter()
        return (loaded - started) * 1000, (done - loaded) * 1000, rows

    async def close(self) -> None:
        await self.table.close()


@dataclass
class Samples:
    read_ms: list[float] = field(default_factory=list)
    write_ms: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)

    def add(self, read_ms: float, write_ms: float, rows: int) -> None:
        self.read_ms.append(read_ms)
        self.write_ms.append(write_ms)
        self.rows.append(rows)

    @property
    def turn_ms(self) -> list[float]:
        return [read + write for read, write in zip(self.read_ms, self.write_ms, strict=True)]


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


Side = Ours | WholePartition


def _rotated(items: list[Any], by: int) -> list[Any]:
    by %= len(items)
    return items[by:] + items[:by]


@dataclass
class Size:
    """One history size: its three sides, each in a table of its own, and their conversations."""

    size: int
    sides: dict[str, Side]
    lanes: dict[str, list[str]]
    per_conversation: int
    samples: dict[str, Samples]

    @classmethod
    async def seeded(cls, connection_string: str, size: int, turns: int) -> Size:
        per_conversation = max(1, int(size * MAX_GROWTH) // 2)
        conversations = math.ceil(turns / per_conversation)
        tag = uuid.uuid4().hex[:6]
        ours = Ours(connection_string, f"ours{size}x{tag}")
        realistic = Ours(connection_string, f"real{size}x{tag}", max_messages=REALISTIC_MAX_MESSAGES)
        baseline = WholePartition(connection_string, f"base{size}x{tag}")
        sides: dict[str, Side] = {"ours": ours, "realistic": realistic, "baseline": baseline}
        lanes = {name: [f"{name}-{size}-{tag}-{n}" for n in range(conversations)] for name in sides}
        measured = cls(size=size, sides=sides, lanes=lanes, per_conversation=per_conversation,
                       samples={name: Samples() for name in sides})
        await ours.store.ping()  # creates the table
        await realistic.store.ping()
        await baseline.table.create_table()
        started = time.perf_counter()
        for name, side in sides.items():
            for conversation_id in lanes[name]:
                await side.seed(conversation_id, size)
        _log(f"  {size:>5,} messages: seeded {conversations} conversation(s) for each of "
             f"{len(sides)} sides in {time.perf_counter() - started:.1f}s")
        return measured

    async def turn(self, index: int) -> None:
        """One turn of each side, who goes first rotating."""
        lane = index // self.per_conversation
        for name in _rotated(list(self.sides), index):
            read_ms, write_ms, rows = await self.sides[name].turn(self.lanes[name][lane], index)
            if index >= WARMUP_TURNS:
                self.samples[name].add(read_ms, write_ms, rows)

    async def close(self) -> None:
        for side in self.sides.values():
            with contextlib.suppress(Exception):
                table = side.store._table if isinstance(side, Ours) else side.table
                await table.delete_table()
            await side.close()


async def _measure(connection_string: str) -> dict[int, dict[str, Samples]]:
    """Seed every size, then take turns across sizes and sides, so slow drift (Azurite's heap, the
    machine's other load) falls on every size alike."""
    turns = WARMUP_TURNS + MEASURED_TURNS
    sizes: list[Size] = []
    try:
        for size in SIZES:
            sizes.append(await Size.seeded(connection_string, size, turns))
        _log(f"  {turns} turns of each side at each size, interleaved...")
        for index in range(turns):
            for measured in _rotated(sizes, index):
                await measured.turn(index)
    finally:
        for measured in sizes:
            await measured.close()
    return {measured.size: measured.samples for measured in sizes}


def _fmt_ratio(value: float) -> str:
    return f"{value:.2f}"


async def run(connection_string: str) -> dict[str, Any]:
    """Measure, print the table, draw the chart; return the `store` section of results.json."""
    started = time.perf_counter()
    _log(f"store benchmark on {azurite_version()}: one table per history size and side")
    measured = await _measure(connection_string)

    def section(side: str, what: str) -> dict[str, float]:
        return {str(size): round(_stat(measured[size][side], what), 2) for size in SIZES}

    def rows(side: str) -> dict[str, int]:
        return {str(size): int(median(measured[size][side].rows)) for size in SIZES}

    def ratio(values: dict[str, float], over: int) -> float:
        return round(values[str(SIZES[-1])] / values[str(over)], 3)

    def figures(side: str) -> dict[str, Any]:
        """One side's figures, under the key names results.json has always used."""
        turns = section(side, "turn_median")
        return {"turn_ms_median": turns, "turn_ms_p90": section(side, "turn_p90"),
                "ratio_5000_10": ratio(turns, SIZES[0]), "ratio_5000_1000": ratio(turns, SIZES[1]),
                "rows_read_per_turn": rows(side), "read_ms_median": section(side, "read_median"),
                "write_ms_median": section(side, "write_median")}

    ours, realistic, baseline = figures("ours"), figures("realistic"), figures("baseline")
    for side in (ours, realistic):  # chatstate's turn: a window load, then a commit
        side["load_ms_median"] = side.pop("read_ms_median")
        side["commit_ms_median"] = side.pop("write_ms_median")
    results: dict[str, Any] = {
        **ours,
        "ratio_target": RATIO_TARGET,
        "window": {"token_budget": TOKEN_BUDGET, "max_messages": MAX_MESSAGES,
                   "why": "every size fills it, so each turn reads the same and the ratios "
                          "isolate history length"},
        **{f"baseline_{name}": value for name, value in baseline.items()},
        "realistic_window": {
            "window": {"token_budget": TOKEN_BUDGET, "max_messages": REALISTIC_MAX_MESSAGES},
            **realistic,
            "why": "a window an app would use; 10 stored messages fill only part of it, so "
                   "ratio_5000_10 here also counts the window filling up (a larger copy in the "
                   "head to read and write back); ratio_5000_1000 compares two full windows",
        },
        "tables": "one per history size and side (chatstate with each window, baseline): Azurite "
                  "filters every row of a table per query, so unrelated rows would inflate the "
                  "larger sizes",
        "turns_measured": MEASURED_TURNS,
        "warmup_turns": WARMUP_TURNS,
        "storage": azurite_version(),
        "machine": machine(),
        "code": code_version(),
        "measured_at": now_iso(),
    }
    _print_table(results)

    def by_size(side: dict[str, Any]) -> dict[float, float]:
        return {size: side["turn_ms_median"][str(size)] for size in SIZES}

    line_chart(
        CHART,
        {f"chatstate, window {MAX_MESSAGES} messages": by_size(ours),
         f"chatstate, window {REALISTIC_MAX_MESSAGES} messages / {TOKEN_BUDGET:,} tokens":
             by_size(realistic),
         "baseline: whole-partition read + blind write": by_size(baseline)},
        title="Store cost of one chat turn against stored history",
        xlabel="messages stored in the conversation (log scale)",
        ylabel="per-turn cost, median ms (log scale)",
        log_x=True, log_y=True,
        note=f"{results['storage']}; {MEASURED_TURNS} turns after {WARMUP_TURNS} warm-up; "
             f"{machine(brief=True)}",
    )
    print(f"chart: {CHART.relative_to(HERE.parent)}  ({time.perf_counter() - started:.0f}s in all)")
    return results


def _stat(samples: Samples, what: str) -> float:
    values = {"turn": samples.turn_ms, "read": samples.read_ms, "write": samples.write_ms}
    kind, stat = what.split("_")
    return median(values[kind]) if stat == "median" else p90(values[kind])


def _print_table(results: dict[str, Any]) -> None:
    ours, base = results["turn_ms_median"], results["baseline_turn_ms_median"]
    ours90, base90 = results["turn_ms_p90"], results["baseline_turn_ms_p90"]
    rows, base_rows = results["rows_read_per_turn"], results["baseline_rows_read_per_turn"]
    real = results["realistic_window"]
    print()
    print("Store: per-turn cost = load_window + commit_turn (user + assistant), ms, by stored history")
    print(f"{MEASURED_TURNS} turns after {WARMUP_TURNS} warm-up, {results['storage']}, "
          f"{results['machine']}; one table per size and side; code {results['code']}")
    print()
    header = (f"{'stored':>8} | {'ours w=' + str(MAX_MESSAGES):>9} {'p90':>6} {'rows':>4} | "
              f"{'ours w=' + str(REALISTIC_MAX_MESSAGES):>9} {'p90':>6} {'rows':>4} | "
              f"{'baseline':>8} {'p90':>6} {'rows':>5} | {'base/ours':>9}")
    print(header)
    print("-" * len(header))
    for size in SIZES:
        key = str(size)
        print(f"{size:>8,} | {ours[key]:>9.1f} {ours90[key]:>6.1f} {rows[key]:>4} | "
              f"{real['turn_ms_median'][key]:>9.1f} {real['turn_ms_p90'][key]:>6.1f} "
              f"{real['rows_read_per_turn'][key]:>4} | "
              f"{base[key]:>8.1f} {base90[key]:>6.1f} {base_rows[key]:>5} | "
              f"{base[key] / ours[key]:>8.1f}x")
    print("-" * len(header))
    met = "met" if results["ratio_5000_10"] <= RATIO_TARGET else "NOT met"
    print(f"ratio {SIZES[-1]}/{SIZES[0]} (primary, window {MAX_MESSAGES}: {rows[str(SIZES[0])]} rows "
          f"read at every size): ours {_fmt_ratio(results['ratio_5000_10'])} (target ≤ {RATIO_TARGET}: "
          f"{met}), baseline {_fmt_ratio(results['baseline_ratio_5000_10'])}")
    print(f"ratio {SIZES[-1]}/{SIZES[1]}: ours {_fmt_ratio(results['ratio_5000_1000'])}, "
          f"baseline {_fmt_ratio(results['baseline_ratio_5000_1000'])}")
    print(f"window {REALISTIC_MAX_MESSAGES} messages / {TOKEN_BUDGET:,} tokens (secondary): ratio "
          f"{SIZES[-1]}/{SIZES[0]} {_fmt_ratio(real['ratio_5000_10'])} (rows read: "
          f"{real['rows_read_per_turn'][str(SIZES[0])]} at {SIZES[0]}, "
          f"{real['rows_read_per_turn'][str(SIZES[-1])]} at {SIZES[-1]:,}; the window holds "
          f"{SIZES[0]} messages at {SIZES[0]} and about 34 beyond), "
          f"{SIZES[-1]}/{SIZES[1]} {_fmt_ratio(real['ratio_5000_1000'])}")
    print()
