"""The tool definitions count against the turn's token budget: the history window gets what they
leave (in-memory store, the model faked at the transport under the real SDK)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx2

from shared.auth import BotAuthenticator
from shared.bot import ChatBot
from shared.connector import BotConnector
from shared.messages import ChatMessage
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import load_settings
from shared.store import InMemoryConversationStore
from shared.tokens import count_message_tokens
from shared.tools import Function

HEADERS = {"Content-Type": "application/json"}


class RecordingModel:
    """Answers every request with a short reply and keeps the request bodies."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(json.loads(request.content))
        return httpx2.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}]})


async def lookup(topic: str) -> str:
    return topic


#: A tool whose definition takes a few hundred tokens.
WORDY = Function("lookup", "Looks a topic up in the archive. " * 40, lookup)


def make_bot(store: InMemoryConversationStore, model: RecordingModel,
             functions: list[Function]) -> ChatBot:
    settings = load_settings({"OPENAI_API_KEY": "sk-test", "CHAT_HISTORY_TOKEN_BUDGET": "1200",
                              "CHAT_SUGGESTED_REPLIES": "off", "CHAT_SUMMARY": "off"})
    chat_model = build_model(settings.model,
                             http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(model)))
    return ChatBot(settings=settings, store=store,
                   prompt=ChatPrompt(chat_model, functions=functions,
                                     tools_token_budget=settings.model.tools_token_budget),
                   connector=BotConnector(credential=None),
                   authenticator=BotAuthenticator(settings.bot, http=httpx2.AsyncClient(),
                                                  in_azure=False),
                   sleep=lambda _: asyncio.sleep(0))


def message(text: str) -> bytes:
    return json.dumps({"type": "message", "id": uuid.uuid4().hex, "text": text,
                       "conversation": {"id": "c-budget"}, "deliveryMode": "expectReplies",
                       "channelId": "test"}).encode()


async def test_the_tool_definitions_count_against_the_history_budget() -> None:
    # GIVEN a conversation with a long history, and two bots on it: one without tools, one with a
    # tool whose definition takes a few hundred tokens
    store = InMemoryConversationStore()
    plain_model, tool_model = RecordingModel(), RecordingModel()
    plain = make_bot(store, plain_model, [])
    with_tool = make_bot(store, tool_model, [WORDY])
    for n in range(30):
        assert (await plain.handle(body=message(f"message number {n} " * 5), headers=HEADERS)).status == 200
    # WHEN each answers the same new message
    for bot in (plain, with_tool):
        assert (await bot.handle(body=message("and now?"), headers=HEADERS)).status == 200
    # THEN the bot with the tool sent less history, so that history and tools fit the budget
    tools_tokens = await with_tool.prompt.tools_tokens()
    assert tools_tokens > 200
    sent_plain = [m for m in plain_model.requests[-1]["messages"] if m["role"] != "system"]
    sent_tool = [m for m in tool_model.requests[-1]["messages"] if m["role"] != "system"]
    assert len(sent_tool) < len(sent_plain)

    def tokens(sent: list[dict[str, Any]]) -> int:
        return sum(count_message_tokens(ChatMessage(role=m["role"], content=m["content"]))
                   for m in sent)

    assert tokens(sent_plain) <= 1200 < tokens(sent_plain) + tools_tokens
    assert tokens(sent_tool) + tools_tokens <= 1200
