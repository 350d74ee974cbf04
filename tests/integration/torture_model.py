"""The model the randomized concurrency test talks to, at the transport (`torture.py`).

It answers each unit of a conversation's order (a burst's messages, or one) by the activities it
was asked about, streams when asked to (Teams personal chats), lets the user press Stop midway,
fails the turns meant to fail, and bills every call by conversation, user and tenant as a
provider would, so the spend and budget counters can be checked against it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx2

from shared.tokens import count_request_tokens

__all__ = ["MODEL_LATENCY", "REPLY_TOKENS", "STREAMED", "STREAM_PACE", "STREAM_WORDS",
           "TOKENS_PER_CALL", "CutStream", "ScriptedModel", "tenant_of"]

#: About what a call bills: its prompt as the code's estimate counts it (an upper bound of what a
#: provider counts) and `REPLY_TOKENS`.
TOKENS_PER_CALL = 400
REPLY_TOKENS = 100
#: A streamed answer: this many words, one SSE chunk each, `STREAM_PACE` seconds apart (the
#: reply stream sends at most one update a second: an answer of ~1.4 s shows the informative
#: update and one of text; one that is stopped lasts ~2.8 s, past its third update).
STREAM_WORDS = {"streamed": 5, "stopped": 12}
STREAM_PACE = 0.2
#: Turns that stream into a Teams personal chat (`a:` conversations only), and the user's Stop.
STREAMED = ("streamed", "stopped")
#: A model call that does not stream takes up to this long (so messages wait behind it).
MODEL_LATENCY = 0.15


def tenant_of(conversation: str) -> str:
    """The round's tenants: the group chat and the first personal chat are tenant A's."""
    return "tenant-b" if conversation.endswith("-p2") else "tenant-a"


@dataclass
class CutStream:
    """A streamed call the bot closed before its usage arrived (the user pressed Stop)."""

    conversation: str
    activity_id: str
    #: The request as shared/prompt.py estimates it (`count_request_tokens`).
    request_tokens: int
    user: str = ""


class _SSE(httpx2.AsyncByteStream):
    """A streamed completion's SSE chunks, paced; bills the call once its usage was read, or
    records it cut when the reader closes it first."""

    def __init__(self, model: ScriptedModel, chunks: list[bytes], done_at: int,
                 cut: CutStream, *, stop: Callable[[], None] | None) -> None:
        self.model, self.chunks, self.done_at, self.cut = model, chunks, done_at, cut
        self.stop = stop
        self.billed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for index, chunk in enumerate(self.chunks):
            if index == 2 and self.stop is not None:  # the user, reading the first words
                self.stop()
            if index == self.done_at:  # the reader asked past the usage chunk: it has it
                self.billed = True
                self.model.bill(self.cut.conversation, self.cut.user,
                                self.cut.request_tokens + REPLY_TOKENS)
            elif 0 < index < self.done_at - 1:
                await asyncio.sleep(STREAM_PACE)
            yield chunk

    async def aclose(self) -> None:
        if not self.billed:
            self.billed = True
            self.model.cut.append(self.cut)


class ScriptedModel:
    """The model at the transport: bills a call its prompt (as `count_request_tokens` counts it:
    a provider counts no more) and `REPLY_TOKENS`, by conversation (`billed`) and by the unit's
    last sender and its tenant (`accounts`: `user:<id>`, `tenant:<id>`); answers the unit's user
    messages (those after the last answer: a burst's, or one) `re <a>+<b> #<call>` (a tool call
    for a `loop` turn, until the round limit cuts it; for a `fail` turn, a tool call, then a 500
    billed as its request, which is all a provider that reports nothing can be counted as; a 500
    so billed, every time, when one of them is a `poison` turn). A streamed request is
    answered in SSE chunks, `STREAM_PACE` apart, usage last; a stream the bot closes before
    reading its usage is recorded in `cut` (billed as the code estimates it). Other answers take
    up to `MODEL_LATENCY`."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.billed: dict[str, int] = defaultdict(int)
        self.accounts: dict[str, int] = defaultdict(int)
        self.cut: list[CutStream] = []
        #: Called as a `stopped` turn's answer begins to stream (conversation, activity).
        self.press_stop: Callable[[str, str], None] | None = None
        self.calls = 0

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.calls += 1
        body = json.loads(request.content)
        asked = _asked(body["messages"])
        conversation, activity_id, variant, user = asked[-1]
        variants = {variant for _, _, variant, _ in asked}
        ids = "+".join(activity for _, activity, _, _ in asked)
        prompt = count_request_tokens(body["messages"], body.get("tools"))
        if "poison" in variants:  # billed as its request, as a provider that reports nothing
            self.bill(conversation, user, prompt)
            return httpx2.Response(500, json={"error": {"message": "the model is down",
                                                        "type": "server_error"}})
        usage = {"prompt_tokens": prompt, "completion_tokens": REPLY_TOKENS,
                 "total_tokens": prompt + REPLY_TOKENS}
        if "fail" in variants and body["messages"][-1]["role"] == "tool":
            self.bill(conversation, user, prompt)
            return httpx2.Response(500, json={"error": {"message": "down", "type": "server_error"}})
        if body.get("stream"):
            stop = None
            if variant == "stopped" and (press := self.press_stop) is not None:
                stop = functools.partial(press, conversation, activity_id)
            return self._streamed(body, conversation, activity_id, user, ids, usage, stop=stop,
                                  words=STREAM_WORDS.get(variant, STREAM_WORDS["streamed"]))
        await asyncio.sleep(self.rng.uniform(0, MODEL_LATENCY))
        self.bill(conversation, user, prompt + REPLY_TOKENS)
        if "loop" in variants or "fail" in variants:
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"c{self.calls}", "type": "function",
                "function": {"name": "lookup", "arguments": "{}"}}]}
        else:
            message = {"role": "assistant", "content": f"re {ids} #{self.calls}"}
        return httpx2.Response(200, json={"id": "x", "object": "chat.completion", "created": 0,
                                          "model": "m", "usage": usage, "choices": [{
                                              "index": 0, "finish_reason": "stop",
                                              "message": message}]})

    def bill(self, conversation: str, user: str, tokens: int) -> None:
        self.billed[conversation] += tokens
        self.accounts[f"user:{user}"] += tokens
        self.accounts[f"tenant:{tenant_of(conversation)}"] += tokens

    def _streamed(self, body: dict[str, Any], conversation: str, activity_id: str, user: str,
                  ids: str, usage: dict[str, int], *, stop: Callable[[], None] | None,
                  words: int) -> httpx2.Response:
        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": choices, **extra}
            return f"data: {json.dumps(chunk)}\n\n".encode()

        pieces = [f"re {ids} #{self.calls}", *(f" w{i}" for i in range(words))]
        chunks = [event([{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
        chunks += [event([{"index": 0, "delta": {"content": piece}}]) for piece in pieces]
        chunks.append(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        chunks.append(event([], usage=usage))
        chunks.append(b"data: [DONE]\n\n")
        request_tokens = count_request_tokens(body["messages"], body.get("tools"))
        stream = _SSE(self, chunks, len(chunks) - 1,  # billed as [DONE] is asked for
                      CutStream(conversation, activity_id, request_tokens, user), stop=stop)
        return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                               stream=stream)


def _asked(messages: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """The unit's user messages as (conversation, activity, variant, sender): the last run of
    user messages, past any tool round of this turn (a summary or an earlier answer ends it)."""
    rest = list(messages)
    while rest and (rest[-1].get("role") == "tool" or rest[-1].get("tool_calls")):
        rest.pop()
    asked: list[tuple[str, str, str, str]] = []
    for message in reversed(rest):
        parts = str(message.get("content")).split("|") if message.get("role") == "user" else []
        if len(parts) < 4:
            break
        asked.append((parts[0], parts[1], parts[2], parts[3]))
    return asked[::-1]
