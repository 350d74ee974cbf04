"""`make playground`: the Microsoft 365 Agents Playground, pointed at the running bot.

Runs `agentsplayground` from node_modules headless (no browser is opened: open the printed URL
yourself). It sends no token, so the bot must run with auth off (no CLIENT_ID), as `make run` does.
Its mocked Bot Connector lives on its own port under /_connector, a loopback URL the bot may reply to.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from devtools.local_settings import local_environment
from shared.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
PLAYGROUND = ROOT / "node_modules" / ".bin" / "agentsplayground"
PLAYGROUND_PORT = 56150


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Start the Agents Playground against the bot.")
    parser.add_argument("--port", type=int, default=PLAYGROUND_PORT, help="the playground's port")
    args = parser.parse_args(argv)
    env = local_environment()
    bot_port = load_settings(env).port
    playground_port = args.port
    log_file = ROOT / ".azurite" / "playground.log"
    log_file.parent.mkdir(exist_ok=True)
    command = [str(PLAYGROUND), "-e", f"http://127.0.0.1:{bot_port}/api/messages", "-c", "msteams",
               "-p", str(playground_port), "--dt",
               "--service-url", f"http://127.0.0.1:{playground_port}/_connector"]
    print(f"Agents Playground on http://localhost:{playground_port} -> bot on port {bot_port}\n"
          f"log: {log_file.relative_to(ROOT)}   (Ctrl-C stops it)")
    env = {**os.environ, "TEAMSAPPTESTER_BROWSER": "none", "TEAMSAPPTESTER_LOGFILE": str(log_file)}
    try:
        return subprocess.call(command, cwd=ROOT, env=env)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
