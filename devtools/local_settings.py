"""`local.settings.json` for local runs: its Values under the environment (the environment wins)."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def local_environment(path: Path = ROOT / "local.settings.json") -> dict[str, str]:
    """os.environ over local.settings.json's Values (as `func start` does)."""
    values: dict[str, str] = {}
    if path.exists():
        data = json.loads(path.read_text())
        values = {key: str(value) for key, value in (data.get("Values") or {}).items()
                  if value not in (None, "")}
    return {**values, **os.environ}
