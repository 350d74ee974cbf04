"""Run chatstate's benchmarks and merge their figures into benchmarks/results.json.

`python -m benchmarks.run [--only NAME ...] [--no-write]`. `make bench` runs this under
`python -m devtools.azurite`, which passes an Azurite connection string in CHATSTATE_TEST_STORAGE;
run alone, it starts its own Azurite.

A benchmark is a module `benchmarks.<name>` with `async def run(connection_string: str) -> dict`:
it prints its own table, draws its own chart, and returns the section stored under `<name>` in
results.json. Adding one is adding its name to BENCHMARKS.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
from collections.abc import Awaitable, Callable
from typing import Any

from .common import RESULTS, merge_results, storage

BENCHMARKS: tuple[str, ...] = (
    "store",
    "webhook",
    "long_chat",
    "streaming",
    "telemetry",
    "queue",
    "mcp_tools",
    "signin",
    "approvals",
    "budgets",
    "cold_start",
    "long_answers",
    "order",
)

Benchmark = Callable[[str], Awaitable[dict[str, Any]]]


def load(name: str) -> Benchmark:
    benchmark: Benchmark = importlib.import_module(f"{__package__}.{name}").run
    return benchmark


async def run_all(names: list[str], connection_string: str, *, write: bool) -> None:
    for name in names:
        section = await load(name)(connection_string)
        if write:
            merge_results(name, section)
            print(f"{name}: figures merged into {RESULTS.relative_to(RESULTS.parent.parent)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="|".join(BENCHMARKS),
                        help="run only this benchmark (repeatable); default: all")
    parser.add_argument("--no-write", action="store_true", help="print the figures, leave results.json")
    args = parser.parse_args(argv)
    names = [name for name in BENCHMARKS if not args.only or name in args.only]
    with storage() as connection_string:
        asyncio.run(run_all(names, connection_string, write=not args.no_write))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
