"""`make playground`: the Microsoft 365 Agents Playground, pointed at the running bot.

Runs `agentsplayground` from node_modules headless (no browser is opened: open the printed URL
yourself). It sends no token, so the bot must run with auth off (no CLIENT_ID), as `make run` does.
Its mocked Bot Connector lives on its own port under /_connector, a loopback URL the bot may reply to.
It follows the port of the running `make run` (its run file), and listens on loopback only
(`devtools/loopback.cjs`, preloaded: the Playground itself listens on every interface).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from devtools import preflight
from devtools.local_settings import LOCAL_SETTINGS, LocalSettingsError, local_environment
from shared.errors import SettingsError
from shared.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
PLAYGROUND = ROOT / "node_modules" / ".bin" / "agentsplayground"
LOOPBACK = ROOT / "devtools" / "loopback.cjs"
PLAYGROUND_PORT = 56150


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Start the Agents Playground against the bot.")
    parser.add_argument("--port", type=int, default=PLAYGROUND_PORT, help="the playground's port")
    parser.add_argument("--bot-port", type=int, default=None, help="the bot's port")
    parser.add_argument("--settings", type=Path, default=LOCAL_SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--run-file", type=Path, default=preflight.RUN_FILE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        configured = load_settings(local_environment(args.settings)).port
    except (LocalSettingsError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bot_port, found = preflight.bot_port(given=args.bot_port, configured=configured,
                                         path=args.run_file)
    playground_port = args.port
    log_file = ROOT / ".azurite" / "playground.log"
    log_file.parent.mkdir(exist_ok=True)
    command = [str(PLAYGROUND), "-e", f"http://127.0.0.1:{bot_port}/api/messages", "-c", "msteams",
               "-p", str(playground_port), "--dt",
               "--service-url", f"http://127.0.0.1:{playground_port}/_connector"]
    print(f"Agents Playground on http://127.0.0.1:{playground_port} -> bot on port {bot_port} "
          f"(from {found})\nlog: {log_file.relative_to(ROOT)}   (Ctrl-C stops it)", flush=True)
    node_options = " ".join(filter(None, (os.environ.get("NODE_OPTIONS"), f"--require={LOOPBACK}")))
    env = {**os.environ, "TEAMSAPPTESTER_BROWSER": "none", "TEAMSAPPTESTER_LOGFILE": str(log_file),
           "NODE_OPTIONS": node_options}
    # Ctrl-C stops it even when it was started with SIGINT ignored (a background job of a script
    # inherits that): the Playground is killed on the way out (`subprocess.call`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.call(command, cwd=ROOT, env=env)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
