"""The Table backend's budget ledgers: a user's or tenant's day (`shared/ledger.py`), changed only
through `TableRows.update_row` (the head's own retry loop), listed for usage reports, purged by
retention.

A ledger's partition is its account's (`~budget-user-…`, `~budget-tenant-…`), its row key the UTC
day, so an account's last N days are one range query and a day's change is one point read and
one conditional write.

A tenant's row is every one of its calls' to change, twice (reserve, settle). Changes of one row
from one process go together (group commit): while a write of the row is under way, the changes
that arrive wait, and the next write makes them all, each applied in turn to what the one before
it left. So the row has as many writers racing on its ETag as instances, not as calls in flight
(50 first calls at once of one tenant on three instances: 16 of them failed after eight lost
races without it, none with it; benchmarks/README.md "budgets"). And the row as this process last
wrote it is kept (`_known`, the newest `KNOWN_ROWS`): the next change tries it first, without a
read, and only a row another instance changed meanwhile is read again (`update_row`'s `known`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from azure.data.tables import TableEntity

from ..ledger import Account, Ledger, Level
from ._codec import Entity
from ._table_base import TableRows
from ._wire import Operation

__all__ = ["BUDGET_PREFIX", "Ledgers"]

BUDGET_PREFIX = "~budget-"
#: Ledger rows whose last write this process remembers (about 1 KB each).
KNOWN_ROWS = 2_048
#: The key just past every budget partition ('-' is 0x2D, '.' 0x2E).
_BUDGETS_END = "~budget."


Change = Callable[[Ledger], Ledger | None]


@dataclass
class _Row:
    """The changes of one ledger row waiting for its writer, and the writer."""

    waiting: list[tuple[Change, asyncio.Future[Ledger | None]]] = field(default_factory=list)
    writer: asyncio.Task[None] | None = None


class Ledgers:
    """Budget ledger rows, in their accounts' partitions of the conversations table."""

    def __init__(self, rows: TableRows) -> None:
        self._rows = rows
        self._busy: dict[tuple[str, str], _Row] = {}
        self._known: OrderedDict[tuple[str, str], tuple[Entity, str]] = OrderedDict()

    async def update(self, account: Account, day: str, change: Change) -> Ledger | None:
        """`change` the account's ledger of `day` (a new one if there is none) with a conditional
        write, again when another writer won; the ledger as written, or None if unchanged. It
        goes with the other changes of the row waiting in this process (`_write`)."""
        key = (account.key, day)
        row = self._busy.setdefault(key, _Row())
        done: asyncio.Future[Ledger | None] = asyncio.get_running_loop().create_future()
        row.waiting.append((change, done))
        if row.writer is None:
            row.writer = asyncio.create_task(self._write(key, row, account, day))
        return await done

    async def _write(self, key: tuple[str, str], row: _Row, account: Account, day: str) -> None:
        """Write the row's waiting changes, as many at a time as have arrived, until none wait."""
        while row.waiting:
            batch, row.waiting = row.waiting, []
            try:
                results = await self._write_batch(key, account, day,
                                                  [change for change, _ in batch])
            except Exception as exc:  # each caller sees the failure of the write it went with
                self._known.pop(key, None)
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, done), result in zip(batch, results, strict=True):
                if not done.done():
                    done.set_result(result)
        del self._busy[key]  # no await since the loop's check: no change can slip in between

    async def _write_batch(self, key: tuple[str, str], account: Account, day: str,
                           changes: list[Change]) -> list[Ledger | None]:
        results: list[Ledger | None] = []
        written: Entity | None = None

        def changed(entity: Entity | None, etag: str | None) -> Entity | None:
            nonlocal written
            ledger = Ledger(account=account, day=day) if entity is None else \
                _read(entity, account, etag)
            results.clear()
            for change in changes:
                after = change(ledger)
                results.append(after)
                ledger = after if after is not None else ledger
            written = _entity(ledger) if any(r is not None for r in results) else None
            return written

        etag = await self._rows.run("changing a budget", self._rows.update_row, account.key, day,
                                    changed, what=f"the {account.level} budget of {day}",
                                    known=self._known.get(key))
        if etag is not None and written is not None:
            self._known[key] = (written, etag)
            self._known.move_to_end(key)
            if len(self._known) > KNOWN_ROWS:
                self._known.popitem(last=False)
        return [None if etag is None or r is None else replace(r, etag=etag) for r in results]

    async def of_account(self, account: Account, *, since: str) -> list[Ledger]:
        """The account's ledgers from the day `since` on, oldest first."""
        return await self._rows.run("reading usage", self._list, account, since)

    async def _list(self, account: Account, since: str) -> list[Ledger]:
        return [_read(row, account, row.metadata.get("etag"))
                async for row in self._rows.table.query_entities(
            "PartitionKey eq @pk and RowKey ge @since", parameters={"pk": account.key,
                                                                   "since": since})]

    async def of_level(self, level: Level, *, since: str, until: str) -> list[Ledger]:
        """Every ledger of `level` from `since` to `until` (days, inclusive): a range query over
        the level's partitions (an operator's report, not a turn's path)."""
        return await self._rows.run("reading usage", self._list_level, level, since, until)

    async def _list_level(self, level: Level, since: str, until: str) -> list[Ledger]:
        prefix = f"{BUDGET_PREFIX}{level}-"
        rows = self._rows.table.query_entities(
            "PartitionKey gt @first and PartitionKey lt @end and RowKey ge @since and "
            "RowKey le @until",
            parameters={"first": prefix, "end": prefix[:-1] + ".", "since": since, "until": until})
        return [_read(row, Account(level, str(row.get("account_id", ""))), None)
                async for row in rows]

    async def purge(self, *, before: str) -> int:
        """Delete every ledger of a day before `before` (retention); the rows deleted."""
        return await self._rows.run(
            "deleting old usage", self._delete,
            "PartitionKey gt @first and PartitionKey lt @end and RowKey lt @before",
            {"first": BUDGET_PREFIX, "end": _BUDGETS_END, "before": before})

    async def delete(self, account: Account) -> int:
        """Delete every ledger of the account (its partition); the rows deleted."""
        self._known = OrderedDict((key, known) for key, known in self._known.items()
                                  if key[0] != account.key)
        return await self._rows.run("deleting usage", self._delete, "PartitionKey eq @pk",
                                    {"pk": account.key})

    async def _delete(self, query: str, parameters: dict[str, str]) -> int:
        doomed: dict[str, list[str]] = {}
        async for row in self._rows.table.query_entities(query, parameters=parameters,
                                                         select=["PartitionKey", "RowKey"]):
            doomed.setdefault(str(row["PartitionKey"]), []).append(str(row["RowKey"]))
        for pk, keys in doomed.items():
            for start in range(0, len(keys), 100):
                await self._rows.wire.transact([Operation("delete", {"PartitionKey": pk,
                                                                     "RowKey": key})
                                                for key in keys[start:start + 100]])
        return sum(len(keys) for keys in doomed.values())


