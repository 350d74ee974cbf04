"""`make chat` shows what Teams shows: its local Teams-like channel (the contract-enforcing Bot
Connector stand-in) takes the bot's replies, and the terminal view draws them. The bot runs
in-process behind a small webhook server, against a local model; the chat's channel is driven as
`make chat` drives it (`TerminalChannel.turn` for each line typed), its output read as text.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx2
from aiohttp import web

from devtools.background import BackgroundLoop
from devtools.chat import TerminalChannel
from devtools.fake_model import FakeModelServer, Scripted, tool_call
from devtools.local_server import LocalServer
from devtools.terminal_view import TerminalView
from shared.auth import BotAuthenticator
from shared.bot import ChatBot
from shared.connector import BotConnector
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import load_settings
from shared.store import InMemoryConversationStore
from shared.streaming import StreamClock
from shared.suggestions import CLOSE, OPEN
from shared.tools import Source, ToolOutput, tool

CARD = "application/vnd.microsoft.card.adaptive"


@tool
async def search_docs(query: str) -> ToolOutput:
    """Search the documentation."""
    return ToolOutput(text=f"Streaming is for personal chats ({query}).", sources=(
        Source(title="Stream bot messages", url="https://learn.microsoft.com/streaming",
               snippet="one stream per chat"),))


class Webhook(LocalServer):
    """POST /api/messages answered by an in-process bot, as the Functions host would."""

    def __init__(self, bot: ChatBot) -> None:
        super().__init__()
        self.bot = bot

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/api/messages", self._post)

    async def _post(self, request: web.Request) -> web.Response:
        response = await self.bot.handle(body=await request.read(), headers=dict(request.headers))
        return web.json_response(response.body, status=response.status)


class CardBot(LocalServer):
    """A bot that answers a message with an approval card (issue "Ask before acting"), and an
    `adaptiveCard/action` invoke with the card that replaces it; it keeps what it was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[dict[str, Any]] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/api/messages", self._post)

    async def _post(self, request: web.Request) -> web.Response:
        activity = await request.json()
        self.received.append(activity)
        if activity["type"] == "invoke":
            verb = activity["value"]["action"]["verb"]
            return web.json_response({"statusCode": 200, "type": CARD, "value": {
                "type": "AdaptiveCard", "body": [{"type": "TextBlock", "text": f"{verb}d by you"}]}})
        if activity["type"] != "message":
            return web.json_response(None, status=200)
        card = {"type": "AdaptiveCard", "version": "1.5", "body": [
            {"type": "TextBlock", "text": "May I run wipe_database on demo?"},
            {"type": "FactSet", "facts": [{"title": "table", "value": "orders"}]}],
            "actions": [{"type": "Action.Execute", "title": "Approve", "verb": "approve",
                         "data": {"decision": "d-1"}},
                        {"type": "Action.Execute", "title": "Deny", "verb": "deny",
                         "data": {"decision": "d-1"}}]}
        reply = {"type": "message", "text": "", "attachments": [{"contentType": CARD, "content": card}],
                 "conversation": activity["conversation"], "replyToId": activity["id"]}
        url = f"{activity['serviceUrl']}/v3/conversations/{activity['conversation']['id']}/activities"
        async with aiohttp.ClientSession() as session, session.post(url, json=reply) as sent:
            assert sent.status == 201
        return web.json_response(None, status=200)


@dataclass
class Chat:
    channel: TerminalChannel
    out: io.StringIO
    model: FakeModelServer | None
    server: LocalServer
    #: The IDs the channel gave the bot's activities, in order.
    ids: list[str | None]

    def type(self, line: str) -> str:
        """The user types `line`: what the terminal showed for it."""
        start = len(self.out.getvalue())
        self.channel.turn(line)
        return self.out.getvalue()[start:]


@contextmanager
def chatting(*, clock: StreamClock | None = None, card_bot: bool = False,
             **environment: str) -> Iterator[Chat]:
    """`make chat` against a bot in-process (or the card bot), on a loop of their own."""
    loop = BackgroundLoop()
    model = FakeModelServer(word_interval=0.01)
    loop.run(model.start())
    server: LocalServer

    async def build() -> LocalServer:
        if card_bot:
            return await CardBot().start()
        settings = load_settings({"OPENAI_BASE_URL": model.base_url, "OPENAI_MODEL": "m",
                                  "CHAT_ANSWER_MODE": "inline", **environment})
        bot = ChatBot(settings=settings, store=InMemoryConversationStore(),
                      prompt=ChatPrompt(build_model(settings.model), functions=[search_docs],
                                        suggested_replies=settings.suggested_replies),
                      connector=BotConnector(credential=None),
                      authenticator=BotAuthenticator(settings.bot, http=httpx2.AsyncClient(),
                                                     in_azure=False))
        if clock is not None:
            bot.delivery.clock = clock
        return await Webhook(bot).start()

    server = loop.run(build())
    out = io.StringIO()
    view = TerminalView(out, tty=False)
    try:
        with TerminalChannel.running(endpoint=f"{server.url}/api/messages",
                                     conversation_id=f"a:terminal-{uuid.uuid4().hex[:8]}",
                                     view=view) as channel:
            if clock is not None:
                channel.connector.streams.clock = clock.now
            ids: list[str | None] = []

            def heard(event: str, activity: dict[str, Any], activity_id: str | None) -> None:
                ids.append(activity_id)
                view.heard(event, activity, activity_id)

            channel.connector.on_activity = heard
            yield Chat(channel=channel, out=out, model=None if card_bot else model, server=server,
                       ids=ids)
            assert channel.connector.streams.violations == []
    finally:
        if isinstance(server, Webhook):
            loop.run(server.bot.connector.close())
            loop.run(server.bot.prompt.model.close())
        loop.run(server.stop())
        loop.run(model.stop())
        loop.close()


