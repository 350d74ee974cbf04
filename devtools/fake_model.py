"""A local OpenAI-compatible Chat Completions server for tests and benchmarks.

It answers on 127.0.0.1 over real HTTP, so the real openai SDK runs against it. It records every
request, can be scripted (a queue of replies, statuses, tool calls, delays) and otherwise answers
with a reply that names the newest user message and how many messages it received. Asked to
stream, it sends server-sent events word by word (`first_token_after`, `word_interval`) and counts
the words a client read before it hung up (`streamed_words`, `hung_up`).

Its usage reports `cached_tokens` as OpenAI's prompt cache would: the longest prefix the prompt
shares with an earlier one (`PrefixCache`), counted from 1,024 tokens in blocks of 128. With
`usage=(prompt, completion)` every answer reports that instead (a budget test's round figures).
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
from shared.tokens import count_text_tokens

__all__ = ["FakeModelServer", "PrefixCache", "Scripted", "default_reply", "tool_call"]

_ids = itertools.count(1)
#: OpenAI caches prompts from 1,024 tokens on, and reports hits in blocks of 128 tokens.
CACHE_MIN_TOKENS = 1_024
CACHE_BLOCK_TOKENS = 128


class PrefixCache:
    """A provider's prompt cache: which prefix of a prompt was seen before (the newest `size`)."""

    def __init__(self, *, size: int = 64) -> None:
        self._seen: deque[str] = deque(maxlen=size)

    def lookup(self, prompt: str) -> tuple[int, int]:
        """(prompt tokens, cached tokens) of `prompt`; then remember it."""
        shared = max((_common_prefix(prompt, earlier) for earlier in self._seen), default=0)
        self._seen.append(prompt)
        total = count_text_tokens(prompt)
        cached = count_text_tokens(prompt[:shared])
        cached = cached // CACHE_BLOCK_TOKENS * CACHE_BLOCK_TOKENS if cached >= CACHE_MIN_TOKENS else 0
        return total, min(cached, total)


def prompt_text(body: dict[str, Any]) -> str:
    """A request's prompt as the cache sees it: tools, then messages, in one canonical text."""
    return json.dumps([body.get("tools"), body.get("messages", [])], ensure_ascii=False,
                      separators=(",", ":"))


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search over slice comparisons, done in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


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
                 first_token_after: float = 0.0, word_interval: float = 0.0,
                 api_key: str | None = None, usage: tuple[int, int] | None = None) -> None:
        """With `api_key`, a request without `Authorization: Bearer <api_key>` gets OpenAI's 401.
        `usage`: the (prompt, completion) tokens every answer reports (None: counted)."""
        self.api_key = api_key
        self.fixed_usage = usage
        self.latency = latency
        self.reply = reply
        self.first_token_after = first_token_after
        self.word_interval = word_interval
        self.streamed_words = 0
        self.hung_up = 0
        #: `time.perf_counter()` when each streamed answer's last word went out.
        self.stream_ends: list[float] = []
        self.script: deque[Scripted] = deque()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        #: The usage reported for each answered request, in order.
        self.usages: list[dict[str, Any]] = []
        self.cache = PrefixCache()
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
        app.router.add_get("/{tail:.*}/models", self._models)
        app.router.add_post("/{tail:.*}", self._handle)

    def _refused(self, request: web.Request) -> web.Response | None:
        if self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        return web.json_response({"error": {"message": "Incorrect API key provided.",
                                            "type": "invalid_request_error",
                                            "code": "invalid_api_key"}}, status=401)

    async def _models(self, request: web.Request) -> web.Response:
        """GET /models, as a compatible server lists what it serves (no tokens)."""
        self.paths.append(request.path)
        return self._refused(request) or web.json_response(
            {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "test"}]})

    async def _handle(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        self.paths.append(request.path)
        answer = self.script.popleft() if self.script else Scripted()
        delay = answer.delay or self.latency
        if not body.get("stream") and (self.first_token_after or self.word_interval):
            # Unstreamed, the whole answer takes as long as its stream would.
            words = len((answer.content or self.reply(body)).split(" "))
            delay += self.first_token_after + self.word_interval * max(0, words - 1)
        if delay:
            await asyncio.sleep(delay)
        if answer.status != 200:
            error = answer.error or {"message": f"scripted {answer.status}", "type": "server_error",
                                     "code": None}
            return web.json_response({"error": error}, status=answer.status, headers=answer.headers)
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if answer.tool_calls:  # with words before them, if the script has content too
            message["tool_calls"] = answer.tool_calls
            message["content"] = answer.content
        else:
            message["content"] = answer.content if answer.content is not None else self.reply(body)
        prompt_tokens, cached = self.cache.lookup(prompt_text(body))
        completion_tokens = count_text_tokens(message["content"] or "") + 7
        if self.fixed_usage is not None:
            (prompt_tokens, completion_tokens), cached = self.fixed_usage, 0
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        self.usages.append(usage)
        if body.get("stream"):
            return await self._stream(request, body, answer, text=message["content"], usage=usage)
        return web.json_response({
            "id": f"chatcmpl-{next(_ids)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake-model"),
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if answer.tool_calls else "stop"}],
            "usage": usage,
        })

    async def _stream(self, request: web.Request, body: dict[str, Any], answer: Scripted, *,
                      text: str | None, usage: dict[str, Any]) -> web.StreamResponse:
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
            if answer.tool_calls and text:  # words first, then the calls
                for index, word in enumerate(text.split(" ")):
                    await event({"content": word if index == 0 else f" {word}"})
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
                for index, word in enumerate((text or "").split(" ")):
                    if index and self.word_interval:
                        await asyncio.sleep(self.word_interval)
                    await event({"content": word if index == 0 else f" {word}"})
                    self.streamed_words += 1
                self.stream_ends.append(time.perf_counter())
                await event({}, "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                await response.write(("data: " + json.dumps({**base, "choices": [], "usage": usage}) +
                                      "\n\n").encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.hung_up += 1
            raise
        return response
