"""`make usage`: who used the bot how much, by tenant or by user, as a table and as CSV for chargeback.

    python -m devtools.usage [--level tenant|user] [--days 30] [--csv usage.csv]
    make usage LEVEL=user DAYS=30 CSV=usage.csv

Reads the budget ledgers (`shared/budgets.py`: one row per account and UTC day, kept for the
retention period) from the storage the settings name: the environment over local.settings.json,
so locally Azurite, and in Azure `CHAT_STORAGE_TABLE_ENDPOINT` with your own sign-in (`az login`;
you need Storage Table Data Reader on the table). The table sums each account over the days; the
CSV has one line per account and day: level, id, day, tokens, input, cached and output tokens,
model calls, turns, and the estimated cost when CHAT_MODEL_PRICES prices every model used.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from devtools.local_settings import LocalSettingsError, local_environment
from shared.budgets import MAX_REPORT_DAYS, Budgets, DayUsage
from shared.errors import ChatstateError
from shared.ledger import Level
from shared.runtime import build_store
from shared.settings import load_settings

__all__ = ["CSV_COLUMNS", "main", "summed", "write_csv", "write_table"]

CSV_COLUMNS = ("level", "id", "day", "tokens", "input_tokens", "cached_tokens", "output_tokens",
               "calls", "turns", "estimated_cost")


def summed(days: Sequence[DayUsage]) -> list[DayUsage]:
    """One line per account over all `days`, most tokens first (a cost only when every day has one)."""
    by_account: dict[str, list[DayUsage]] = {}
    for day in days:
        by_account.setdefault(day.account.key, []).append(day)
    lines = []
    for found in by_account.values():
        costs = [day.estimated_cost for day in found]
        lines.append(DayUsage(
            account=found[0].account, day=f"{min(d.day for d in found)}..{max(d.day for d in found)}",
            tokens=sum(d.tokens for d in found), input_tokens=sum(d.input_tokens for d in found),
            cached_tokens=sum(d.cached_tokens for d in found),
            output_tokens=sum(d.output_tokens for d in found), calls=sum(d.calls for d in found),
            turns=sum(d.turns for d in found), reserved=0,
            estimated_cost=round(sum(c for c in costs if c is not None), 6)
            if all(c is not None for c in costs) else None))
    return sorted(lines, key=lambda line: (-line.tokens, line.account.id))


def write_table(days: Sequence[DayUsage], out: TextIO) -> None:
    lines = summed(days)
    width = max([len(line.account.id) for line in lines] + [len("id")])
    print(f"{'id':<{width}}  {'tokens':>12}  {'input':>12}  {'cached':>12}  {'output':>10}  "
          f"{'calls':>7}  {'turns':>7}  {'est. cost':>10}", file=out)
    for line in lines:
        cost = f"{line.estimated_cost:.4f}" if line.estimated_cost is not None else "-"
        print(f"{line.account.id:<{width}}  {line.tokens:>12,}  {line.input_tokens:>12,}  "
              f"{line.cached_tokens:>12,}  {line.output_tokens:>10,}  {line.calls:>7,}  "
              f"{line.turns:>7,}  {cost:>10}", file=out)
    if not lines:
        print("(no usage recorded in these days)", file=out)


def write_csv(days: Sequence[DayUsage], out: TextIO) -> None:
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for day in sorted(days, key=lambda d: (d.account.id, d.day)):
        writer.writerow([day.account.level, day.account.id, day.day, day.tokens, day.input_tokens,
                         day.cached_tokens, day.output_tokens, day.calls, day.turns,
                         "" if day.estimated_cost is None else f"{day.estimated_cost:.6f}"])


async def usage(level: Level, days: int, environ: dict[str, str]) -> list[DayUsage]:
    settings = load_settings(environ)
    store = build_store(settings)
    try:
        budgets = Budgets.build(settings, store)
        assert budgets is not None, "the Table store keeps budgets"
        return await budgets.level_usage(level, days=days)
    finally:
        await store.close()


def main(argv: list[str] | None = None, *, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.usage",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--level", choices=("tenant", "user"), default="tenant")
    parser.add_argument("--days", type=int, default=30,
                        help=f"today and the days before it (1-{MAX_REPORT_DAYS}; default 30)")
    parser.add_argument("--csv", type=Path, default=None, help="also write one line per account "
                        "and day to this CSV file")
    args = parser.parse_args(argv)
    if not 1 <= args.days <= MAX_REPORT_DAYS:
        parser.error(f"--days must be from 1 to {MAX_REPORT_DAYS}")
    try:
        days = asyncio.run(usage(args.level, args.days, local_environment()))
    except (LocalSettingsError, ChatstateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.level} usage, the last {args.days} UTC days (today included):", file=out)
    write_table(days, out)
    if args.csv is not None:
        with args.csv.open("w", encoding="utf-8", newline="") as handle:
            write_csv(days, handle)
        print(f"{len(days)} lines (one per {args.level} and day) written to {args.csv}", file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
