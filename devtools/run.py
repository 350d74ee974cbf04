"""`make run`: serve the bot locally on PORT (default 7071), with everything it needs.

Starts Azurite's table service on 127.0.0.1:10002 and queue service on 10001 (the ports
`UseDevelopmentStorage=true` means; data kept in .azurite/), each unless one already answers there,
and none when CHAT_STORAGE_CONNECTION_STRING points elsewhere; then the project's dev host
(`devtools.host`: the app run by the pinned Functions Python worker library, with the Functions
host's HTTP rules, timers and queue triggers). A binding mistake stops it at start, naming the
function. Ctrl-C stops what it started.
`--mcp demo` (`make run MCP=demo`) also starts the demo MCP server (devtools/mcp_server.py) on
127.0.0.1:8931 and points CHAT_MCP_SERVERS at it, unless that setting is given.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from devtools.local_settings import local_environment
from shared.errors import SettingsError
from shared.settings import DEVELOPMENT_STORAGE, load_settings

ROOT = Path(__file__).resolve().parents[1]


def _start_azurite() -> list[subprocess.Popen[bytes]]:
    from devtools.azurite import QUEUE_PORT, TABLE_PORT, answers, start_service, stop_process

    data = ROOT / ".azurite"
    data.mkdir(exist_ok=True)
    started: list[subprocess.Popen[bytes]] = []
    try:
        for service, port in (("table", TABLE_PORT), ("queue", QUEUE_PORT)):
            if answers(port):
                print(f"storage: an Azurite (or emulator) already answers on 127.0.0.1:{port}; using it")
                continue
            print(f"storage: starting Azurite's {service} service on 127.0.0.1:{port}, "
                  f"data in {data.relative_to(ROOT)}/")
            started.append(start_service(service, port=port, location=data, quiet=False))
    except BaseException:
        for process in started:
            stop_process(process)
        raise
    return started


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


MCP_DEMO_PORT = 8931


def _point_at_mcp_demo(env: dict[str, str]) -> bool:
    """CHAT_MCP_SERVERS for the demo MCP server (a given setting wins): whether to start it."""
    from devtools.mcp_server import demo_servers_setting

    if env.get("CHAT_MCP_SERVERS", "").strip():
        print("tools: CHAT_MCP_SERVERS is set; not starting the demo MCP server")
        return False
    env["CHAT_MCP_SERVERS"] = demo_servers_setting(f"http://127.0.0.1:{MCP_DEMO_PORT}/mcp")
    return True


def _start_mcp_demo() -> subprocess.Popen[bytes]:
    print(f"tools: the demo MCP server on http://127.0.0.1:{MCP_DEMO_PORT}/mcp (ask the bot to "
          "\"search_docs streaming\")")
    process = subprocess.Popen([sys.executable, "-m", "devtools.mcp_server", "--port",
                                str(MCP_DEMO_PORT)], cwd=ROOT)
    from devtools.azurite import wait_for_port

    wait_for_port(MCP_DEMO_PORT)
    return process


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)  # stop what we started on `kill` as on Ctrl-C
    parser = argparse.ArgumentParser(description="serve the bot locally")
    parser.add_argument("--mcp", choices=["demo"], help="start the demo MCP server too")
    options = parser.parse_args()
    env = local_environment()
    mcp_demo = options.mcp == "demo" and _point_at_mcp_demo(env)
    try:
        settings = load_settings(env)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    children: list[subprocess.Popen[bytes]] = [_start_mcp_demo()] if mcp_demo else []
    uses_azurite = settings.storage.table_endpoint is None and \
        settings.storage.connection_string == DEVELOPMENT_STORAGE
    if uses_azurite:
        children.extend(_start_azurite())
    else:
        print("storage: CHAT_STORAGE_* points elsewhere; not starting Azurite")
    port = settings.port
    command = [sys.executable, "-m", "devtools.host", "--port", str(port)]
    print(f"host: the project's dev host on Python {sys.version.split()[0]} (docs/devhost.md)")
    model = settings.model
    print(f"model: {model.model} ({model.provider.value})"
          + ("  <- offline stand-in: set OPENAI_API_KEY, OPENAI_BASE_URL or AZURE_OPENAI_ENDPOINT"
             if model.provider.value == "offline" else ""))
    print(f"\n  messaging endpoint: http://127.0.0.1:{port}/api/messages"
          f"\n  health:             http://127.0.0.1:{port}/api/health"
          "\n  chat from a terminal:  make chat"
          "\n  Agents Playground:     make playground\n")
    children.append(subprocess.Popen(command, cwd=ROOT, env=env))
    try:
        return children[-1].wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
        print("stopped.")


if __name__ == "__main__":
    raise SystemExit(main())
