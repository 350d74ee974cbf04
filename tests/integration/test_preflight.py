"""`make`'s own checks on loopback: Azurite's ports, the Playground's interface, the Python version."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from devtools import preflight
from devtools.azurite import Azurite, answers, free_port
from devtools.preflight import PreflightError

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def web_server() -> Iterator[int]:
    """A plain HTTP server (not a storage emulator) on a free loopback port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_azurite_is_recognised_as_a_storage_emulator() -> None:
    # GIVEN a real Azurite table service
    azurite = Azurite().start()
    try:
        # WHEN what answers on its port is checked
        # THEN it is a storage emulator
        assert preflight.storage_emulator_on(azurite.port) is True
    finally:
        azurite.stop()


def test_a_web_server_on_azurites_port_is_named() -> None:
    # GIVEN a web server where Azurite should be
    with web_server() as port:
        preflight.STORAGE_PORTS[port] = "table"
        try:
            # WHEN make run checks the port
            with pytest.raises(PreflightError) as caught:
                preflight.storage_emulator_on(port)
        finally:
            del preflight.STORAGE_PORTS[port]
    # THEN one line names the port, what answers and what to do
    assert str(caught.value).startswith(
        f"port {port} (Azurite's table service) answers, but not as a storage emulator "
        "(Server: SimpleHTTP/")
    assert str(caught.value).endswith("stop that program, or set CHAT_STORAGE_CONNECTION_STRING "
                                      "to your storage")


def test_a_program_that_does_not_speak_http_on_azurites_port_is_named() -> None:
    # GIVEN a TCP listener that closes every connection at once
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def refuse() -> None:
            connection, _ = listener.accept()
            connection.close()

        threading.Thread(target=refuse, daemon=True).start()
        # WHEN make run checks the port
        with pytest.raises(PreflightError) as caught:
            preflight.storage_emulator_on(port)
    # THEN the line says it does not speak HTTP
    assert f"port {port} (Azurite's storage service) answers, but not as a storage emulator " \
           "(it does not speak HTTP" in str(caught.value)


def test_the_playground_follows_make_run_and_listens_on_loopback_only(tmp_path: Path) -> None:
    # GIVEN a running make run's run file (this process stands in for it, on port 4321)
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"port": 4321, "pid": os.getpid()}))
    # AND make playground started on a free port, with no bot port given
    port = free_port()
    playground = subprocess.Popen(
        [sys.executable, "-m", "devtools.playground", "--port", str(port), "--run-file",
         str(run_file)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # THEN it points at make run's port
        assert playground.stdout is not None
        assert playground.stdout.readline().strip() == (
            f"Agents Playground on http://127.0.0.1:{port} -> bot on port 4321 (from the running "
            f"`make run` (pid {os.getpid()}))")
        # WHEN it listens
        deadline = time.monotonic() + 60
        while not answers(port):
            assert time.monotonic() < deadline and playground.poll() is None, "no playground"
            time.sleep(0.2)
        listening = [c.laddr for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        # THEN only on the loopback interface
        assert listening and {address.ip for address in listening} <= {"127.0.0.1", "::1"}
    finally:
        playground.send_signal(signal.SIGINT)  # as Ctrl-C: it stops the Playground it started
        playground.communicate(timeout=20)


def test_a_wrong_python_gets_one_line_naming_3_13_before_anything_installs(tmp_path: Path) -> None:
    # GIVEN a PYTHON that is a Python 3.11
    python = tmp_path / "python3.11"
    python.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "Python 3.11.7"; exit 0; fi\n'
                      'exit 1\n')
    python.chmod(0o755)
    # WHEN make deps (as make run does first) is asked to use it
    env = {key: value for key, value in os.environ.items()
           if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # as from a shell, not within make
    done = subprocess.run(["make", f"PYTHON={python}", "deps"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)
    # THEN it stops with one line naming 3.13, and nothing was installed
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.splitlines()[0] == (
        f"error: PYTHON={python} is Python 3.11.7; chatstate needs Python 3.13 "
        "(make PYTHON=/path/to/python3.13 ...)")