def test_the_answer_grows_after_thinking_and_suggestions_are_picked_by_number() -> None:
    with chatting() as chat:
        # GIVEN a model that streams an answer ending with two suggested replies
        assert chat.model is not None
        chat.model.word_interval = 0.1
        answer = " ".join(f"word{i}" for i in range(30))
        chat.model.then(Scripted(content=f"{answer}\n{OPEN}\nTell me more\nAnd then?\n{CLOSE}"))
        # WHEN the user types a message
        shown = chat.type("hello")
        # THEN the terminal showed "Thinking…", then the answer, printed as it grew (in several
        # updates, each only what was new), then the suggestions as numbered choices
        assert shown.startswith("bot> Thinking…\nbot> ")
        assert f"bot> {answer}\n" in shown and shown.count("word0") == 1
        assert shown.endswith("  1) Tell me more\n  2) And then?\n")
        updates = [r for r in chat.channel.connector.requests
                   if r["activity"].get("type") == "typing"]
        assert len(updates) >= 3
        # WHEN the user types 2
        chat.model.then(Scripted(content="More."))
        chat.type("2")
        # THEN the suggestion's text went to the bot as the user's message
        assert chat.model.requests[-1]["messages"][-1] == {"role": "user", "content": "And then?"}


def test_citations_show_as_numbered_sources_under_the_answer() -> None:
    with chatting(CHAT_SUGGESTED_REPLIES="off") as chat:
        # GIVEN a model that searches the docs, then answers citing the result
        assert chat.model is not None
        chat.model.then(Scripted(tool_calls=[tool_call("search_docs", {"query": "streams"})]),
                        Scripted(content="Only in personal chats [1].", delay=1.5))
        # WHEN the user asks
        shown = chat.type("where does it stream?")
        # THEN the tool round was said, and the source is listed under the answer, numbered
        assert "bot> Using search_docs…\n" in shown
        assert shown.endswith("bot> Only in personal chats [1].\n"
                              "  [1] Stream bot messages <https://learn.microsoft.com/streaming>\n")


def test_a_long_answer_in_parts_is_shown_once_in_order() -> None:
    # GIVEN a model that streams for 130 s (time scaled as in tests/integration/test_long_answers)
    with chatting(clock=StreamClock(scale=10), CHAT_SUGGESTED_REPLIES="off",
                  CHAT_MODEL_TIMEOUT_SECONDS="120") as chat:
        assert chat.model is not None
        answer = "\n\n".join(" ".join(f"P{p}s{s} goes on." for s in range(5)) for p in range(40))
        chat.model.word_interval = 13 / len(answer.split(" "))
        chat.model.then(Scripted(content=answer))
        # WHEN the user asks
        shown = chat.type("tell me everything")
        # THEN it came in two messages, and the terminal shows every word once, in order
        assert len(chat.channel.connector.streams.of(chat.channel.conversation_id)) == 2
        assert shown.count("bot> ") == 3  # Thinking…, then the two messages
        words = [w for w in shown.split() if w not in ("bot>", "Thinking…")]
        assert words == answer.split()


def test_a_card_is_a_prompt_whose_buttons_send_the_invoke_back() -> None:
    with chatting(card_bot=True) as chat:
        # WHEN the user's message is answered with an approval card
        shown = chat.type("clean up the demo database")
        # THEN the card's text shows, and its buttons as numbered choices
        assert "  │ May I run wipe_database on demo?\n  │ table: orders\n" in shown
        assert shown.endswith("  1) Approve\n  2) Deny\n")
        # WHEN the user types 1
        shown = chat.type("1")
        # THEN the adaptiveCard/action invoke went back, on the card's message, with the
        # button's verb and data, and the card that replaces it is shown
        assert isinstance(chat.server, CardBot)
        invoke = chat.server.received[-1]
        assert invoke["type"] == "invoke" and invoke["name"] == "adaptiveCard/action"
        assert invoke["value"] == {"action": {"type": "Action.Execute", "verb": "approve",
                                              "data": {"decision": "d-1"}}, "trigger": "manual"}
        assert invoke["replyToId"] == chat.ids[-1] and chat.ids[-1] is not None
        assert "bot> (card) approved by you" in shown
