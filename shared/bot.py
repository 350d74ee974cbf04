"""The turn: one inbound activity, from request checks to the reply on the channel.

    parse → authenticate → (message) dedupe + load window → prompt → commit (ETag) → reply

Turns of one conversation in this worker queue behind an in-process lock, so ETag conflicts only
happen between instances; a conflict re-loads and re-runs the prompt, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from .activity import Activity, parse_activity
from .auth import AuthResult, BotAuthenticator
from .connector import BotConnector
from .errors import (
    AuthUnavailable,
    BadRequest,
    ChatstateError,
    ConnectorError,
    ConversationConflict,
    DuplicateActivity,
    MessageTooLarge,
    ModelError,
    StoreError,
    TurnTooLarge,
    Unauthorized,
    http_status_for,
)
from .messages import ChatMessage, StoredTurn
from .model import ChatModel
from .prompt import TURN_LIMIT_REPLY, ChatPrompt, ConversationMemory
from .settings import Settings
from .store import MAX_MESSAGE_CHARS, ConversationStore
from .tokens import count_message_tokens
from .tools import Function

__all__ = ["AI_GENERATED", "BotResponse", "ChatBot"]

log = logging.getLogger(__name__)

AI_GENERATED = {"type": "https://schema.org/Message", "@type": "Message",
                "@context": "https://schema.org", "@id": "", "additionalType": ["AIGeneratedContent"]}
WELCOME = ("Hi! I'm a chat bot that remembers our conversation. Ask me anything; "
           "send /reset to make me forget and start over.")
RESET_DONE = "Done: I have forgotten this conversation. Let's start over."
APOLOGY = "Sorry, I couldn't get an answer just now. Please try again in a moment."
TOO_LONG = ("Sorry, that message is too long for me (about {tokens:,} tokens; I can take "
            "{budget:,}). Could you shorten it?")
_MENTION = re.compile(r"<at[^>]*>.*?</at>", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True, kw_only=True)
class BotResponse:
    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class _KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._entries.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._entries[key]


class ChatBot:
    def __init__(self, *, settings: Settings, store: ConversationStore, model: ChatModel,
                 connector: BotConnector, authenticator: BotAuthenticator,
                 functions: Sequence[Function] = (),
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.settings = settings
        self.store = store
        self.model = model
        self.connector = connector
        self.authenticator = authenticator
        self.functions = list(functions)
        self._sleep = sleep
        self._locks = _KeyedLocks()
        self._in_flight: set[tuple[str, str]] = set()

    # -- the webhook -----------------------------------------------------------------------

    async def handle(self, *, body: bytes, headers: Mapping[str, str]) -> BotResponse:
        """Answer one POST to /api/messages. Never raises; every failure has a status and reason."""
        try:
            activity = parse_activity(body, headers)
        except BadRequest as exc:
            log.warning("rejected a request: %s", exc)
            return _error(exc, str(exc))
        ids = f"conversation={activity.conversation_id!r} activity={activity.id!r}"
        try:
            auth = await self.authenticator.authenticate(headers, activity)
        except Unauthorized as exc:
            log.warning("unauthorized %s: %s", ids, exc)
            return BotResponse(status=401, body={"error": exc.code})
        except AuthUnavailable as exc:
            log.error("cannot check the token %s: %s", ids, exc)
            return _error(exc, "try again later", retry_after=5)
        try:
            if activity.type == "message":
                return await self._on_message(activity, auth)
            if activity.type == "conversationUpdate":
                return await self._on_conversation_update(activity, auth)
            return BotResponse(status=200)
        except StoreError as exc:
            log.error("storage failed %s: %s", ids, exc)
            return _error(exc, "storage is unavailable; nothing was saved", retry_after=2)
        except ConnectorError as exc:
            log.error("reply not delivered %s: %s", ids, exc)
            return _error(exc, "the reply could not be delivered; retry to get it")
        except ChatstateError as exc:
            log.warning("turn refused %s: %s", ids, exc)
            return _error(exc, str(exc))
        except Exception:
            log.exception("unexpected failure %s", ids)
            return BotResponse(status=500, body={"error": "internal_error",
                                                 "reason": "an unexpected error; the log has the details"})

    async def _on_message(self, activity: Activity, auth: AuthResult) -> BotResponse:
        self._check_reply_path(activity, auth)
        text = activity.message_text
        if not text:
            return BotResponse(status=200)
        key = (activity.conversation_id, activity.id)
        if key in self._in_flight:
            log.info("retry of activity %r while it is being answered; acknowledged", activity.id)
            return BotResponse(status=200)
        self._in_flight.add(key)
        try:
            async with self._locks.hold(activity.conversation_id):
                if text.lower() == "/reset":
                    await self.store.clear(activity.conversation_id)
                    log.info("cleared conversation=%r on /reset", activity.conversation_id)
                    return await self._reply(activity, RESET_DONE, ai=False)
                return await self._answer(activity, text)
        finally:
            self._in_flight.discard(key)

    async def _on_conversation_update(self, activity: Activity, auth: AuthResult) -> BotResponse:
        bot_id = activity.recipient.get("id")
        if not any(member.get("id") != bot_id for member in activity.members_added()):
            return BotResponse(status=200)
        self._check_reply_path(activity, auth)
        return await self._reply(activity, WELCOME, ai=False)

    def _check_reply_path(self, activity: Activity, auth: AuthResult) -> None:
        if activity.expects_replies:
            return
        if not activity.service_url:
            raise BadRequest("the activity has no serviceUrl to reply to")
        if not auth.service_url_trusted:
            raise BadRequest(auth.service_url_refusal or "the serviceUrl is not trusted for replies")

    # -- one turn ---------------------------------------------------------------------------

    async def _answer(self, activity: Activity, text: str) -> BotResponse:
        model_settings = self.settings.model
        started = time.perf_counter()
        needed = count_message_tokens(ChatMessage(role="user", content=text))
        if len(text) > MAX_MESSAGE_CHARS or needed > model_settings.history_token_budget:
            log.info("message too long conversation=%r activity=%r tokens=%d",
                     activity.conversation_id, activity.id, needed)
            return await self._reply(activity, TOO_LONG.format(
                tokens=needed, budget=model_settings.history_token_budget), ai=False)
        typing: asyncio.Task[None] | None = None
        try:
            for attempt in range(self.settings.turn_max_attempts):
                memory = ConversationMemory(
                    self.store, activity.conversation_id,
                    token_budget=model_settings.history_token_budget,
                    max_messages=model_settings.history_max_messages, activity_id=activity.id)
                window = await memory.load(reserve_tokens=needed)
                if window.committed_activity:
                    # Found on a re-load after a conflict: another instance just committed it
                    # and delivers it. Found at once: a channel retry, which may need a re-send.
                    return await self._redeliver(activity, send=attempt == 0)
                if typing is None and not activity.expects_replies:
                    typing = asyncio.create_task(self._send_typing(activity))
                try:
                    result = await self._prompt(memory).send(input=text)
                except ModelError as exc:
                    log.warning("model failed conversation=%r activity=%r cause=%s: %s",
                                activity.conversation_id, activity.id, type(exc).__name__, exc)
                    return await self._reply(activity, APOLOGY, ai=False)
                try:
                    turn = await memory.commit(result, activity_id=activity.id)
                except ConversationConflict:
                    log.info("conflict conversation=%r activity=%r attempt=%d",
                             activity.conversation_id, activity.id, attempt + 1)
                    if attempt + 1 < self.settings.turn_max_attempts:
                        await self._sleep(random.uniform(0, min(1.0, 0.05 * 2 ** attempt)))
                    continue
                except DuplicateActivity:
                    log.info("activity %r was committed by another instance", activity.id)
                    return await self._redeliver(activity, send=False)
                except (TurnTooLarge, MessageTooLarge) as exc:
                    log.warning("turn too large to store conversation=%r activity=%r: %s",
                                activity.conversation_id, activity.id, exc)
                    return await self._reply(activity, TURN_LIMIT_REPLY, ai=False)
                log.info("turn committed conversation=%r activity=%r attempts=%d rows_read=%d "
                         "window=%d model=%s tokens=%d ms=%.1f", activity.conversation_id,
                         activity.id, attempt + 1, window.rows_read, len(window.messages),
                         result.model, result.usage.total_tokens,
                         (time.perf_counter() - started) * 1000)
                return await self._deliver(activity, turn)
        finally:
            if typing is not None:
                await asyncio.gather(typing, return_exceptions=True)
        log.warning("gave up conversation=%r activity=%r after %d conflicts",
                    activity.conversation_id, activity.id, self.settings.turn_max_attempts)
        return BotResponse(status=503, body={"error": "conversation_busy",
                                             "reason": "other turns kept committing first"},
                           headers={"Retry-After": "1"})

    def _prompt(self, memory: ConversationMemory) -> ChatPrompt:
        model_settings = self.settings.model
        return ChatPrompt(self.model, memory=memory, functions=self.functions,
                          instructions=model_settings.instructions,
                          max_tool_rounds=model_settings.max_tool_rounds,
                          tool_timeout_seconds=model_settings.tool_timeout_seconds,
                          timeout_seconds=model_settings.timeout_seconds)

    # -- replies ----------------------------------------------------------------------------

    async def _deliver(self, activity: Activity, turn: StoredTurn) -> BotResponse:
        reply = turn.reply
        text = reply.content if reply is not None and reply.content else ""
        response = await self._reply(activity, text, ai=True)
        if not activity.expects_replies:
            try:
                await self.store.mark_delivered(activity.conversation_id, activity.id)
            except StoreError as exc:  # the reply went out: a 5xx now would get it sent twice
                log.warning("reply delivered but not recorded conversation=%r activity=%r: %s",
                            activity.conversation_id, activity.id, exc)
        return response

    async def _redeliver(self, activity: Activity, *, send: bool = True) -> BotResponse:
        """A retry of a committed activity: re-send its stored reply if it never went out.

        `send=False` when another instance committed it a moment ago: that instance delivers.
        """
        turn = await self.store.get_turn(activity.conversation_id, activity.id)
        if turn is not None and activity.expects_replies:
            return await self._deliver(activity, turn)  # the response is the delivery
        if turn is None or turn.delivered or not send:
            log.info("duplicate activity %r acknowledged without a model call", activity.id)
            return BotResponse(status=200)
        log.info("re-sending the stored reply of activity %r", activity.id)
        return await self._deliver(activity, turn)

    async def _reply(self, activity: Activity, text: str, *, ai: bool) -> BotResponse:
        outgoing = reply_activity(activity, text, ai=ai)
        if activity.expects_replies:
            return BotResponse(status=200, body={"activities": [outgoing]})
        await self.connector.send(service_url=activity.service_url,
                                  conversation_id=activity.conversation_id, activity=outgoing)
        return BotResponse(status=200)

    async def _send_typing(self, activity: Activity) -> None:
        typing = {"type": "typing", "from": activity.recipient, "recipient": activity.sender,
                  "conversation": {"id": activity.conversation_id}, "replyToId": activity.id}
        try:
            await self.connector.send(service_url=activity.service_url,
                                      conversation_id=activity.conversation_id, activity=typing)
        except ConnectorError as exc:
            log.info("typing indicator not sent for activity %r: %s", activity.id, exc)

    # -- operator endpoints -----------------------------------------------------------------

    async def history(self, conversation_id: str) -> list[dict[str, Any]]:
        messages = await self.store.list_messages(conversation_id)
        return [{"role": m.role, "content": m.content, "activityId": m.activity_id,
                 "timestamp": m.timestamp.isoformat(), **_extras(m)} for m in messages]


def reply_activity(activity: Activity, text: str, *, ai: bool) -> dict[str, Any]:
    outgoing: dict[str, Any] = {
        "type": "message",
        "text": text,
        "replyToId": activity.id,
        "conversation": {"id": activity.conversation_id},
        "from": activity.recipient,
        "recipient": activity.sender,
        "channelId": activity.channel_id,
    }
    if activity.raw.get("locale"):
        outgoing["locale"] = activity.raw["locale"]
    if ai:
        outgoing["entities"] = [dict(AI_GENERATED)]
    return outgoing


def _extras(message: ChatMessage) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    if message.tool_calls:
        extras["toolCalls"] = [call.to_openai() for call in message.tool_calls]
    if message.tool_call_id:
        extras["toolCallId"] = message.tool_call_id
    if message.model:
        extras["model"] = message.model
    if message.usage:
        extras["usage"] = {"promptTokens": message.usage.prompt_tokens,
                           "completionTokens": message.usage.completion_tokens}
    return extras


def _error(error: ChatstateError, reason: str, *, retry_after: int | None = None) -> BotResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    return BotResponse(status=http_status_for(error), body={"error": error.code, "reason": reason},
                       headers=headers)
