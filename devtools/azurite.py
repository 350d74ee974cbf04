"""Start and stop a real Azurite table service from node_modules, on a free loopback port."""

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
#: Azurite's well-known development account key (public, in Azurite's own docs): local use only.
AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def azurite_connection_string(*, host: str = "127.0.0.1", port: int = 10002) -> str:
    """The connection string of an Azurite table service (the well-known development account)."""
    return (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={AZURITE_ACCOUNT_KEY};TableEndpoint=http://{host}:{port}/devstoreaccount1;")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Azurite:
    """An Azurite table service with in-memory persistence; `stop()` and `start()` again at will."""

    def __init__(self, *, port: int | None = None, location: Path | None = None) -> None:
        """In-memory unless `location` is given (then data survives a stop and start)."""
        self.port = port or free_port()
        self.location = location
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        return azurite_connection_string(port=self.port)

    def start(self) -> Azurite:
        if not AZURITE_TABLE.exists():
            raise RuntimeError(f"{AZURITE_TABLE} is missing: run `npm ci` (make deps does)")
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not on PATH")
        self._process = subprocess.Popen(
            [str(AZURITE_TABLE),
             *(["--location", str(self.location)] if self.location else ["--inMemoryPersistence"]),
             "--tableHost", "127.0.0.1",
             "--tablePort", str(self.port), "--skipApiVersionCheck", "--loose", "--silent"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


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
    """`python -m devtools.azurite -- CMD...`: run CMD with a fresh Azurite, then stop it.

    CMD sees the Azurite connection string in CHATSTATE_TEST_STORAGE.
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
