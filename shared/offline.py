"""The offline stand-in: a local Chat Completions endpoint that needs no model and no network.

It runs behind the real openai SDK as an in-process HTTP transport, so `make run` exercises the same
code path as a real model, streamed or not. Its replies say plainly where they come from and prove memory works: how
many earlier messages arrived with the prompt and what the user said before.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx2

__all__ = ["offline_reply", "offline_transport"]

PREFIX = "[offline stand-in: no model is configured]"


def _quote(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return f"“{text[:limit]}…”" if len(text) > limit else f"“{text}”"


def offline_reply(messages: list[dict[str, Any]]) -> str:
    """The stand-in's answer to a Chat Completions `messages` list."""
    history = [m for m in messages if m.get("role") != "system"]
    said = [str(m.get("content") or "") for m in history if m.get("role") == "user"]
    latest = said[-1] if said else ""
    earlier = len(history) - 1
    parts = [PREFIX, f"You said {_quote(latest)}."]
    if earlier <= 0:
        parts.append("This is the first message I have from you in this conversation.")
    else:
        parts.append(f"I received {earlier} earlier message{'s' if earlier != 1 else ''} with it.")
        if len(said) > 1:
            parts.append(f"Before this you said {_quote(said[-2])}.")
    parts.append("Set OPENAI_API_KEY, OPENAI_BASE_URL or AZURE_OPENAI_ENDPOINT for real answers.")
    return " ".join(parts)


def _handle(request: httpx2.Request) -> httpx2.Response:
    if not request.url.path.endswith("/chat/completions"):
        return httpx2.Response(404, json={"error": {"message": "the offline stand-in serves only "
                                                    "/chat/completions", "code": "not_found"}})
    body = json.loads(request.content or b"{}")
    text = offline_reply(body.get("messages", []))
    if body.get("stream"):
        return httpx2.Response(200, headers={"Content-Type": "text/event-stream"},
                               content=_events(text))
    return httpx2.Response(200, json={
        "id": f"chatcmpl-offline-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "offline-stand-in",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    })


def _events(text: str) -> bytes:
    """`text` as a stream of server-sent events, a few words each, then its usage."""
    words = text.split(" ")
    pieces = [" ".join(words[start:start + 4]) for start in range(0, len(words), 4)]
    base = {"id": f"chatcmpl-offline-{uuid.uuid4().hex[:12]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": "offline-stand-in"}
    chunks = [{**base, "choices": [{"index": 0, "finish_reason": None,
                                    "delta": {"content": piece if index == 0 else f" {piece}"}}]}
              for index, piece in enumerate(pieces)]
    chunks.append({**base, "choices": [{"index": 0, "finish_reason": "stop", "delta": {}}]})
    chunks.append({**base, "choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0,
                                                    "total_tokens": 0}})
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks).encode() + b"data: [DONE]\n\n"


def offline_transport() -> httpx2.MockTransport:
    return httpx2.MockTransport(_handle)
