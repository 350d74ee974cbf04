"""The local dev host: serves a function app as `func start` would, through the Python worker's own code.

It drives the pinned azure-functions-runtime in-process (`devtools.worker`): the app is imported and
indexed with the worker's validation (a binding mistake stops the start, naming the function), each
request becomes the worker's data by the host's rules and then `func.HttpRequest` through
`azure.functions`' own converter, and the response comes back the same way. Timer functions run on
their NCRONTAB schedules and through `POST /admin/functions/{name}`. Function keys are not checked,
as with `func start`, so key routes answer only loopback requests. Queue functions poll their Azure
Storage queues by the queue extension's rules and host.json `extensions.queues` (`devtools.queues`).
docs/devhost.md has the details.

    python -m devtools.host [--port 7071] [--app-dir .]      (PYTHON_SCRIPT_FILE_NAME picks the file)
    --queue-lease-seconds N   dev only, for tests: lease dequeued messages N s instead of Azure's 600
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import uvicorn

from devtools.functions_host import FunctionsHost
from devtools.queues import LEASE_SECONDS, QueueSetupError, queue_functions, queue_outputs, queues_options
from devtools.timers import TimerSetupError, timer_functions
from devtools.worker import IndexingError, Worker

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("devtools.host")


class StartupError(RuntimeError):
    """The app cannot be served; the message says why and names the function."""


def read_host_json(host_json: Path = ROOT / "host.json") -> dict[str, Any]:
    try:
        config = json.loads(host_json.read_text())
    except FileNotFoundError:
        return {}
    return config if isinstance(config, dict) else {}


def route_prefix(host_json: Path = ROOT / "host.json") -> str:
    prefix = read_host_json(host_json).get("extensions", {}).get("http", {}).get("routePrefix", "api")
    return str(prefix).strip("/")


async def build_host(app_directory: Path = ROOT, *, queue_lease_seconds: int = LEASE_SECONDS) -> FunctionsHost:
    """Index the app in `app_directory` through the worker; `StartupError` when it cannot be served.

    Call it on the loop that will serve: the app is imported here, and its clients may bind to it.
    `queue_lease_seconds` is for tests only (Azure leases a dequeued message for 10 minutes).
    """
    worker = Worker(app_directory=app_directory)
    try:
        functions = await worker.start()
        timers = timer_functions(functions, environ=os.environ)
        queues = queue_functions(functions, environ=os.environ)
        outputs = queue_outputs(functions, environ=os.environ)
        options = queues_options(read_host_json(app_directory / "host.json"))
    except (IndexingError, TimerSetupError, QueueSetupError) as exc:
        worker.close()
        raise StartupError(str(exc)) from exc
    script = Path(os.environ.get("PYTHON_SCRIPT_FILE_NAME", "function_app.py")).stem
    module = sys.modules.get(script)

    async def close_app() -> None:
        runtime: Any = getattr(module, "runtime", None)  # chatstate's app keeps its clients there
        if runtime is not None and hasattr(runtime, "close"):
            await runtime.close()

    host = FunctionsHost(worker=worker, prefix=route_prefix(app_directory / "host.json"), timers=timers,
                         queues=queues, queues_options=options, queue_lease_seconds=queue_lease_seconds,
                         queue_outputs=outputs,
                         on_shutdown=close_app)
    for line in host.describe():
        log.info(line)
    return host


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--app-dir", type=Path, default=ROOT, help="the function app's folder")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--queue-lease-seconds", type=_positive, default=LEASE_SECONDS,
                        help="dev only, for tests: how long a dequeued message stays leased (Azure: 600)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure.functions").setLevel(logging.WARNING)  # the worker's per-call debug lines
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)  # every poll
    from shared.settings import load_settings

    port = args.port or load_settings().port
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        try:
            host = loop.run_until_complete(build_host(args.app_dir, queue_lease_seconds=args.queue_lease_seconds))
        except StartupError as exc:
            log.error("the function app cannot start: %s", exc)
            raise SystemExit(1) from None
        server = uvicorn.Server(uvicorn.Config(host, host=args.host, port=port, log_level="warning",
                                               access_log=False, lifespan="on"))
        loop.run_until_complete(server.serve())
    finally:
        loop.close()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


if __name__ == "__main__":
    main()


class DevHostProcess:
    """The dev host in a child process (what `make run` serves), for tests and benchmarks."""

    def __init__(self, *, env: dict[str, str], port: int | None = None,
                 log_path: Path | None = None, module: str = "devtools.host",
                 app_dir: Path | None = None, health_path: str = "/api/health",
                 args: list[str] | None = None, root: Path = ROOT) -> None:
        """`module` is run as `python -m module --port N` (a wrapper of this host may stand in);
        `app_dir` serves another function app (tests' own apps); `health_path` answers when up;
        `args` are more command-line options (such as `--queue-lease-seconds`); `root` is the
        checkout it runs from (another commit's tree, for a benchmark's before and after)."""
        from devtools.azurite import free_port

        self.module = module
        self.app_dir = app_dir
        self.health_path = health_path
        self.args = args or []
        self.root = root
        self.port = port or free_port()
        self.env = env
        self.log_path = log_path or Path(f"/tmp/chatstate-devhost-{self.port}.log")
        self._process: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, *, timeout: float = 30.0) -> DevHostProcess:
        import os
        import subprocess
        import time
        import urllib.request

        env = {key: value for key, value in os.environ.items() if not key.startswith(
            ("CHAT_", "OPENAI_", "AZURE_", "CLIENT_", "TENANT_", "BOT_", "WEBSITE_"))}
        env.update(self.env)
        self._log = self.log_path.open("wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", self.module, "--port", str(self.port),
             *(["--app-dir", str(self.app_dir)] if self.app_dir else []), *self.args], cwd=self.root, env=env,
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the dev host exited: {self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}{self.health_path}", timeout=1).close()
                return self
            except OSError as exc:
                if getattr(exc, "code", None) in (404, 503):
                    return self
                time.sleep(0.1)
        raise TimeoutError(f"the dev host did not answer: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except Exception:
                self._process.kill()
            self._process = None
            self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")
