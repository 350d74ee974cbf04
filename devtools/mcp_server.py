"""A small MCP server (the `mcp` SDK's server side, streamable HTTP on loopback) for `make run` and tests.

Its tools: `search_docs(query)` finds pages of a small built-in corpus about the things this
project uses and returns them as text and as resource links (title, URL, snippet), which the bot
turns into citations (annotated read-only); `delete_notes(topic)` is annotated destructive, so on
a trusted server (`demo_servers_setting`) the bot asks a person before it runs. A test may add
tools through `.mcp`, slow every request (`delay`), read the requests' headers (`headers`) and
the tool calls the server ran (`calls`: name and arguments).

    python -m devtools.mcp_server --port 8931     # then CHAT_MCP_SERVERS=[{"name": "demo",
                                                  #   "url": "http://127.0.0.1:8931/mcp",
                                                  #   "tools": ["*"], "trusted": true}]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, ResourceLink, TextContent, ToolAnnotations

__all__ = ["CORPUS", "DemoMcpServer", "demo_servers_setting"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: (title, URL, snippet) of the pages `search_docs` knows.
CORPUS: tuple[tuple[str, str, str], ...] = (
    ("Bot messages with AI-generated content",
     "https://learn.microsoft.com/en-us/microsoftteams/platform/bots/how-to/format-ai-bot-messages",
     "Teams shows an AI label, citations (a number with a source card) and feedback buttons on "
     "bot messages that carry the AI entity."),
    ("Stream bot messages",
     "https://learn.microsoft.com/en-us/microsoftteams/platform/bots/streaming-ux",
     "Informative updates, cumulative streaming updates at most one a second, then a final "
     "message; streaming is for personal chats."),
    ("Model Context Protocol: tools",
     "https://modelcontextprotocol.io/specification/2025-06-18/server/tools",
     "Servers expose tools with a name, a JSON schema and annotations such as readOnlyHint and "
     "destructiveHint; results may hold text and resource links."),
    ("Azure Table Storage: optimistic concurrency",
     "https://learn.microsoft.com/en-us/azure/storage/tables/table-storage-design-patterns",
     "An ETag guards each entity; a write with If-Match fails with 412 when another writer got "
     "there first, and an entity group transaction is atomic."),
)


def search(query: str, *, limit: int = 2) -> list[tuple[str, str, str]]:
    """The pages sharing the most words with `query` (the first ones when none shares any)."""
    words = {word for word in query.lower().split() if len(word) > 2}
    scored = sorted(CORPUS, key=lambda page: -len(words & set(
        f"{page[0]} {page[2]}".lower().replace(",", " ").replace(".", " ").split())))
    return scored[:limit]


def build(ran: Callable[[str, dict[str, Any]], None] = lambda name, arguments: None,
          before_delete: Callable[[], Awaitable[None]] | None = None) -> MCPServer:
    """The demo server; `ran` is told of each tool call as it starts; `before_delete`: awaited by
    `delete_notes` before it finishes (a test holds it there)."""
    server = MCPServer("chatstate-demo", instructions="Search the docs behind chatstate.")

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    async def search_docs(query: str) -> CallToolResult:
        """Search the documentation behind chatstate (Teams, MCP, Azure Table Storage)."""
        ran("search_docs", {"query": query})
        pages = search(query)
        text = "\n".join(f"- {title}: {snippet}" for title, _, snippet in pages)
        links = [ResourceLink(name=title, title=title, uri=url, description=snippet)
                 for title, url, snippet in pages]
        return CallToolResult(content=[TextContent(text=f"{len(pages)} pages found:\n{text}"),
                                       *links])

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True))
    async def delete_notes(topic: str) -> str:
        """Delete the stored notes about a topic (destructive: the bot asks a person first)."""
        ran("delete_notes", {"topic": topic})
        if before_delete is not None:
            await before_delete()
        return f"the notes about {topic!r} were deleted"

    return server


class DemoMcpServer:
    """The demo server on 127.0.0.1 (`port` 0: a free one), run by uvicorn in this event loop."""

    def __init__(self, *, port: int = 0, delay: float = 0.0) -> None:
        #: The tool calls the server ran: (name, arguments), and when each started (perf_counter).
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.call_times: list[float] = []
        #: While set, `delete_notes` waits until it is released before it finishes (a call a
        #: test holds; `hold_deletes` / `release_deletes`, from any thread).
        self._gate: threading.Event | None = None
        self.mcp = build(self._ran, self._before_delete)
        self.delay = delay
        self.headers: list[dict[str, str]] = []
        self.port = port or _free_port()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    def _ran(self, name: str, arguments: dict[str, Any]) -> None:
        self.call_times.append(time.perf_counter())
        self.calls.append((name, arguments))

    def hold_deletes(self) -> None:
        """From now on, `delete_notes` calls start (they are recorded) but do not finish."""
        self._gate = threading.Event()

    def release_deletes(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    async def _before_delete(self) -> None:
        if (gate := self._gate) is not None:
            await asyncio.to_thread(gate.wait, 60.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    async def start(self) -> DemoMcpServer:
        inner = self.mcp.streamable_http_app()

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
                if self.delay:
                    await asyncio.sleep(self.delay)
            await inner(scope, receive, send)

        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                await self._task  # a start-up failure (port taken) is raised here
            await asyncio.sleep(0.02)
        return self

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)


def demo_servers_setting(url: str, **options: Any) -> str:
    """CHAT_MCP_SERVERS for the demo server at `url`: every tool, the server trusted (it is ours),
    so its annotations count: `search_docs` runs, `delete_notes` asks first."""
    import json

    return json.dumps([{"name": "demo", "url": url, "tools": ["*"], "trusted": True, **options}])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8931)
    port = parser.parse_args().port

    async def serve() -> None:
        server = await DemoMcpServer(port=port).start()
        print(f"MCP demo server: {server.url} (search_docs; delete_notes, which asks first)",
              flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
