"""The Table backend's budget ledgers: a user's or tenant's day (`shared/ledger.py`), changed only
through `TableRows.update_row` (the head's own retry loop), listed for usage reports, purged by
retention.

A ledger's partition is its account's (`~budget-user-…`, `~budget-tenant-…`), its row key the UTC
day, so an account's last N days are one range query and a day's change is one point read and
one conditional write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from azure.data.tables import TableEntity

from ..ledger import Account, Ledger, Level
from ._codec import Entity
from ._table_base import TableRows
from ._wire import Operation

__all__ = ["BUDGET_PREFIX", "Ledgers"]

BUDGET_PREFIX = "~budget-"
#: The key just past every budget partition ('-' is 0x2D, '.' 0x2E).
_BUDGETS_END = "~budget."


class Ledgers:
    """Budget ledger rows, in their accounts' partitions of the conversations table."""

    def __init__(self, rows: TableRows) -> None:
        self._rows = rows

    async def update(self, account: Account, day: str,
                     change: Callable[[Ledger], Ledger | None]) -> Ledger | None:
        """`change` the account's ledger of `day` (a new one if there is none) with a conditional
        write, again when another writer won; the ledger as written, or None if unchanged."""
        written: Ledger | None = None

        def changed(entity: TableEntity | None) -> Entity | None:
            nonlocal written
            read = Ledger(account=account, day=day) if entity is None else _read(entity, account)
            written = change(read)
            return None if written is None else _entity(written)

        etag = await self._rows.run("changing a budget", self._rows.update_row, account.key, day,
                                    changed, what=f"the {account.level} budget of {day}")
        if etag is None or written is None:
            return None
        return replace(written, etag=etag)

    async def of_account(self, account: Account, *, since: str) -> list[Ledger]:
        """The account's ledgers from the day `since` on, oldest first."""
        return await self._rows.run("reading usage", self._list, account, since)

    async def _list(self, account: Account, since: str) -> list[Ledger]:
        return [_read(row, account) async for row in self._rows.table.query_entities(
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
        return [_read(row, Account(level, str(row.get("account_id", "")))) async for row in rows]

    async def purge(self, *, before: str) -> int:
        """Delete every ledger of a day before `before` (retention); the rows deleted."""
        return await self._rows.run("deleting old usage", self._purge, before)

    async def _purge(self, before: str) -> int:
        doomed: dict[str, list[str]] = {}
        async for row in self._rows.table.query_entities(
                "PartitionKey gt @first and PartitionKey lt @end and RowKey lt @before",
                parameters={"first": BUDGET_PREFIX, "end": _BUDGETS_END, "before": before},
                select=["PartitionKey", "RowKey"]):
            doomed.setdefault(str(row["PartitionKey"]), []).append(str(row["RowKey"]))
        for pk, keys in doomed.items():
            for start in range(0, len(keys), 100):
                await self._rows.wire.transact([Operation("delete", {"PartitionKey": pk,
                                                                     "RowKey": key})
                                                for key in keys[start:start + 100]])
        return sum(len(keys) for keys in doomed.values())


def _read(entity: TableEntity | Entity, account: Account) -> Ledger:
    etag = entity.metadata.get("etag") if isinstance(entity, TableEntity) else None
    return Ledger(
        account=account, day=str(entity["RowKey"]),
        tokens=_int(entity, "tokens"), input_tokens=_int(entity, "input_tokens"),
        cached_tokens=_int(entity, "cached_tokens"), output_tokens=_int(entity, "output_tokens"),
        calls=int(entity.get("calls", 0)),
        turns=int(entity.get("turns", 0)), minute=int(entity.get("minute", 0)),
        minute_turns=int(entity.get("minute_turns", 0)),
        reservations=Ledger.parse_reservations(str(entity.get("reservations", "[]"))),
        models=Ledger.parse_models(str(entity.get("models", "[]"))),
        etag=str(etag) if etag is not None else None)


def _int(entity: TableEntity | Entity, name: str) -> int:
    """An Int64 property (the SDK reads it back as an `EntityProperty`)."""
    value = entity.get(name, 0)
    return int(getattr(value, "value", value))


def _entity(ledger: Ledger) -> Entity:
    return {"PartitionKey": ledger.account.key, "RowKey": ledger.day,
            "account_id": ledger.account.id, "level": ledger.account.level,
            # Int64: a tenant's tokens over a retention period may pass 2**31.
            "tokens": (ledger.tokens, "Edm.Int64"),
            "input_tokens": (ledger.input_tokens, "Edm.Int64"),
            "cached_tokens": (ledger.cached_tokens, "Edm.Int64"),
            "output_tokens": (ledger.output_tokens, "Edm.Int64"),
            "calls": ledger.calls, "turns": ledger.turns, "minute": ledger.minute,
            "minute_turns": ledger.minute_turns, "reservations": ledger.reservations_json(),
            "models": ledger.models_json()}
