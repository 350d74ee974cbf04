"""`local.settings.json` for local runs: its Values under the environment (the environment wins)."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SETTINGS = ROOT / "local.settings.json"


class LocalSettingsError(Exception):
    """local.settings.json cannot be read; the message names the file, line and column."""


def local_environment(path: Path = LOCAL_SETTINGS) -> dict[str, str]:
    """os.environ over local.settings.json's Values (as `func start` does)."""
    values: dict[str, str] = {}
    if path.exists():
        values = {key: str(value) for key, value in _values(path).items() if value not in (None, "")}
    return {**values, **os.environ}


def _values(path: Path) -> dict[str, object]:
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        advice = " (JSON allows no trailing comma)" if "trailing comma" in exc.msg else ""
        raise LocalSettingsError(f"{shown} line {exc.lineno} column {exc.colno}: {exc.msg}"
                                 f"{advice}; fix the file, or copy local.settings.sample.json "
                                 "again") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalSettingsError(f"{shown} cannot be read: {exc}") from None
    values = (data.get("Values") or {}) if isinstance(data, dict) else None
    if not isinstance(values, dict):
        raise LocalSettingsError(f'{shown}: no "Values" object; see local.settings.sample.json')
    return values
