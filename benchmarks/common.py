"""What every benchmark shares: the storage it runs against, figures, machine facts, results.json."""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from devtools.azurite import STORAGE_ENV, given_or_started

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results.json"


@contextmanager
def storage() -> Iterator[str]:
    """The Azurite connection string `make bench` passes in, or that of an Azurite started here."""
    with given_or_started(os.environ.get(STORAGE_ENV)) as connection_string:
        yield connection_string


def median(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def p90(samples: Sequence[float]) -> float:
    if len(samples) < 2:
        return float(samples[0])
    return float(statistics.quantiles(samples, n=10, method="inclusive")[-1])


def machine(*, brief: bool = False) -> str:
    """CPUs this process may use, the Python version and (unless brief) RAM and the platform."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpus} CPUs, Python {platform.python_version()}"
    if brief:
        return text
    try:
        ram = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM, "
    except (ValueError, OSError, AttributeError):
        ram = ""
    return f"{cpus} CPUs, {ram}Python {platform.python_version()}, {platform.platform()}"


@functools.cache
def azurite_version() -> str:
    """Azurite's version (from node_modules) and the Node.js that runs it."""
    try:
        node = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10,
                              check=False).stdout.strip()
    except OSError:
        node = ""
    runtime = f", Node.js {node}" if node else ""
    try:
        package = json.loads((ROOT / "node_modules" / "azurite" / "package.json").read_text())
        return f"Azurite {package['version']} (in-memory{runtime})"
    except (OSError, ValueError, KeyError):
        return "Azurite (version unknown)"


def code_version() -> str:
    """The commit measured, and which tracked files differed from it (benchmarks/ aside)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                                  check=False).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [path for path in git("diff", "--name-only", "HEAD").splitlines()
               if not path.startswith("benchmarks/")]
    return f"{commit} + uncommitted changes in {', '.join(changed)}" if changed else commit


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def merge_results(key: str, section: dict[str, Any], *, path: Path = RESULTS) -> None:
    """Set `key` in results.json to `section`, keeping every other key as it was."""
    results: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            loaded = {}
        if isinstance(loaded, dict):
            results = loaded
    results[key] = section
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(path)
