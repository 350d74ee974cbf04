"""`make run`: serve the bot locally on PORT (default 7071), with everything it needs.

Starts Azurite (data kept in .azurite/) unless a storage emulator already answers on
127.0.0.1:10002 or CHAT_STORAGE_CONNECTION_STRING points elsewhere; then the project's dev host
(`devtools.host`: the app run by the pinned Functions Python worker library, with the Functions
host's HTTP rules and timers). Before it serves it checks what a first hour trips over, each with
one line (devtools/preflight.py): the settings, PORT, Azurite's ports, the model (no tokens). A
binding mistake stops it at start, naming the function. Ctrl-C stops what it started.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from pathlib import Path

from devtools import preflight
from devtools.local_settings import LOCAL_SETTINGS, LocalSettingsError, local_environment
from devtools.preflight import PreflightError
from shared.errors import SettingsError
from shared.settings import DEVELOPMENT_STORAGE, load_settings

ROOT = Path(__file__).resolve().parents[1]
AZURITE = ROOT / "node_modules" / ".bin" / "azurite"


def _start_azurite() -> subprocess.Popen[bytes] | None:
    taken = [port for port in preflight.STORAGE_PORTS if preflight.answers(port)]
    for port in taken:
        preflight.storage_emulator_on(port)  # raises, naming the port, for anything else
    if 10002 in taken:
        print("storage: a storage emulator already answers on 127.0.0.1:10002; using it")
        return None
    data = ROOT / ".azurite"
    data.mkdir(exist_ok=True)
    print(f"storage: starting Azurite, data in {data.relative_to(ROOT)}/")
    process = subprocess.Popen(
        [str(AZURITE), "--silent", "--skipApiVersionCheck", "--loose", "--location", str(data),
         "--blobHost", "127.0.0.1", "--queueHost", "127.0.0.1", "--tableHost", "127.0.0.1"], cwd=ROOT)
    from devtools.azurite import wait_for_port

    wait_for_port(10002)
    return process


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the bot locally.")
    parser.add_argument("--settings", type=Path, default=LOCAL_SETTINGS,
                        help="the local.settings.json to read")
    parser.add_argument("--run-file", type=Path, default=preflight.RUN_FILE,
                        help="where to note the port for `make chat` / `make playground`")
    args = parser.parse_args(argv)
    # Settings warnings (an unknown CHAT_... name) print as one line each.
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)  # stop what we started on `kill` as on Ctrl-C
    children: list[subprocess.Popen[bytes]] = []
    try:
        env = local_environment(args.settings)
        settings = load_settings(env)
        port = settings.port
        preflight.check_port_free(port)
        uses_azurite = settings.storage.table_endpoint is None and \
            settings.storage.connection_string == DEVELOPMENT_STORAGE
        if uses_azurite:
            azurite = _start_azurite()
            if azurite is not None:
                children.append(azurite)
        else:
            print("storage: CHAT_STORAGE_* points elsewhere; not starting Azurite")
        print(f"host: the project's dev host on Python {sys.version.split()[0]} (docs/devhost.md)")
        print(preflight.model_banner(settings.model))
        if settings.model.provider.value == "offline":
            print("  <- offline stand-in: set OPENAI_API_KEY, OPENAI_BASE_URL or "
                  "AZURE_OPENAI_ENDPOINT for real answers")
    except (LocalSettingsError, SettingsError, PreflightError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        _stop(children)
        return 2
    command = [sys.executable, "-m", "devtools.host", "--port", str(port)]
    print(f"\n  messaging endpoint: http://127.0.0.1:{port}/api/messages"
          f"\n  health:             http://127.0.0.1:{port}/api/health"
          "\n  chat from a terminal:  make chat"
          "\n  Agents Playground:     make playground\n", flush=True)
    children.append(subprocess.Popen(command, cwd=ROOT, env=env))
    preflight.write_run_file(port, path=args.run_file)
    try:
        return children[-1].wait()
    except KeyboardInterrupt:
        return 0
    finally:
        preflight.remove_run_file(path=args.run_file)
        _stop(children)
        print("stopped.")


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in reversed(children):
        if child.poll() is None:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()


if __name__ == "__main__":
    raise SystemExit(main())
