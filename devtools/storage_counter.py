"""Storage operations counted at the HTTP layer: a reverse proxy in front of Azurite's table and queue services.

A worker (or a test's clients) pointed at `StorageCounter.connection_string` talks to Azurite
through it unchanged (the shared-key signature covers the path and headers, never the host), so any
commit's code can be counted without touching it (benchmarks/order.py, and tests that pin what a
path costs). Each request is sorted into a kind:

    table  read      a point read (GET of one entity)
           query     a query (GET of a table with a filter; `entities` counts the rows returned)
           write     an insert, update, merge or delete of one entity
           batch     an entity-group transaction (`entities` counts its operations)
           setup     creating or listing tables
    queue  put       a message added
           get       a dequeue that returned messages (`entities` counts them)
           poll      a dequeue that found the queue empty (the trigger's idle polling)
           delete    a message completed
           update    a message's lease changed (renewed, or released for a retry)
           setup     creating a queue, reading its metadata, peeking

`Counts` are kept by `(service, kind)`: requests and entities; `seen` lists every request.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

import aiohttp
from aiohttp import web
from yarl import URL

from devtools.azurite import azurite_connection_string
from devtools.local_server import LocalServer

__all__ = ["Counts", "Seen", "StorageCounter", "endpoints"]

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
               "content-encoding", "upgrade", "proxy-connection", "te", "trailer"}
_BATCH_OPERATION = re.compile(rb"^(?:POST|PUT|MERGE|PATCH|DELETE|GET) http", re.MULTILINE)
_BATCH_TARGET = re.compile(rb"^(?:POST|PUT|MERGE|PATCH|DELETE|GET) (http\S+) HTTP", re.MULTILINE)


@dataclass
class Counts:
    """Requests and entities by `(service, kind)`."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    entities: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, service: str, kind: str, entities: int) -> None:
        self.requests[(service, kind)] += 1
        self.entities[(service, kind)] += entities

    def copy(self) -> Counts:
        return Counts(requests=Counter(self.requests), entities=Counter(self.entities))

    def __sub__(self, other: Counts) -> Counts:
        return Counts(requests=self.requests - other.requests, entities=self.entities - other.entities)

    def per(self, divisor: float) -> dict[str, dict[str, float]]:
        """`{"table.read": {"requests": r, "entities": e}, ...}` divided by `divisor`, sorted."""
        keys = sorted(set(self.requests) | set(self.entities))
        return {f"{service}.{kind}": {"requests": round(self.requests[(service, kind)] / divisor, 2),
                                      "entities": round(self.entities[(service, kind)] / divisor, 2)}
                for service, kind in keys}

    def total(self, *, service: str | None = None, kinds: tuple[str, ...] | None = None,
              entities: bool = False) -> int:
        counted = self.entities if entities else self.requests
        return sum(n for (s, k), n in counted.items()
                   if (service is None or s == service) and (kinds is None or k in kinds))


@dataclass(frozen=True)
class Seen:
    """One request through the proxy: its service, kind, method and (decoded) path; `target`:
    what it is about (a transaction's first operation's path; else the path)."""

    service: str
    kind: str
    method: str
    path: str
    target: str = ""


def endpoints(connection_string: str) -> dict[str, str]:
    """The table and queue endpoints (scheme://host:port) of an Azurite connection string."""
    found = {}
    for part in connection_string.split(";"):
        name, _, value = part.partition("=")
        if name in ("TableEndpoint", "QueueEndpoint"):
            parsed = urlparse(value)
            found["table" if name == "TableEndpoint" else "queue"] = f"{parsed.scheme}://{parsed.netloc}"
    return found


class _Proxy(LocalServer):
    def __init__(self, *, service: str, target: str, counter: StorageCounter) -> None:
        super().__init__()
        self.service = service
        self.target = target
        self.counter = counter

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._forward)

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        url = URL(self.target + request.raw_path, encoded=True)
        # No header of aiohttp's own: the shared-key signature covers the Content-Type.
        async with self.counter.session.request(request.method, url, headers=headers, data=body or None,
                                                skip_auto_headers=("Content-Type",),
                                                allow_redirects=False) as answer:
            content = await answer.read()
            status = answer.status
            sent = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP}
        self.counter.record(self.service, request.method, request.path, request.query_string,
                            body, content, status)
        return web.Response(status=status, body=content, headers=sent)


class StorageCounter:
    """Two counting proxies (table, queue) in front of the Azurite of `connection_string`."""

    def __init__(self, connection_string: str) -> None:
        targets = endpoints(connection_string)
        self.counts = Counts()
        self.seen: list[Seen] = []
        #: `time.perf_counter()` of the last request that was work (not an empty poll, not setup).
        self.last_work = 0.0
        self.session: aiohttp.ClientSession
        self._table = _Proxy(service="table", target=targets["table"], counter=self)
        self._queue = _Proxy(service="queue", target=targets["queue"], counter=self)

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=60), auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=200))
        await self._table.start()
        await self._queue.start()

    async def stop(self) -> None:
        await self._table.stop()
        await self._queue.stop()
        await self.session.close()

    @property
    def connection_string(self) -> str:
        """Azurite's connection string with both services through the counting proxies."""
        return azurite_connection_string(port=self._table.port, queue_port=self._queue.port)

    def record(self, service: str, method: str, path: str, query: str, body: bytes, answer: bytes,
               status: int) -> None:
        kind, entities = (_table_kind if service == "table" else _queue_kind)(
            method, path, query, body, answer, status)
        self.counts.add(service, kind, entities)
        target = path
        if kind == "batch" and (first := _BATCH_TARGET.search(body)) is not None:
            target = unquote(urlparse(first[1].decode("utf-8", "replace")).path)
        self.seen.append(Seen(service=service, kind=kind, method=method, path=path, target=target))
        if kind not in ("poll", "setup"):
            self.last_work = time.perf_counter()


def _table_kind(method: str, path: str, query: str, body: bytes, answer: bytes,
                status: int) -> tuple[str, int]:
    resource = path.rstrip("/").rsplit("/", 1)[-1]
    if resource == "$batch":
        return "batch", len(_BATCH_OPERATION.findall(body))
    if resource.startswith("Tables"):
        return "setup", 0
    if method == "GET":
        if "PartitionKey=" in resource and "RowKey=" in resource:
            return "read", 1 if status == 200 else 0
        return "query", _rows(answer)
    return "write", 1


def _rows(answer: bytes) -> int:
    try:
        value: Any = json.loads(answer).get("value", [])
    except (ValueError, AttributeError):
        return 0
    return len(value) if isinstance(value, list) else 0


def _queue_kind(method: str, path: str, query: str, body: bytes, answer: bytes,
                status: int) -> tuple[str, int]:
    parts = path.strip("/").split("/")  # account, queue, ["messages", [id]]
    if len(parts) < 3 or parts[2] != "messages":
        return "setup", 0
    if len(parts) == 3:
        if method == "POST":
            return "put", 1
        if method == "GET" and "peekonly=true" not in query.lower():
            messages = answer.count(b"<QueueMessage>")
            return ("get", messages) if messages else ("poll", 0)
        return "setup", 0
    return ("delete", 1) if method == "DELETE" else ("update", 1)
