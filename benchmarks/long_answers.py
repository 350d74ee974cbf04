"""A long answer as a Teams user feels it: how it arrives in several messages, and the pause at
each break between them.

The bot runs in-process (the real turn, delivery and streams) against the model stand-in and the
contract-enforcing Bot Connector stand-in, in real time (no scaled clock). The model streams an
answer of ANSWER_KB KB (prose and a code block) in STREAM_SECONDS, so parts end by size; a part
that ends by time (Teams' two minutes) takes the same path: its final message, then the next
stream's first update, paced one request a second. Figures, over TURNS turns:

parts        messages per answer, and every part within Teams' 28 KB with no contract violation;
gap          at a break, the last update of a part → the first update of the next (what the user
             sees pause), and the part's final → the next stream's first update;
final        the model's last word → the last message's final (the answer complete on screen).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from itertools import pairwise
from typing import Any

import httpx2

from devtools.fake_channel import FakeConnector
from devtools.fake_model import FakeModelServer, Scripted
from shared.auth import BotAuthenticator
from shared.bot import ChatBot
from shared.connector import BotConnector
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import load_settings
from shared.store import InMemoryConversationStore

from .common import code_version, machine, now_iso

TURNS = 3
ANSWER_KB = 60
STREAM_SECONDS = 20.0
HEADERS = {"Content-Type": "application/json"}


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def answer_text() -> str:
    """About ANSWER_KB KB of prose with a code block in the middle."""
    prose = "\n\n".join(" ".join(f"Paragraph {p} sentence {s} says something useful." for s in range(6))
                        for p in range(ANSWER_KB * 1024 // 300))
    code = "```python\n" + "".join(f"value_{i} = compute({i})\n" for i in range(120)) + "```"
    middle = len(prose) // 2
    cut = prose.index("\n\n", middle)
    return f"{prose[:cut]}\n\n{code}{prose[cut:]}"


async def one_turn(bot: ChatBot, model: FakeModelServer, connector: FakeConnector) -> dict[str, Any]:
    conversation = f"a:long-{uuid.uuid4().hex[:10]}"
    text = answer_text()
    model.word_interval = STREAM_SECONDS / len(text.split(" "))
    model.then(Scripted(content=text))
    body = {"type": "message", "id": uuid.uuid4().hex, "text": "tell me everything",
            "channelId": "msteams", "serviceUrl": connector.url,
            "from": {"id": "29:u", "name": "Ada"}, "recipient": {"id": "28:bot"},
            "conversation": {"id": conversation, "conversationType": "personal"}}
    await bot.handle(body=json.dumps(body).encode(), headers=HEADERS)
    requests = [r for r in connector.requests if r["conversation_id"] == conversation]
    streams = connector.streams.of(conversation)
    pauses = [later.started - earlier.update_times[-1] for earlier, later in pairwise(streams)]
    after_final = [later.started - (earlier.ended or later.started)
                   for earlier, later in pairwise(streams)]
    shown = " ".join(m["text"] for m in connector.messages(conversation))
    return {"parts": len(connector.messages(conversation)), "bytes": len(text.encode()),
            "largest_request_bytes": max(r["bytes"] for r in requests),
            "pause_s": pauses, "final_to_next_s": after_final,
            "final_after_model_end_s": requests[-1]["at"] - model.stream_ends[-1],
            "whole": _words(shown) == _words(text)}


def _words(text: str) -> list[str]:
    """The words of `text`, the code fences a split adds left out."""
    return [word for word in text.split() if not word.startswith("```")]


async def run(connection_string: str) -> dict[str, Any]:
    model = FakeModelServer()
    connector = FakeConnector()
    await model.start()
    await connector.start()
    settings = load_settings({"OPENAI_BASE_URL": model.base_url, "OPENAI_MODEL": "m",
                              "CHAT_MODEL_TIMEOUT_SECONDS": "120", "CHAT_SUGGESTED_REPLIES": "off"})
    http = httpx2.AsyncClient()
    bot = ChatBot(settings=settings, store=InMemoryConversationStore(),
                  prompt=ChatPrompt(build_model(settings.model)),
                  connector=BotConnector(credential=None),
                  authenticator=BotAuthenticator(settings.bot, http=http, in_azure=False))
    turns = []
    try:
        for index in range(TURNS):
            _log(f"long answers: turn {index + 1} of {TURNS}")
            started = time.perf_counter()
            turns.append(await one_turn(bot, model, connector))
            turns[-1]["seconds"] = time.perf_counter() - started
    finally:
        await bot.connector.close()
        await bot.prompt.model.close()
        await http.aclose()
        await model.stop()
        await connector.stop()
    pauses = [p for t in turns for p in t["pause_s"]]
    finals = [p for t in turns for p in t["final_to_next_s"]]
    section = {
        "when": now_iso(), "machine": machine(), "code": code_version(),
        "answer_bytes": turns[0]["bytes"], "stream_seconds": STREAM_SECONDS,
        "parts": [t["parts"] for t in turns],
        "largest_request_bytes": max(t["largest_request_bytes"] for t in turns),
        "violations": list(connector.streams.violations),
        "overlapping": list(connector.streams.overlapping),
        "throttled": list(connector.streams.throttled),
        "whole_in_order": all(t["whole"] for t in turns),
        "pause_at_break_s": {"median": round(statistics.median(pauses), 2),
                             "max": round(max(pauses), 2), "n": len(pauses)},
        "final_to_next_stream_s": {"median": round(statistics.median(finals), 2),
                                   "max": round(max(finals), 2)},
        "final_after_model_end_s": round(statistics.median(
            t["final_after_model_end_s"] for t in turns), 2),
    }
    _print(section)
    return section


def _print(section: dict[str, Any]) -> None:
    print(f"\nlong answers ({section['machine']}, {section['code']})")
    print(f"  a {section['answer_bytes'] / 1024:.0f} KB answer streamed in "
          f"{section['stream_seconds']:.0f} s: {section['parts']} messages, the largest request "
          f"{section['largest_request_bytes']:,} bytes (Teams: about 28,000); whole and in order: "
          f"{section['whole_in_order']}; violations {section['violations']}, overlapping streams "
          f"{section['overlapping']}, throttled {section['throttled']}")
    pause, final = section["pause_at_break_s"], section["final_to_next_stream_s"]
    print(f"  pause at a break (a part's last update → the next's first): median "
          f"{pause['median']:.2f} s, max {pause['max']:.2f} s over {pause['n']} breaks")
    print(f"  a part's final → the next stream's first update: median {final['median']:.2f} s, "
          f"max {final['max']:.2f} s")
    print(f"  the model's last word → the answer's last final: "
          f"{section['final_after_model_end_s']:.2f} s")
