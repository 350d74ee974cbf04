"""The bot in-process for the Teams app's tests: the real prompt and model client against a local
model, the contract-enforcing Bot Connector stand-in, the in-memory store, and settings from
a dict, as the runtime builds them."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx2

from devtools.fake_channel import FakeConnector
from devtools.fake_model import FakeModelServer
from shared.auth import BotAuthenticator
from shared.bot import ChatBot
from shared.connector import BotConnector
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import load_settings
from shared.store import ConversationStore
from shared.streaming import StreamClock
from shared.tools import Function

HEADERS = {"Content-Type": "application/json"}


async def _no_wait(_: float) -> None:
    return None


@asynccontextmanager
async def running_bot(store: ConversationStore, model: FakeModelServer, *,
                      clock: StreamClock | None = None, functions: Sequence[Function] = (),
                      **environment: str) -> AsyncIterator[ChatBot]:
    """A bot whose settings are the model's plus `environment`; `clock`: its streams' time (a
    test gives the connector stand-in the same); `functions`: its tools."""
    settings = load_settings({"OPENAI_BASE_URL": model.base_url, "OPENAI_MODEL": "m",
                              **environment})
    prompt = ChatPrompt(build_model(settings.model), instructions=settings.model.instructions,
                        suggested_replies=settings.suggested_replies, functions=functions,
                        tool_timeout_seconds=settings.model.tool_timeout_seconds,
                        timeout_seconds=settings.model.timeout_seconds)
    http = httpx2.AsyncClient()
    bot = ChatBot(settings=settings, store=store, prompt=prompt,
                  connector=BotConnector(credential=None),
                  authenticator=BotAuthenticator(settings.bot, http=http, in_azure=False),
                  sleep=_no_wait)
    if clock is not None:
        bot.delivery.clock = clock
    try:
        yield bot
    finally:
        await bot.connector.close()
        await prompt.model.close()
        await http.aclose()


async def until(check: Callable[[], bool], *, within: float = 10.0) -> None:
    """Wait until `check()` holds (polled), or fail after `within` seconds."""
    for _ in range(int(within / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {within} s")


def activity(connector: FakeConnector, conversation_id: str, text: str = "tell me", *,
             personal: bool = True, **extra: Any) -> bytes:
    """A Teams message: in a personal chat (`a:` ID, streams) or a group chat (does not)."""
    return json.dumps({
        "type": "message", "id": uuid.uuid4().hex, "text": text, "channelId": "msteams",
        "serviceUrl": connector.url, "from": {"id": "29:u", "name": "Ada"},
        "recipient": {"id": "28:bot", "name": "chatstate"},
        "conversation": {"id": conversation_id,
                         "conversationType": "personal" if personal else "groupChat"},
        **extra}).encode()


def last_user_content(model: FakeModelServer) -> Any:
    """The newest user message's content in the model's newest request, as it went out."""
    return [m for m in model.requests[-1]["messages"] if m["role"] == "user"][-1]["content"]
