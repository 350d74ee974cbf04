"""Card actions: a button pressed on one of our Adaptive Cards, routed to its handler by verb.

    adaptiveCard/action invoke (Action.Execute)        ─┐
    message whose `value` names a verb (Action.Submit) ─┴→ CardAction → the verb's handler → CardReply

`CardActions.read` takes either form apart (the invoke's `value.action` with its `verb` and
`data`; an older client's `Action.Submit` arrives as a message whose `value` is the button's
data, with the verb in it); `handle` calls the handler registered for the verb. A handler answers
with a card that replaces the one pressed (`ShowCard`), a short message (`ShowMessage`), or an
error (`ActionError`). `invoke_response` is the Universal Actions answer to the invoke:

    {"statusCode": 200, "type": "application/vnd.microsoft.card.adaptive", "value": <card>}
    {"statusCode": 200, "type": "application/vnd.microsoft.activity.message", "value": "<text>"}
    {"statusCode": 400, "type": "application/vnd.microsoft.error",
     "value": {"code": "BadRequest", "message": "<why>"}}

with the HTTP status of the invoke response equal to `statusCode`, as the Bot Framework SDKs
answer. An unknown verb, a missing action or an action that is not `Action.Execute` is a 400
error saying so. The action's data is the client's: handlers check it where they use it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .activity import Activity

__all__ = ["CARD_CONTENT_TYPE", "INVOKE_NAME", "ActionError", "CardAction", "CardActions",
           "CardReply", "ShowCard", "ShowMessage", "card_attachment", "invoke_response",
           "submitted_verb"]

log = logging.getLogger(__name__)

INVOKE_NAME = "adaptiveCard/action"
CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
_MESSAGE = "application/vnd.microsoft.activity.message"
_ERROR = "application/vnd.microsoft.error"
#: A verb is ours: short, and made of letters, digits, dots, dashes and underscores.
_MAX_VERB_CHARS = 64


@dataclass(frozen=True, kw_only=True)
class CardAction:
    """One press of a card's button."""

    verb: str
    #: The button's data, as the client sent it (not to be trusted).
    data: dict[str, Any]
    activity: Activity
    #: An older client's `Action.Submit` (a message), not an `Action.Execute` invoke: there is no
    #: invoke to answer, so a reply goes out as a message.
    submitted: bool = False


@dataclass(frozen=True)
class ShowCard:
    """Replace the pressed card with this one."""

    card: dict[str, Any]


@dataclass(frozen=True)
class ShowMessage:
    """Show this short text."""

    text: str


@dataclass(frozen=True, kw_only=True)
class ActionError:
    """The action is refused: `status` (400, 403, 404, 409, 500, 503…), a `code` and a message
    the person may read."""

    status: int
    code: str
    message: str


CardReply = ShowCard | ShowMessage | ActionError
Handler = Callable[[CardAction], Awaitable[CardReply]]


class CardActions:
    """The handlers of our cards' buttons, by verb."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, *verbs: str, handler: Handler) -> None:
        for verb in verbs:
            if verb in self._handlers:
                raise ValueError(f"the card action {verb!r} has a handler already")
            self._handlers[verb] = handler

    def read(self, activity: Activity) -> CardAction | ActionError:
        """The action in an `adaptiveCard/action` invoke or an `Action.Submit` message."""
        value = activity.raw.get("value")
        if activity.type == "message":
            verb = submitted_verb(activity)
            if verb is None:
                return _bad("the message carries no card action")
            assert isinstance(value, dict)
            return CardAction(verb=verb, data={k: v for k, v in value.items() if k != "verb"},
                              activity=activity, submitted=True)
        if not isinstance(value, dict):
            return _bad("the invoke has no value")
        action = value.get("action")
        if not isinstance(action, dict):
            return _bad("the invoke has no action")
        if action.get("type") != "Action.Execute":
            return ActionError(status=400, code="NotSupported",
                               message="only Action.Execute is supported")
        verb = action.get("verb")
        if not isinstance(verb, str) or not verb:
            return _bad("the action has no verb")
        given = action.get("data")
        return CardAction(verb=verb, data=given if isinstance(given, dict) else {}, activity=activity)

    async def handle(self, activity: Activity) -> CardReply:
        """Read the action and answer it with its verb's handler."""
        action = self.read(activity)
        if isinstance(action, ActionError):
            log.info("card action refused: %s", action.message)
            return action
        handler = self._handlers.get(action.verb)
        if handler is None:
            # The verb is the client's text: not logged (it may not be one of ours at all).
            log.warning("card action with an unknown verb; refused")
            return ActionError(status=400, code="NotSupported",
                               message="this card's action is not known to this bot (it may be "
                               "from an older version); nothing was done")
        return await handler(action)


def submitted_verb(activity: Activity) -> str | None:
    """The verb of an older client's `Action.Submit` (a message whose `value` holds the button's
    data with a `verb`), or None for an ordinary message."""
    value = activity.raw.get("value")
    if activity.type != "message" or not isinstance(value, dict):
        return None
    verb = value.get("verb")
    if not isinstance(verb, str) or not verb or len(verb) > _MAX_VERB_CHARS:
        return None
    return verb


def invoke_response(reply: CardReply) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body answering an `adaptiveCard/action` invoke with `reply`."""
    if isinstance(reply, ShowCard):
        return 200, {"statusCode": 200, "type": CARD_CONTENT_TYPE, "value": reply.card}
    if isinstance(reply, ShowMessage):
        return 200, {"statusCode": 200, "type": _MESSAGE, "value": reply.text}
    return reply.status, {"statusCode": reply.status, "type": _ERROR,
                          "value": {"code": reply.code, "message": reply.message}}


def card_attachment(card: dict[str, Any]) -> dict[str, Any]:
    """An Adaptive Card as a message's attachment."""
    return {"contentType": CARD_CONTENT_TYPE, "content": card}


def _bad(message: str) -> ActionError:
    return ActionError(status=400, code="BadRequest", message=message)
