"""A local file host for tests: serves files by path as SharePoint or the Bot Connector's
attachment views would, and records who asked (with which `Authorization`).

`put(path, body, content_type=...)` adds a file; `chunked=True` sends it without a length, as a
server that does not announce one; `redirect(path, to)` answers 302 with a `Location`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from devtools.local_server import LocalServer

__all__ = ["FakeFileHost"]


@dataclass(frozen=True)
class _File:
    body: bytes
    content_type: str
    chunked: bool


class FakeFileHost(LocalServer):
    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, _File] = {}
        self.redirects: dict[str, str] = {}
        #: Each request: its path and its Authorization header (None when it had none).
        self.requests: list[dict[str, Any]] = []

    def put(self, path: str, body: bytes, *, content_type: str = "application/octet-stream",
            chunked: bool = False) -> str:
        """Serve `body` at `path`; its URL."""
        self.files[path] = _File(body, content_type, chunked)
        return f"{self.url}{path}"

    def redirect(self, path: str, to: str) -> str:
        self.redirects[path] = to
        return f"{self.url}{path}"

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/{tail:.*}", self._get)

    async def _get(self, request: web.Request) -> web.StreamResponse:
        self.requests.append({"path": request.path,
                              "authorization": request.headers.get("Authorization")})
        if request.path in self.redirects:
            raise web.HTTPFound(self.redirects[request.path])
        found = self.files.get(request.path)
        if found is None:
            return web.Response(status=404)
        if not found.chunked:
            return web.Response(body=found.body, content_type=found.content_type)
        response = web.StreamResponse(headers={"Content-Type": found.content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(found.body), 1_000):
            await response.write(found.body[start:start + 1_000])
        await response.write_eof()
        return response
