"""`make run`: serve the bot locally on PORT (default 7071), with everything it needs.

Starts Azurite's table service on 127.0.0.1:10002 and queue service on 10001 (the ports
`UseDevelopmentStorage=true` means; data kept in .azurite/), each unless a storage emulator already
answers there, and none when CHAT_STORAGE_CONNECTION_STRING points elsewhere; then the project's
dev host (`devtools.host`: the app run by the pinned Functions Python worker library, with the
Functions host's HTTP rules, timers and queue triggers). Before it serves it checks what a first
hour trips over, each with one line (devtools/preflight.py): the settings, PORT, Azurite's ports,
the model (no tokens). A binding mistake stops it at start, naming the function. The banner with
the URLs prints once the host answers (its first /api/health), so a quick curl finds it up; if
Azurite's data folder is removed while it runs, it says so. Ctrl-C stops what it started.
`--mcp demo` (`make run MCP=demo`) also starts the demo MCP server (devtools/mcp_server.py) on
127.0.0.1:8931 and points CHAT_MCP_SERVERS at it, unless that setting is given.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from devtools import preflight
from devtools.local_settings import LOCAL_SETTINGS, LocalSettingsError, local_environment
from devtools.preflight import PreflightError
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
                preflight.storage_emulator_on(port)  # raises, naming the port, for anything else
                print(f"storage: a storage emulator already answers on 127.0.0.1:{port}; using it")
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
          "\"search_docs streaming\", or to \"delete_notes drafts\": that one asks you first)")
    process = subprocess.Popen([sys.executable, "-m", "devtools.mcp_server", "--port",
                                str(MCP_DEMO_PORT)], cwd=ROOT)
    from devtools.azurite import wait_for_port

    wait_for_port(MCP_DEMO_PORT)
    return process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the bot locally.")
    parser.add_argument("--settings", type=Path, default=LOCAL_SETTINGS,
                        help="the local.settings.json to read")
    parser.add_argument("--run-file", type=Path, default=preflight.RUN_FILE,
                        help="where to note the port for `make chat` / `make playground`")
    parser.add_argument("--mcp", choices=["demo"], help="start the demo MCP server too")
    args = parser.parse_args(argv)
    # Settings warnings (an unknown CHAT_... name) print as one line each.
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)  # stop what we started on `kill` as on Ctrl-C
    children: list[subprocess.Popen[bytes]] = []
    try:
        env = local_environment(args.settings)
        mcp_demo = args.mcp == "demo" and _point_at_mcp_demo(env)
        settings = load_settings(env)
        port = settings.port
        preflight.check_port_free(port)
        if not env.get("AzureWebJobsStorage", "").strip() and settings.storage.table_endpoint is None:
            # The host's own storage (the turn queue's trigger reads it), as local.settings.json
            # would set it: with no such file, the bot's storage.
            env["AzureWebJobsStorage"] = settings.storage.connection_string
        if mcp_demo:
            children.append(_start_mcp_demo())
        uses_azurite = settings.storage.table_endpoint is None and \
            settings.storage.connection_string == DEVELOPMENT_STORAGE
        azurite_data = None
        if uses_azurite:
            started = _start_azurite()
            children.extend(started)
            azurite_data = ROOT / ".azurite" if started else None
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
    host = subprocess.Popen(command, cwd=ROOT, env=env)
    children.append(host)
    try:
        if not _answers(port, host):
            return host.wait()
        print(f"\n  messaging endpoint: http://127.0.0.1:{port}/api/messages"
              f"\n  health:             http://127.0.0.1:{port}/api/health"
              "\n  chat from a terminal:  make chat"
              "\n  Agents Playground:     make playground\n", flush=True)
        preflight.write_run_file(port, path=args.run_file, azurite_data=azurite_data)
        return _serve(host, azurite_data)
    except KeyboardInterrupt:
        return 0
    finally:
        preflight.remove_run_file(path=args.run_file)
        _stop(children)
        print("stopped.")


#: How long the host may take to answer its first request before `make run` gives up on it.
HOST_START_SECONDS = 120.0


def _answers(port: int, host: subprocess.Popen[bytes]) -> bool:
    """Wait until the host answers HTTP on `port` (any status): True; False if it exited first."""
    import httpx2

    deadline = time.monotonic() + HOST_START_SECONDS
    while host.poll() is None and time.monotonic() < deadline:
        try:
            httpx2.get(f"http://127.0.0.1:{port}/api/health", timeout=30)
            return True
        except httpx2.HTTPError:
            time.sleep(0.1)
    if host.poll() is None:
        print(f"error: the host did not answer on port {port} in {HOST_START_SECONDS:.0f} s",
              file=sys.stderr)
        return False
    return False


def _serve(host: subprocess.Popen[bytes], azurite_data: Path | None) -> int:
    """Wait for the host to exit, saying so once if Azurite's data folder disappears."""
    warned = False
    while True:
        try:
            return host.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        if azurite_data is not None and not azurite_data.exists() and not warned:
            print(f"warning: Azurite's data folder {azurite_data} was removed: storage can no "
                  "longer keep messages (the turn queue fails, nothing reaches the disk). Stop "
                  "make run (Ctrl-C) and start it again.", file=sys.stderr, flush=True)
            warned = True


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
