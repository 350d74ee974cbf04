"""The dev host's ASGI app: the Functions host's HTTP front, admin invoke and timers over one worker.

- HTTP triggers: routed as the host routes (`devtools.routes`), converted as the host converts
  (`devtools.http_exchange`), run by the worker (`devtools.worker`).
- Function keys: like `func start`, none are checked, so `AuthLevel.FUNCTION` and `ADMIN` routes and
  the admin API answer only requests that are loopback all the way (client address, `Host`,
  `X-Forwarded-Host`, `Forwarded`); anything else, such as a request through a tunnel, gets 401.
- `POST /admin/functions/{name}` with `{"input": ""}` runs a timer function now (202), as with
  `func start`.
- Queue triggers: one `devtools.queues.QueueListener` per function, started and stopped with the app;
  queue output bindings are written after a run succeeds (`devtools.queues.QueueWriter`), and a failure
  to write them fails the run.
- Every run is logged as the host logs it: `Executing 'Functions.<name>' (Reason=..., Id=...)`, then
  `Executed 'Functions.<name>' (Succeeded|Failed, Id=..., Duration=<n>ms)`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from devtools import http_exchange, rpc
from devtools.queues import QueueFunction, QueueListener, QueueOutput, QueuesOptions, QueueWriter
from devtools.routes import Route, Router, decode_path
from devtools.timers import TimerFunction, TimerLoop, timer_info
from devtools.worker import IndexedFunction, Outcome, Worker

log = logging.getLogger("devtools.host")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
KEYED_LEVELS = frozenset({"FUNCTION", "ADMIN"})
HTTP_REASON = "This function was programmatically called via the host APIs."
#: On shutdown, how long running queue messages may finish before they are left to their lease.
QUEUE_SHUTDOWN_GRACE = 8.0


class FunctionsHost:
    """ASGI app serving one indexed function app."""

    def __init__(self, *, worker: Worker, prefix: str, timers: list[TimerFunction],
                 queues: list[QueueFunction] | None = None, queues_options: QueuesOptions | None = None,
                 queue_lease_seconds: int | None = None, queue_outputs: dict[str, list[QueueOutput]] | None = None,
                 on_shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
        self.worker = worker
        self.router: Router[IndexedFunction] = Router([
            Route("/".join(p for p in (prefix, str(f.trigger.get("route") or f.name).strip("/")) if p),
                  frozenset(str(m).upper() for m in f.trigger.get("methods") or []), f)
            for f in worker.functions.values() if f.trigger.get("type") == "httpTrigger"])
        self.timers = TimerLoop(timers, run=self._run_timer)
        options = queues_options or QueuesOptions()
        lease = {"lease_seconds": queue_lease_seconds} if queue_lease_seconds else {}
        self.queues = [QueueListener(q, options=options, run=self._run_queue, enqueued=self._enqueued, **lease)
                       for q in queues or []]
        self.queue_writer = QueueWriter(queue_outputs or {}, options=options, enqueued=self._enqueued)
        self.on_shutdown = on_shutdown
        self._background: set[asyncio.Task[Any]] = set()

    def describe(self) -> list[str]:
        lines = [f"  {','.join(sorted(r.methods)) or 'ANY':<7} /{r.template}  ({r.target.name}, "
                 f"auth {r.target.trigger.get('authLevel', 'FUNCTION').lower()})" for r in self.router.routes]
        lines += [f"  timer   {t.schedule.expression}  ({t.function.name})" for t in self.timers.timers]
        lines += [f"  queue   {q.queue.queue_name} on {q.queue.connection}  ({q.queue.function.name})"
                  for q in self.queues]
        return lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    # -- runs ---------------------------------------------------------------------------------------

    async def invoke(self, function: IndexedFunction, trigger: rpc.TypedData, *, reason: str,
                     trigger_metadata: dict[str, rpc.TypedData] | None = None, details: str = "") -> Outcome:
        invocation_id = str(uuid.uuid4())
        log.info("Executing 'Functions.%s' (Reason='%s', Id=%s)", function.name, reason, invocation_id)
        if details:
            log.info("Trigger Details: %s", details)
        started = time.perf_counter()
        outcome = await self.worker.invoke(function, trigger=trigger, trigger_metadata=trigger_metadata,
                                           invocation_id=invocation_id)
        if outcome.succeeded:
            try:
                await self.queue_writer.write(function, outcome)
            except Exception as exc:  # the host fails the invocation when an output binding cannot be written
                outcome = Outcome(succeeded=False, return_value=None, error=f"{type(exc).__name__}: {exc}",
                                  stack_trace=traceback.format_exc())
        duration = (time.perf_counter() - started) * 1000
        if outcome.succeeded:
            log.info("Executed 'Functions.%s' (Succeeded, Id=%s, Duration=%.0fms)",
                     function.name, invocation_id, duration)
        else:
            log.error("Executed 'Functions.%s' (Failed, Id=%s, Duration=%.0fms): %s\n%s",
                      function.name, invocation_id, duration, outcome.error, outcome.stack_trace)
        return outcome

    async def _run_timer(self, timer: TimerFunction, data: rpc.TypedData, reason: str) -> None:
        await self.invoke(timer.function, data, reason=reason)

    def _enqueued(self, queue_name: str) -> None:
        """This host added a message to `queue_name`: its listener here, if any, polls at once."""
        for listener in self.queues:
            if listener.queue.queue_name == queue_name:
                listener.notify()

    async def _run_queue(self, queue: QueueFunction, data: rpc.TypedData, metadata: dict[str, rpc.TypedData],
                         reason: str) -> Outcome:
        details = (f"MessageId: {metadata['Id'].string}, DequeueCount: {metadata['DequeueCount'].json}, "
                   f"InsertedOn: {json.loads(metadata['InsertionTime'].json)}")
        return await self.invoke(queue.function, data, reason=reason, trigger_metadata=metadata, details=details)

    # -- HTTP ---------------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        path = decode_path(raw_path)
        if path.lower().rstrip("/").startswith("/admin/"):
            await self._admin(scope, path, body, send)
            return
        found = self.router.find(scope["method"], path)
        if found is None:
            await _respond(send, 404, [], b"")
            return
        route, values = found
        function = route.target
        if str(function.trigger.get("authLevel", "FUNCTION")).upper() in KEYED_LEVELS:
            refusal = not_loopback(scope)
            if refusal:
                await _refuse(send, function.name, refusal)
                return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        host = next((v for k, v in headers if k == "host"), f"{scope['server'][0]}:{scope['server'][1]}")
        trigger = http_exchange.request_data(
            method=scope["method"], scheme=scope.get("scheme", "http"), host=host, raw_path=raw_path,
            query_string=scope.get("query_string", b"").decode("latin-1"), headers=headers,
            route_params=values, body=body)
        outcome = await self.invoke(function, trigger, reason=HTTP_REASON)
        if not outcome.succeeded:
            await _respond(send, 500, [], b"")
            return
        status, response_headers, content = http_exchange.response_parts(outcome.return_value)
        await _respond(send, status, response_headers, content)

    async def _admin(self, scope: Scope, path: str, body: bytes, send: Send) -> None:
        parts = path.strip("/").split("/")
        if len(parts) != 3 or parts[1].lower() != "functions" or scope["method"] != "POST":
            await _respond(send, 404, [], b"")
            return
        refusal = not_loopback(scope)
        if refusal:
            await _refuse(send, "the admin API", refusal)
            return
        function = next((f for f in self.worker.functions.values() if f.name.lower() == parts[2].lower()), None)
        if function is None:
            await _json(send, 404, {"error": "not_found", "reason": f"no function named {parts[2]!r}"})
            return
        try:
            payload = json.loads(body or b"{}")
            if not isinstance(payload, dict) or not isinstance(payload.get("input", ""), str):
                raise ValueError
        except ValueError:
            await _json(send, 400, {"error": "bad_request", "reason": 'the body must be {"input": "<string>"}'})
            return
        if function.trigger.get("type") != "timerTrigger":
            await _json(send, 400, {"error": "bad_request", "reason": (
                f"{function.name!r} has a {function.trigger.get('type')}; the dev host runs only timer "
                "functions through the admin API (call an HTTP function by its route)")})
            return
        last, next_at = self.timers.status(function.name)
        data = timer_info(past_due=False, last=last, next_at=next_at)
        task = asyncio.create_task(self.invoke(function, data, reason=HTTP_REASON))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        await _respond(send, 202, [], b"")

    # -- lifespan -----------------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        timers: asyncio.Task[None] | None = None
        pollers: list[asyncio.Task[None]] = []
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.timers.timers:
                    timers = asyncio.create_task(self.timers.run_forever())
                    timers.add_done_callback(_report_stop)
                for listener in self.queues:
                    pollers.append(asyncio.create_task(listener.run_forever()))
                    pollers[-1].add_done_callback(_report_stop)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if timers is not None:
                    timers.cancel()
                for poller in pollers:
                    poller.cancel()
                await asyncio.gather(*pollers, return_exceptions=True)
                for listener in self.queues:
                    await listener.close(grace=QUEUE_SHUTDOWN_GRACE)
                await self.queue_writer.close()
                for task in list(self._background):
                    await asyncio.wait([task], timeout=10)
                if self.on_shutdown is not None:
                    await self.on_shutdown()
                self.worker.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _report_stop(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a trigger loop stopped: %r", task.exception())


def not_loopback(scope: Scope) -> str:
    """Why a request is not known to come from this machine ('' when it is)."""
    client = scope.get("client")
    if client and not _is_loopback(client[0]):
        return f"the client {client[0]} is not on this machine"
    for name, value in scope["headers"]:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key in ("host", "x-forwarded-host"):
            hosts = [h.strip() for h in text.split(",")]
        elif key == "forwarded":
            hosts = [p.split("=", 1)[1].strip('"') for p in text.replace(",", ";").split(";")
                     if p.strip().lower().startswith("host=")]
        else:
            continue
        for host in hosts:
            if not _is_loopback(_hostname(host)):
                return f"{key.title()}: {host} is not a loopback name"
    return ""


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback(name: str) -> bool:
    if name.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


async def _refuse(send: Send, what: str, why: str) -> None:
    await _json(send, 401, {"error": "unauthorized", "reason": (
        f"{what} needs a function key in Azure; the dev host checks no keys, so it answers only "
        f"requests from this machine ({why})")})


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    await _respond(send, status, [("content-type", "application/json")], json.dumps(body).encode())


async def _respond(send: Send, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    if not any(k.lower() == "content-length" for k, _ in headers):
        raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
