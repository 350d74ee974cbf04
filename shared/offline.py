"""The offline stand-in: a local Chat Completions endpoint that needs no model and no network.

It runs behind the real openai SDK as an in-process HTTP transport, so `make run` exercises the same
code path as a real model, streamed or not. Its replies say plainly where they come from and prove
memory works: how many earlier messages arrived with the prompt, what the user said before, and
the rolling summary. Asked for a summary (`shared/summary.py`), it writes one by quoting what
users said. Offered tools, it calls one when the newest message names it ("search_docs
streaming"), its required text arguments filled with the message; given the results, it quotes
them and cites the first source as [1], so a tool round and a citation show with no key.
Streamed, it sends a few words every `STREAM_PACE_SECONDS` (about four seconds a reply), so a
channel that streams (the Agents Playground, Teams) shows the reply growing.
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

from .instructions import SUGGESTIONS_CLOSE as CLOSE
from .instructions import SUGGESTIONS_OPEN as OPEN
from .instructions import SUMMARY_HEADING, SUMMARY_INSTRUCTIONS

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
    summaries = [str(m.get("content") or "") for m in messages[1:2] if _is_summary(m)]
    history = [m for m in messages if m.get("role") != "system" and not _is_summary(m)]
    said = [_text(m.get("content")) for m in history if m.get("role") == "user"]
    images = _images(history[-1].get("content")) if history else []
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
        summary = _unquoted(summaries[0].split("\n", 1)[-1])
        parts.append(f"I also have a summary of what came before: {_quote(summary, 160)}")
    if images:
        parts.append(f"With it came {len(images)} image{'s' if len(images) != 1 else ''} as image "
                     f"input ({', '.join(images)}); I cannot look at images myself.")
    parts.append("Set OPENAI_API_KEY, OPENAI_BASE_URL or AZURE_OPENAI_ENDPOINT for real answers.")
    if messages and OPEN in str(messages[0].get("content") or ""):  # suggested replies asked for
        parts.append(f"\n{OPEN}\nWhat did I say before?\nSum up our chat\n{CLOSE}")
    return " ".join(parts)


def _text(content: Any) -> str:
    """A message's text: the content, or its text parts when it has images too."""
    if isinstance(content, list):
        return " ".join(str(part.get("text") or "") for part in content
                        if isinstance(part, dict) and part.get("type") == "text")
    return str(content or "")


def _images(content: Any) -> list[str]:
    """The media types of a message's image parts (data URLs)."""
    parts = content if isinstance(content, list) else []
    urls = [str((part.get("image_url") or {}).get("url") or "") for part in parts
            if isinstance(part, dict) and part.get("type") == "image_url"]
    return [url[5:].partition(";")[0] if url.startswith("data:") else "a link" for url in urls]


def _is_summary(message: dict[str, Any]) -> bool:
    return message.get("role") == "user" and str(message.get("content") or "").startswith(
        SUMMARY_HEADING)


def _unquoted(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def offline_tool_call(messages: list[dict[str, Any]],
                      tools: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The call the stand-in makes: to the offered tool the newest user message names (its name,
    or its name with spaces for underscores), once per message; None when none is named."""
    if not messages or messages[-1].get("role") != "user" or _is_summary(messages[-1]):
        return None
    text = str(messages[-1].get("content") or "")
    lowered = text.lower()
    for offered in tools:
        function = offered.get("function") or {}
        name = str(function.get("name") or "")
        if not name or (name.lower() not in lowered and
                        name.lower().replace("_", " ") not in lowered):
            continue
        parameters = function.get("parameters") or {}
        properties = parameters.get("properties") or {}
        required = parameters.get("required") or []
        if any((properties.get(key) or {}).get("type") != "string" for key in required):
            continue  # only text arguments can be filled from a message
        spaced = name.replace("_", " ")
        query = " ".join(text.replace(name, " ").replace(spaced, " ").split()) or text
        return {"id": f"call_offline_{uuid.uuid4().hex[:12]}", "type": "function",
                "function": {"name": name,
                             "arguments": json.dumps({key: query for key in required})}}
    return None


def offline_tool_answer(messages: list[dict[str, Any]]) -> str:
    """The stand-in's answer after a tool round: what each tool returned, and a citation of the
    first source listed ([1]) when there is one."""
    results: list[dict[str, Any]] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.insert(0, message)
    parts = [PREFIX]
    cited = False
    for result in results:
        body, _, sources = str(result.get("content") or "").partition("\n\nSources of this tool")
        lines = [line for line in body.splitlines() if line.strip() and not line.startswith("[output")]
        parts.append(f"The tool answered {_quote(' '.join(lines), 200)}.")
        first = next((line for line in sources.splitlines() if line.startswith("[1] ")), None)
        if first is not None and not cited:
            title = first[4:].split(" <", 1)[0].split(": ", 1)[0]
            parts.append(f"Its first source is {_quote(title, 80)} [1].")
            cited = True
    return " ".join(parts)


def _tool_call_response(call: dict[str, Any], *, stream: bool) -> httpx2.Response:
    base = {"id": f"chatcmpl-offline-{uuid.uuid4().hex[:12]}", "created": int(time.time()),
            "model": "offline-stand-in"}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if not stream:
        return httpx2.Response(200, json={**base, "object": "chat.completion", "usage": usage,
                                          "choices": [{"index": 0, "finish_reason": "tool_calls",
                                                       "message": {"role": "assistant",
                                                                   "content": None,
                                                                   "tool_calls": [call]}}]})
    chunk = {**base, "object": "chat.completion.chunk"}
    delta = {"role": "assistant", "tool_calls": [{"index": 0, **call}]}
    events = [{**chunk, "choices": [{"index": 0, "finish_reason": None, "delta": delta}]},
              {**chunk, "choices": [{"index": 0, "finish_reason": "tool_calls", "delta": {}}]},
              {**chunk, "choices": [], "usage": usage}]
    return httpx2.Response(200, headers={"Content-Type": "text/event-stream"},
                           content="".join(f"data: {json.dumps(e)}\n\n" for e in events).encode()
                           + b"data: [DONE]\n\n")


def _handle(request: httpx2.Request, *, pace: float) -> httpx2.Response:
    if not request.url.path.endswith("/chat/completions"):
        return httpx2.Response(404, json={"error": {"message": "the offline stand-in serves only "
                                                    "/chat/completions", "code": "not_found"}})
    body = json.loads(request.content or b"{}")
    messages = body.get("messages", [])
    asked_for_summary = bool(messages) and str(messages[0].get("content") or "").startswith(
        SUMMARY_INSTRUCTIONS[:60])
    call = None if asked_for_summary else offline_tool_call(messages, body.get("tools") or [])
    if call is not None:
        return _tool_call_response(call, stream=bool(body.get("stream")))
    if asked_for_summary:
        text = offline_summary(messages)
    elif messages and messages[-1].get("role") == "tool":
        text = offline_tool_answer(messages)
    else:
        text = offline_reply(messages)
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
