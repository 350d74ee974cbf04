"""Checks `make run` makes before it serves, and the run file `make chat` / `make playground` read.

Each check answers with one line that names what is wrong and what to do: a taken PORT, something
on Azurite's ports that is not a storage emulator, the model endpoint's answer.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from devtools.azurite import QUEUE_PORT, TABLE_PORT
from shared.model import build_model
from shared.settings import ModelProvider, ModelSettings

ROOT = Path(__file__).resolve().parents[1]
#: Written by `make run` while it serves (its port and process), removed when it stops.
RUN_FILE = ROOT / ".azurite" / "run.json"
#: Azurite's well-known ports: the table service (the bot's storage) and the queue service.
STORAGE_PORTS = {TABLE_PORT: "table", QUEUE_PORT: "queue"}


class PreflightError(Exception):
    """`make run` cannot serve; the message is one line naming the setting or port."""


def check_port_free(port: int) -> None:
    """Raise `PreflightError` naming PORT when 127.0.0.1:`port` cannot be bound."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            what = "is taken" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
            running = read_run_file()
            owner = " by another make run" if running and running.port == port else ""
            raise PreflightError(f"PORT {port} {what}{owner}: stop what listens there, or choose "
                                 f"another port (PORT={port + 1} make run)") from None


def storage_emulator_on(port: int) -> bool:
    """Whether what answers on 127.0.0.1:`port` is a storage emulator (Azurite answers any request
    with `x-ms-request-id`, or names itself in `Server`); raise `PreflightError` naming the port
    and what answers when it is something else."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/devstoreaccount1?comp=list")
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            headers = response.headers
    except urllib.error.HTTPError as exc:
        headers = exc.headers
    except (OSError, ValueError) as exc:
        raise PreflightError(_not_storage(port, f"it does not speak HTTP ({exc})")) from None
    server = headers.get("Server") or ""
    if headers.get("x-ms-request-id") or "azurite" in server.lower():
        return True
    raise PreflightError(_not_storage(port, f"Server: {server}" if server else "no Server header"))


def _not_storage(port: int, seen: str) -> str:
    service = STORAGE_PORTS.get(port, "storage")
    return (f"port {port} (Azurite's {service} service) answers, but not as a storage emulator "
            f"({seen}): stop that program, or set CHAT_STORAGE_CONNECTION_STRING to your storage")


def model_endpoint(settings: ModelSettings) -> str:
    """Where the model calls go, for the banner."""
    if settings.provider is ModelProvider.OFFLINE:
        return "(the in-process stand-in, no network)"
    if settings.provider is ModelProvider.AZURE:
        return f"{settings.azure_endpoint} deployment {settings.model}"
    return f"{settings.base_url or 'https://api.openai.com/v1'} model {settings.model}"


def model_banner(settings: ModelSettings) -> str:
    """`model: <provider> <endpoint>: <state> (<detail>)`, from a check that spends no tokens."""

    async def checked() -> str:
        model = build_model(settings)
        try:
            result = await model.check()
        finally:
            await model.close()
        advice = "  <- a setup problem: replies will say so until it is fixed" if result.permanent \
            else ""
        return f"{result.state.value} ({result.detail}){advice}"

    try:
        result = asyncio.run(checked())
    except Exception as exc:  # a banner line, not a failed start: the turns will say more
        result = f"not checked ({type(exc).__name__}: {exc})"
    return f"model: {settings.provider.value} {model_endpoint(settings)}: {result}"


@dataclass(frozen=True, kw_only=True)
class Running:
    port: int
    pid: int
    #: The folder of the Azurite `make run` started (None: it started none).
    azurite_data: Path | None = None


def write_run_file(port: int, *, path: Path = RUN_FILE, azurite_data: Path | None = None) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"port": port, "pid": os.getpid(),
                                "azuriteData": str(azurite_data) if azurite_data else None}))


def remove_run_file(*, path: Path = RUN_FILE) -> None:
    running = read_run_file(path=path)
    if running is not None and running.pid == os.getpid():
        path.unlink(missing_ok=True)


def read_run_file(*, path: Path = RUN_FILE) -> Running | None:
    """The running `make run`, if its run file names a live process."""
    try:
        data = json.loads(path.read_text())
        running = Running(port=int(data["port"]), pid=int(data["pid"]),
                          azurite_data=Path(data["azuriteData"]) if data.get("azuriteData") else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(running.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return running


def bot_port(*, given: int | None, configured: int, path: Path = RUN_FILE) -> tuple[int, str]:
    """The port of the bot to talk to, and where it came from: --port, the running `make run`, or
    PORT."""
    if given:
        return given, "the command line"
    running = read_run_file(path=path)
    if running is not None:
        return running.port, f"the running `make run` (pid {running.pid})"
    return configured, "PORT (no `make run` is running: start it first)"
