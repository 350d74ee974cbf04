"""A cold start as a user feels it: from a new worker process's start, the first POST answered
200, and the first words of a queued message; and what `import function_app` costs.

import       `import function_app` in a fresh interpreter, IMPORTS times: wall and CPU seconds
             (median), and which heavy packages the import loaded (none should be). With
             CHATSTATE_BASELINE_DIR set to another checkout (main), the same for it, for a ratio.
first POST   RUNS fresh dev hosts (the real app through the Functions worker library, queue mode,
             auth on against the local identity provider): process start → the first POST to
             /api/messages answered 200 (posted again until the host answers). The first request
             builds the runtime: signing keys fetched, the token checked, the inbox and the queue.
first words  the same fresh hosts: process start → the first streamed words of that message on
             the channel (the queue polled, the turn run, the model's first token after 0.2 s).
Clocks are this process's; the model and the connector stand-ins run in its event loop.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from devtools.azurite import free_port
from devtools.fake_channel import FakeConnector, FakeIdentity
from devtools.fake_model import FakeModelServer
from devtools.local_server import loopback_certificate

from .common import ROOT, code_version, machine, now_iso
from .streaming import _kind
from .webhook import message

IMPORTS = 7
RUNS = 3
HEAVY = ("openai", "pydantic", "jsonschema", "jwt", "cryptography", "httpx2", "aiohttp",
         "azure.data.tables", "azure.storage.queue", "azure.identity", "mcp", "opentelemetry")
TARGETS = {"import_s": 0.4}
CLIENT_ID = "bench-cold-start"
_MEASURE = ("import sys, time, json; wall = time.perf_counter(); cpu = time.process_time(); "
            "import function_app; print(json.dumps({'wall': time.perf_counter() - wall, "
            "'cpu': time.process_time() - cpu, 'loaded': [m for m in %r if m in sys.modules]}))")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def import_times(app_dir: Path, *, runs: int = IMPORTS) -> dict[str, Any]:
    """`import function_app` in `runs` fresh interpreters: median wall and CPU seconds."""
    import json

    env = {key: value for key, value in os.environ.items() if not key.startswith(
        ("CHAT_", "OPENAI_", "AZURE_", "CLIENT_", "TENANT_", "BOT_", "WEBSITE_"))}
    samples = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", _MEASURE % (HEAVY,)], cwd=app_dir, env=env,
                              capture_output=True, text=True, timeout=120, check=True)
        samples.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"wall_s": round(statistics.median(s["wall"] for s in samples), 3),
            "cpu_s": round(statistics.median(s["cpu"] for s in samples), 3),
            "loaded": samples[-1]["loaded"], "n": runs}


class _Identity:
    """The local identity provider over HTTPS (as Entra is), and tokens from it."""

    def __init__(self) -> None:
        self.folder = tempfile.TemporaryDirectory()
        self.certificate = loopback_certificate(Path(self.folder.name))
        self.server = FakeIdentity(certificate=self.certificate)


def _host_env(connection_string: str, model: FakeModelServer, identity: _Identity) -> dict[str, str]:
    table = "t" + uuid.uuid4().hex[:16]
    return {"CHAT_STORAGE_CONNECTION_STRING": connection_string, "CHAT_TABLE_NAME": table,
            "AzureWebJobsStorage": connection_string, "CHAT_TURN_QUEUE": f"cold-{table.lower()}",
            "OPENAI_BASE_URL": model.base_url, "OPENAI_MODEL": "bench-model",
            "CHAT_ANSWER_MODE": "queue", "CHAT_SUMMARY": "off",
            "CLIENT_ID": CLIENT_ID, "CLIENT_SECRET": "s", "TENANT_ID": "tenant-1",
            "BOT_OPENID_METADATA_URL": identity.server.botframework_metadata_url,
            "BOT_AUTHORITY_HOST": identity.server.url, "BOT_SERVICE_URL_HOSTS": "127.0.0.1",
            "SSL_CERT_FILE": str(identity.certificate)}


async def one_cold_start(connection_string: str, model: FakeModelServer,
                         connector: FakeConnector, identity: _Identity, *,
                         app_dir: Path = ROOT) -> dict[str, float]:
    """A fresh dev host: seconds from its process start to the first POST answered 200, and to
    the first streamed words of that message."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(
        ("CHAT_", "OPENAI_", "AZURE_", "CLIENT_", "TENANT_", "BOT_", "WEBSITE_"))}
    env.update(_host_env(connection_string, model, identity))
    conversation = f"a:cold-{uuid.uuid4().hex[:10]}"
    activity = message("hello, cold worker", conversation_id=conversation,
                       service_url=connector.url)
    token = identity.server.botframework_token(audience=CLIENT_ID, service_url=connector.url)
    log = Path(tempfile.gettempdir()) / f"chatstate-cold-{port}.log"
    with log.open("wb") as output:
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "devtools.host", "--port", str(port), cwd=app_dir, env=env,
            stdout=output, stderr=subprocess.STDOUT)
        try:
            answered = await _first_200(port, activity, token, process)
            first_words = await _first_words(connector, conversation)
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 20)
    return {"first_post_200_s": answered - started, "first_words_s": first_words - started}


