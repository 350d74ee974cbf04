"""The local dev host: serves a `FunctionApp`'s HTTP functions on uvicorn, as `func start` would.

It reads the app's own trigger declarations (routes, methods) and host.json's route prefix, builds
`azure.functions.HttpRequest` objects and calls the very functions Azure calls, so the code under
test is the code that runs in Azure. Function keys are not enforced, as with `func start`.

    python -m devtools.host [--port 7071] [--app function_app]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import azure.functions as func
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("devtools.host")


def route_prefix(host_json: Path = ROOT / "host.json") -> str:
    try:
        config = json.loads(host_json.read_text())
    except FileNotFoundError:
        return "api"
    prefix = config.get("extensions", {}).get("http", {}).get("routePrefix", "api")
    return str(prefix).strip("/")


def http_routes(app: func.FunctionApp, *, prefix: str) -> list[Route]:
    routes = []
    for function in app.get_functions():
        trigger = function.get_trigger()
        if trigger is None or trigger.get_binding_name() != "httpTrigger":
            continue
        route = getattr(trigger, "route", None) or function.get_function_name()
        path = "/" + "/".join(part for part in (prefix, route.strip("/")) if part)
        methods = [str(getattr(m, "value", m)) for m in (getattr(trigger, "methods", None) or [])]
        routes.append(Route(path, _endpoint(function.get_user_function()),
                            methods=methods or ["GET", "POST"]))
    return routes


def _endpoint(user_function: Any) -> Any:
    async def endpoint(request: Request) -> Response:
        http_request = func.HttpRequest(
            method=request.method, url=str(request.url), headers=dict(request.headers),
            params=dict(request.query_params), route_params=dict(request.path_params),
            body=await request.body())
        if inspect.iscoroutinefunction(user_function):
            result = await user_function(http_request)
        else:
            result = await asyncio.to_thread(user_function, http_request)
        return Response(content=result.get_body(), status_code=result.status_code,
                        headers=dict(result.headers), media_type=result.mimetype)
    return endpoint


def build_asgi(module_name: str = "function_app") -> Starlette:
    sys.path.insert(0, str(ROOT))
    module = importlib.import_module(module_name)
    app: func.FunctionApp = module.app
    runtime = getattr(module, "runtime", None)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        if runtime is not None:
            await runtime.close()

    routes = http_routes(app, prefix=route_prefix())
    for route in routes:
        log.info("  %-7s %s", ",".join(sorted(route.methods or [])), route.path)
    return Starlette(routes=routes, lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--app", default="function_app")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from shared.settings import load_settings

    port = args.port or load_settings().port
    asgi = build_asgi(args.app)
    uvicorn.run(asgi, host=args.host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()


class DevHostProcess:
    """The dev host in a child process (what `make run` serves), for tests and benchmarks."""

    def __init__(self, *, env: dict[str, str], port: int | None = None,
                 log_path: Path | None = None, module: str = "devtools.host") -> None:
        """`module` is run as `python -m module --port N` (a wrapper of this host may stand in)."""
        from devtools.azurite import free_port

        self.module = module
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
            [sys.executable, "-m", self.module, "--port", str(self.port)], cwd=ROOT, env=env,
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the dev host exited: {self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/api/health", timeout=1).close()
                return self
            except OSError as exc:
                if getattr(exc, "code", None) == 503:
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
