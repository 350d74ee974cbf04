"""The offline stand-in: a local Chat Completions endpoint that needs no model and no network.

It runs behind the real openai SDK as an in-process HTTP transport, so `make run` exercises the same
code path as a real model, streamed or not. Its replies say plainly where they come from and prove
memory works: how many earlier messages arrived with the prompt, what the user said before, and
the rolling summary. Asked for a summary (`shared/summary.py`), it writes one by quoting what
users said. Streamed, it sends a few words every `STREAM_PACE_SECONDS` (about four seconds a
reply), so a channel that streams (the Agents Playground, Teams) shows the reply growing.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx2

from .summary import SUMMARY_INSTRUCTIONS

__all__ = ["offline_reply", "offline_summary", "offline_transport"]

PREFIX = "[offline stand-in: no model is configured]"
_SUMMARY_CHARS = 1_200
#: Seconds between the streamed pieces (four words each): Teams shows at most one update a second.
STREAM_PACE_SECONDS = 0.3


def _quote(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return f"“{text[:limit]}…”" if len(text) > limit else f"“{text}”"


def offline_summary(messages: list[dict[str, Any]]) -> str:
    """The stand-in's summary: the summary so far, then what each user said, quoted, cut short."""
    request = str(messages[-1].get("content") or "")
    previous, _, transcript = request.partition("\n\nNew messages:\n")
    previous = previous.removeprefix("Summary so far:\n").strip()
    quotes = [f"{'you' if who == 'user' else who} said {_quote(text, 60)}" for who, _, text in
              (line.partition(": ") for line in transcript.splitlines())
              if who and not who.startswith(("assistant", "(tool"))]
    summary = " ".join(part for part in ("" if previous == "(none yet)" else previous,
                                          "; ".join(quotes) + "." if quotes else "") if part)
    if len(summary) > _SUMMARY_CHARS:  # keep the oldest and the newest, as a real one might
        summary = summary[:_SUMMARY_CHARS // 3] + " … " + summary[-2 * _SUMMARY_CHARS // 3:]
    return summary or "Nothing worth keeping was said."


def offline_reply(messages: list[dict[str, Any]]) -> str:
    """The stand-in's answer to a Chat Completions `messages` list."""
    summaries = [str(m.get("content") or "") for m in messages[1:2] if m.get("role") == "system"]
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
    if summaries:
        summary = summaries[0].split("\n", 1)[-1]
        parts.append(f"I also have a summary of what came before: {_quote(summary, 160)}")
    parts.append("Set OPENAI_API_KEY, OPENAI_BASE_URL or AZURE_OPENAI_ENDPOINT for real answers.")
    return " ".join(parts)


def _handle(request: httpx2.Request, *, pace: float) -> httpx2.Response:
    if not request.url.path.endswith("/chat/completions"):
        return httpx2.Response(404, json={"error": {"message": "the offline stand-in serves only "
                                                    "/chat/completions", "code": "not_found"}})
    body = json.loads(request.content or b"{}")
    messages = body.get("messages", [])
    asked_for_summary = bool(messages) and str(messages[0].get("content") or "").startswith(
        SUMMARY_INSTRUCTIONS[:60])
    text = offline_summary(messages) if asked_for_summary else offline_reply(messages)
    if body.get("stream"):
        return httpx2.Response(200, headers={"Content-Type": "text/event-stream"},
                               content=_paced(_events(text), pace=pace))
    return httpx2.Response(200, json={
        "id": f"chatcmpl-offline-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "offline-stand-in",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    })


async def _paced(events: list[bytes], *, pace: float) -> AsyncIterator[bytes]:
    for index, event in enumerate(events):
        if index and pace:
            await asyncio.sleep(pace)
        yield event


def _events(text: str) -> list[bytes]:
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
    return [f"data: {json.dumps(chunk)}\n\n".encode() for chunk in chunks] + [b"data: [DONE]\n\n"]


def offline_transport(*, pace: float = STREAM_PACE_SECONDS) -> httpx2.MockTransport:
    """The stand-in as an httpx transport; `pace`: seconds between streamed pieces (0: at once)."""
    return httpx2.MockTransport(functools.partial(_handle, pace=pace))
