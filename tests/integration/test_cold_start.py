"""A cold start loads only what the first request needs: `import function_app` in a fresh
interpreter brings in none of the heavy packages (they load on first use, where they are used).
The time it takes is a benchmark's to measure (benchmarks/cold_start.py), not a test's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.cold_start import HEAVY

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_app_loads_no_heavy_package() -> None:
    # GIVEN a fresh interpreter with the default settings
    env = {key: value for key, value in os.environ.items() if not key.startswith(
        ("CHAT_", "OPENAI_", "AZURE_", "CLIENT_", "TENANT_", "BOT_", "WEBSITE_"))}
    # WHEN it imports the function app
    done = subprocess.run([sys.executable, "-c", "import sys, json; import function_app; "
                           f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True)
    # THEN none of the model's, the token check's, storage's or telemetry's packages came with it
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