async def _first_200(port: int, activity: dict[str, Any], token: str,
                     process: asyncio.subprocess.Process) -> float:
    url = f"http://127.0.0.1:{port}/api/messages"
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http:
        deadline = time.perf_counter() + 120
        while time.perf_counter() < deadline:
            if process.returncode is not None:
                raise RuntimeError("the dev host exited before it answered")
            try:
                async with http.post(url, json=activity, headers=headers) as response:
                    if response.status == 200:
                        return time.perf_counter()
                    raise RuntimeError(f"the first POST was answered {response.status}: "
                                       f"{await response.text()}")
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.01)
    raise TimeoutError("the dev host did not answer in 120 s")


async def _first_words(connector: FakeConnector, conversation: str) -> float:
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        for request in connector.requests:
            if request["conversation_id"] == conversation and \
                    _kind(request["activity"]) in ("streaming", "final"):
                return float(request["at"])
        await asyncio.sleep(0.01)
    raise TimeoutError("no words on the channel in 120 s")


async def run(connection_string: str) -> dict[str, Any]:
    _log("cold start: import function_app")
    imported = import_times(ROOT)
    baseline_dir = os.environ.get("CHATSTATE_BASELINE_DIR")
    baseline = import_times(Path(baseline_dir)) if baseline_dir else None
    identity = _Identity()
    model = FakeModelServer(first_token_after=0.2, word_interval=0.01)
    connector = FakeConnector()
    starts, baseline_starts = [], []
    for server in (model, connector, identity.server):
        await server.start()
    try:
        for index in range(RUNS):
            _log(f"cold start: fresh worker {index + 1} of {RUNS}")
            starts.append(await one_cold_start(connection_string, model, connector, identity))
            if baseline_dir:
                baseline_starts.append(await one_cold_start(
                    connection_string, model, connector, identity, app_dir=Path(baseline_dir)))
    finally:
        for server in (model, connector, identity.server):
            await server.stop()
        identity.folder.cleanup()
    section = {
        "when": now_iso(), "machine": machine(), "code": code_version(), "targets": TARGETS,
        "import": imported,
        "first_post_200_s": round(statistics.median(s["first_post_200_s"] for s in starts), 2),
        "first_words_s": round(statistics.median(s["first_words_s"] for s in starts), 2),
        "runs": [{key: round(value, 2) for key, value in s.items()} for s in starts],
    }
    if baseline is not None:
        section["baseline"] = {"dir": baseline_dir, "import": baseline, **{
            key: round(statistics.median(s[key] for s in baseline_starts), 2)
            for key in ("first_post_200_s", "first_words_s")}}
    _print(section)
    return section


def _print(section: dict[str, Any]) -> None:
    imported = section["import"]
    print(f"\ncold start ({section['machine']}, {section['code']})")
    print(f"  import function_app     {imported['wall_s']:.2f} s wall, {imported['cpu_s']:.2f} s CPU "
          f"(median of {imported['n']}; target ≤ {TARGETS['import_s']} s); heavy packages "
          f"loaded: {', '.join(imported['loaded']) or 'none'}")
    base = section.get("baseline")
    if base:
        print(f"  the same in {base['dir']}: {base['import']['wall_s']:.2f} s wall, "
              f"{base['import']['cpu_s']:.2f} s CPU")
    print(f"  first POST answered 200  {section['first_post_200_s']:.2f} s from process start "
          f"(median of {len(section['runs'])} fresh workers, auth on, queue mode)")
    print(f"  first words on channel   {section['first_words_s']:.2f} s from process start "
          "(the same message, through the turn queue; model's first token after 0.2 s)")
    if base:
        print(f"  in {base['dir']}: first POST {base['first_post_200_s']:.2f} s, first words "
              f"{base['first_words_s']:.2f} s")
