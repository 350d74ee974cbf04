"""Start and stop a real Azurite (table and queue services) from node_modules, on free loopback ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AZURITE_TABLE = ROOT / "node_modules" / ".bin" / "azurite-table"
AZURITE_QUEUE = ROOT / "node_modules" / ".bin" / "azurite-queue"
#: The ports `UseDevelopmentStorage=true` means (Azurite's defaults).
TABLE_PORT = 10002
QUEUE_PORT = 10001
#: Azurite's well-known development account key (public, in Azurite's own docs): local use only.
AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def azurite_connection_string(*, host: str = "127.0.0.1", port: int = TABLE_PORT,
                              queue_port: int = QUEUE_PORT) -> str:
    """The connection string of an Azurite's table service on `port` and queue service on `queue_port`
    (the well-known development account); the defaults are what `UseDevelopmentStorage=true` means."""
    return (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={AZURITE_ACCOUNT_KEY};TableEndpoint=http://{host}:{port}/devstoreaccount1;"
            f"QueueEndpoint=http://{host}:{queue_port}/devstoreaccount1;")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:`port`."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def start_service(service: str, *, port: int, location: Path | None = None,
                  quiet: bool = True) -> subprocess.Popen[bytes]:
    """Start Azurite's `service` ("table" or "queue") on 127.0.0.1:`port` and wait until it listens.

    In memory unless `location` is given (then its data is kept there across restarts)."""
    executable = {"table": AZURITE_TABLE, "queue": AZURITE_QUEUE}[service]
    if not executable.exists():
        raise RuntimeError(f"{executable} is missing: run `npm ci` (make deps does)")
    if shutil.which("node") is None:
        raise RuntimeError("node is not on PATH")
    output = subprocess.DEVNULL if quiet else None
    process = subprocess.Popen(
        [str(executable),
         *(["--location", str(location)] if location else ["--inMemoryPersistence"]),
         f"--{service}Host", "127.0.0.1", f"--{service}Port", str(port),
         "--skipApiVersionCheck", "--loose", "--silent"],
        stdout=output, stderr=output)
    try:
        wait_for_port(port)
    except TimeoutError:
        process.kill()
        process.wait()
        raise
    return process


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Azurite:
    """Azurite's table and queue services with in-memory persistence; `stop()` and `start()` again at will."""

    def __init__(self, *, port: int | None = None, location: Path | None = None,
                 queue_port: int | None = None) -> None:
        """In-memory unless `location` is given (then data survives a stop and start).

        `port` is the table service's, `queue_port` the queue service's (free ports unless given)."""
        self.port = port or free_port()
        self.queue_port = queue_port or free_port()
        self.location = location
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def connection_string(self) -> str:
        return azurite_connection_string(port=self.port, queue_port=self.queue_port)

    def start(self) -> Azurite:
        try:
            self._processes.append(start_service("table", port=self.port, location=self.location))
            self._processes.append(start_service("queue", port=self.queue_port, location=self.location))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        while self._processes:
            stop_process(self._processes.pop())


#: `make test` and `make bench` start one Azurite and pass its connection string in this variable.
STORAGE_ENV = "CHATSTATE_TEST_STORAGE"


@contextmanager
def given_or_started(given: str | None) -> Iterator[str]:
    """The connection string `given` (from STORAGE_ENV), or that of an Azurite started here."""
    if given:
        yield given
        return
    azurite = Azurite().start()
    try:
        yield azurite.connection_string
    finally:
        azurite.stop()


def main(argv: list[str]) -> int:
    """`python -m devtools.azurite -- CMD...`: run CMD with a fresh Azurite (table and queue), then stop it.

    CMD sees the Azurite connection string (TableEndpoint and QueueEndpoint) in CHATSTATE_TEST_STORAGE.
    """
    import os

    command = argv[argv.index("--") + 1:] if "--" in argv else argv
    azurite = Azurite().start()
    try:
        env = {**os.environ, STORAGE_ENV: azurite.connection_string}
        return subprocess.call(command, env=env)
    finally:
        azurite.stop()


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
