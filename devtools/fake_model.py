"""A local OpenAI-compatible Chat Completions server for tests and benchmarks.

It answers on 127.0.0.1 over real HTTP, so the real openai SDK runs against it. It records every
request, can be scripted (a queue of replies, statuses, tool calls, delays) and otherwise answers
with a reply that names the newest user message and how many messages it received. Asked to
stream, it sends server-sent events word by word (`first_token_after`, `word_interval`) and counts
the words a client read before it hung up (`streamed_words`, `hung_up`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from devtools.local_server import LocalServer

__all__ = ["FakeModelServer", "Scripted", "default_reply", "tool_call"]

_ids = itertools.count(1)


@dataclass
class Scripted:
    """One scripted answer: a status with a body, or a reply / tool calls, after `delay` seconds."""

    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    error: dict[str, Any] | None = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def default_reply(body: dict[str, Any]) -> str:
    messages = body.get("messages", [])
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    return f"reply to {users[-1]!r} after {len(messages)} messages" if users else "hello"


def tool_call(name: str, arguments: dict[str, Any], call_id: str | None = None) -> dict[str, Any]:
    return {"id": call_id or f"call_{next(_ids)}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


class FakeModelServer(LocalServer):
    def __init__(self, *, latency: float = 0.0,
                 reply: Callable[[dict[str, Any]], str] = default_reply,
                 first_token_after: float = 0.0, word_interval: float = 0.0) -> None:
        self.latency = latency
        self.reply = reply
        self.first_token_after = first_token_after
        self.word_interval = word_interval
        self.streamed_words = 0
        self.hung_up = 0
        self.script: deque[Scripted] = deque()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        super().__init__()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def calls(self) -> int:
        return len(self.requests)

    def then(self, *answers: Scripted) -> FakeModelServer:
        self.script.extend(answers)
        return self

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.paths.append(request.path)
        answer = self.script.popleft() if self.script else Scripted()
        delay = answer.delay or self.latency
        if delay:
            await asyncio.sleep(delay)
        if answer.status != 200:
            error = answer.error or {"message": f"scripted {answer.status}", "type": "server_error",
                                     "code": None}
            return web.json_response({"error": error}, status=answer.status, headers=answer.headers)
        if body.get("stream"):
            return await self._stream(request, body, answer)
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if answer.tool_calls:
            message["tool_calls"] = answer.tool_calls
        else:
            message["content"] = answer.content if answer.content is not None else self.reply(body)
        return web.json_response({
            "id": f"chatcmpl-{next(_ids)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake-model"),
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if answer.tool_calls else "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        })

    async def _stream(self, request: web.Request, body: dict[str, Any],
                      answer: Scripted) -> web.StreamResponse:
        """The answer as server-sent events: content word by word, tool calls in two pieces each."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": f"chatcmpl-{next(_ids)}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": body.get("model", "fake-model")}

        async def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> None:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                     **extra}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        try:
            if self.first_token_after:
                await asyncio.sleep(self.first_token_after)
            await event({"role": "assistant", "content": ""})
            if answer.tool_calls:
                for index, call in enumerate(answer.tool_calls):
                    arguments = call["function"]["arguments"]
                    half = len(arguments) // 2
                    await event({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                                 "function": {"name": call["function"]["name"],
                                                              "arguments": arguments[:half]}}]})
                    await event({"tool_calls": [{"index": index,
                                                 "function": {"arguments": arguments[half:]}}]})
                await event({}, "tool_calls")
            else:
                text = answer.content if answer.content is not None else self.reply(body)
                for index, word in enumerate(text.split(" ")):
                    if index and self.word_interval:
                        await asyncio.sleep(self.word_interval)
                    await event({"content": word if index == 0 else f" {word}"})
                    self.streamed_words += 1
                await event({}, "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                await response.write(("data: " + json.dumps({**base, "choices": [], "usage": {
                    "prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}) +
                    "\n\n").encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.hung_up += 1
            raise
        return response