def _read(entity: TableEntity | Entity, account: Account, etag: str | None) -> Ledger:
    return Ledger(
        account=account, day=str(entity["RowKey"]),
        tokens=_int(entity, "tokens"), input_tokens=_int(entity, "input_tokens"),
        cached_tokens=_int(entity, "cached_tokens"), output_tokens=_int(entity, "output_tokens"),
        calls=int(entity.get("calls", 0)),
        turns=int(entity.get("turns", 0)), minute=int(entity.get("minute", 0)),
        minute_turns=int(entity.get("minute_turns", 0)),
        minute_turn_ids=tuple(t for t in str(entity.get("minute_turn_ids", "")).split(",") if t),
        reservations=Ledger.parse_reservations(str(entity.get("reservations", "[]"))),
        models=Ledger.parse_models(str(entity.get("models", "[]"))),
        etag=str(etag) if etag is not None else None)


def _int(entity: TableEntity | Entity, name: str) -> int:
    """An Int64 property: read back, an `EntityProperty`; as written, a (value, type) pair."""
    value = entity.get(name, 0)
    return int(value[0] if isinstance(value, tuple) else getattr(value, "value", value))


def _entity(ledger: Ledger) -> Entity:
    return {"PartitionKey": ledger.account.key, "RowKey": ledger.day,
            "account_id": ledger.account.id, "level": ledger.account.level,
            # Int64: a tenant's tokens over a retention period may pass 2**31.
            "tokens": (ledger.tokens, "Edm.Int64"),
            "input_tokens": (ledger.input_tokens, "Edm.Int64"),
            "cached_tokens": (ledger.cached_tokens, "Edm.Int64"),
            "output_tokens": (ledger.output_tokens, "Edm.Int64"),
            "calls": ledger.calls, "turns": ledger.turns, "minute": ledger.minute,
            "minute_turns": ledger.minute_turns,
            "minute_turn_ids": ",".join(ledger.minute_turn_ids), "reservations": ledger.reservations_json(),
            "models": ledger.models_json()}
