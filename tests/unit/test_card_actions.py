"""Card actions through the webhook: an `adaptiveCard/action` invoke, or an older client's
`Action.Submit` message, reaches the handler of its verb; an unknown verb or a malformed action
gets a clear Universal Actions error (in-memory store, no model call)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx2
import pytest

from shared.auth import BotAuthenticator
from shared.bot import ChatBot
from shared.card_actions import ActionError, CardAction, CardReply, ShowCard, ShowMessage
from shared.connector import BotConnector
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import load_settings
from shared.store import InMemoryConversationStore

HEADERS = {"Content-Type": "application/json"}


def no_model(request: httpx2.Request) -> httpx2.Response:
    raise AssertionError("a card action never calls the model")


def make_bot() -> ChatBot:
    settings = load_settings({"OPENAI_API_KEY": "sk-test"})
    model = build_model(settings.model,
                        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(no_model)))
    return ChatBot(settings=settings, store=InMemoryConversationStore(), prompt=ChatPrompt(model),
                   connector=BotConnector(credential=None),
                   authenticator=BotAuthenticator(settings.bot, http=httpx2.AsyncClient(),
                                                  in_azure=False),
                   sleep=lambda _: asyncio.sleep(0))


def invoke(value: Any, *, name: str = "adaptiveCard/action") -> bytes:
    return json.dumps({"type": "invoke", "name": name, "id": "inv-1", "value": value,
                       "channelId": "msteams", "conversation": {"id": "c-cards"},
                       "from": {"id": "user-1", "name": "Ada"}, "recipient": {"id": "bot"}}).encode()


def execute(verb: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"action": {"type": "Action.Execute", "verb": verb, "data": data or {}},
            "trigger": "manual"}


async def test_an_unknown_verb_gets_a_clear_invoke_error() -> None:
    # GIVEN a bot with no handler for "launch.missiles"
    bot = make_bot()
    # WHEN a card's button with that verb is pressed
    response = await bot.handle(body=invoke(execute("launch.missiles")), headers=HEADERS)
    # THEN the invoke is answered 400 with a Universal Actions error saying so
    assert response.status == 400
    assert response.body is not None
    assert response.body["statusCode"] == 400
    assert response.body["type"] == "application/vnd.microsoft.error"
    assert response.body["value"]["code"] == "NotSupported"
    assert "not known to this bot" in response.body["value"]["message"]


@pytest.mark.parametrize(("value", "code", "reason"), [
    (None, "BadRequest", "no value"),
    ({"trigger": "manual"}, "BadRequest", "no action"),
    ({"action": {"type": "Action.Submit", "verb": "x"}}, "NotSupported", "only Action.Execute"),
    ({"action": {"type": "Action.Execute"}}, "BadRequest", "no verb"),
])
async def test_a_malformed_action_is_refused_saying_why(value: Any, code: str, reason: str) -> None:
    # GIVEN a bot WHEN an adaptiveCard/action invoke lacks what an action needs
    response = await make_bot().handle(body=invoke(value), headers=HEADERS)
    # THEN it is answered 400 with the reason
    assert response.status == 400 and response.body is not None
    assert response.body["value"]["code"] == code and reason in response.body["value"]["message"]


async def test_a_known_verb_reaches_its_handler_with_the_data_and_its_answer_is_the_response() -> None:
    # GIVEN a handler for two verbs that answers with a card naming what it got
    bot = make_bot()
    seen: list[CardAction] = []

    async def handler(action: CardAction) -> CardReply:
        seen.append(action)
        return ShowCard({"type": "AdaptiveCard", "version": "1.4",
                         "body": [{"type": "TextBlock", "text": f"done: {action.verb}"}]})

    bot.card_actions.register("demo.yes", "demo.no", handler=handler)
    # WHEN the "demo.no" button is pressed
    response = await bot.handle(body=invoke(execute("demo.no", {"id": "42"})), headers=HEADERS)
    # THEN the handler got the verb, the data and who pressed it; its card is the response
    (action,) = seen
    assert (action.verb, action.data, action.activity.sender["id"], action.submitted) == \
        ("demo.no", {"id": "42"}, "user-1", False)
    assert response.status == 200 and response.body == {
        "statusCode": 200, "type": "application/vnd.microsoft.card.adaptive",
        "value": {"type": "AdaptiveCard", "version": "1.4",
                  "body": [{"type": "TextBlock", "text": "done: demo.no"}]}}
    # AND a second registration of a verb is refused
    with pytest.raises(ValueError, match="has a handler already"):
        bot.card_actions.register("demo.yes", handler=handler)


async def test_an_older_clients_submit_reaches_the_same_handler_and_is_answered_by_message() -> None:
    # GIVEN a handler that answers with a message, or refuses
    bot = make_bot()
    seen: list[CardAction] = []

    async def handler(action: CardAction) -> CardReply:
        seen.append(action)
        if action.data.get("id") == "bad":
            return ActionError(status=409, code="Conflict", message="already decided")
        return ShowMessage("thanks")

    bot.card_actions.register("demo.yes", handler=handler)

    def submit(data: dict[str, Any]) -> bytes:
        return json.dumps({"type": "message", "id": "m-1", "text": "", "value": data,
                           "channelId": "msteams", "conversation": {"id": "c-cards"},
                           "deliveryMode": "expectReplies", "from": {"id": "user-1"},
                           "recipient": {"id": "bot"}}).encode()

    # WHEN an Action.Submit message carries the verb in its value, then a refused one
    answered = await bot.handle(body=submit({"verb": "demo.yes", "id": "42"}), headers=HEADERS)
    refused = await bot.handle(body=submit({"verb": "demo.yes", "id": "bad"}), headers=HEADERS)
    unknown = await bot.handle(body=submit({"verb": "demo.maybe"}), headers=HEADERS)
    # THEN the handler got the data without the verb, as a submitted action
    assert [(a.verb, a.data, a.submitted) for a in seen] == [
        ("demo.yes", {"id": "42"}, True), ("demo.yes", {"id": "bad"}, True)]
    # AND each answer went back as a message (no model call, nothing stored)
    texts = [r.body["activities"][0]["text"] for r in (answered, refused, unknown) if r.body]
    assert texts[:2] == ["thanks", "already decided"] and "not known to this bot" in texts[2]
    assert await bot.store.list_messages("c-cards") == []


async def test_feedback_invokes_still_reach_feedback() -> None:
    # GIVEN a bot WHEN a Teams feedback invoke arrives (message/submitAction, not a card action)
    response = await make_bot().handle(body=invoke(
        {"actionName": "feedback", "actionValue": {"reaction": "like", "feedback": "{}"}},
        name="message/submitAction"), headers=HEADERS)
    # THEN it is acknowledged as before
    assert response.status == 200 and response.body == {}
