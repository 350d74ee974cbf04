"""The turn: one inbound activity, from request checks to the reply on the channel.

    parse → authenticate → check the message → load the window (dedupe) → prompt → commit → reply

The store loads a window; the prompt gets its messages and returns the turn's; the turn is
committed against that window, in one ETag-guarded transaction. Turns of one conversation in this
worker queue behind an in-process lock, so ETag conflicts only happen between instances. A turn
that loses the race re-loads the window and commits again: with the same messages when the user
has already read the answer as it streamed, or when it was asked again once already; otherwise
it asks the model again with the new window (`MAX_REASKS`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
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
    InputTooLong,
    MessageTooLarge,
    ModelError,
    StoreError,
    TurnTooLarge,
    Unauthorized,
    http_status_for,
)
from .limits import LIMIT_REPLIES, limit_reached, over_limit
from .logs import turn_context
from .messages import ChatMessage, StoredTurn, ToolCall, Usage, utc_day
from .prompt import TURN_LIMIT_REPLY, ChatPrompt, ToolListener, check_input
from .settings import Settings
from .store import ConversationStore, ConversationWindow, Indexed
from .streaming import ReplyStream
from .summary import Summarizer
from .telemetry import span, turn

__all__ = ["BotResponse", "ChatBot"]

log = logging.getLogger(__name__)

WELCOME = ("Hi! I'm a chat bot that remembers our conversation. Ask me anything; "
           "send /reset to make me forget and start over.")
RESET_DONE = "Done: I have forgotten this conversation. Let's start over."
APOLOGY = "Sorry, I couldn't get an answer just now. Please try again in a moment."
#: After losing a race, a turn not yet shown asks the model again this many times at most; then
#: its answer is committed after the turns that won.
MAX_REASKS = 1
TOO_LONG = ("Sorry, that message is too long for me (about {tokens:,} tokens; I can take "
            "{budget:,}). Could you shorten it?")


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
    def __init__(self, *, settings: Settings, store: ConversationStore, prompt: ChatPrompt,
                 connector: BotConnector, authenticator: BotAuthenticator,
                 summarizer: Summarizer | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """`summarizer`: prepares rolling summaries after replies (None: no summaries)."""
        self.settings = settings
        self.store = store
        self.prompt = prompt
        self.connector = connector
        self.authenticator = authenticator
        self._sleep = sleep
        self._locks = _KeyedLocks()
        self._in_flight: set[tuple[str, str]] = set()
        self.summarizer = summarizer
        #: Work started after a reply went out, by activity: `handle` waits for it before it
        #: returns (not with expectReplies, where the response is the delivery).
        self._after_reply: dict[tuple[str, str], asyncio.Task[bool]] = {}
        self._background: set[asyncio.Task[bool]] = set()

    # -- the webhook -----------------------------------------------------------------------

    async def handle(self, *, body: bytes, headers: Mapping[str, str]) -> BotResponse:
        """Answer one POST to /api/messages. Never raises; every failure has a status and reason."""
        try:
            activity = parse_activity(body, headers)
        except BadRequest as exc:
            log.warning("rejected a request: %s", exc)
            return _error(exc, str(exc))
        with turn_context(activity.conversation_id, activity.id), \
                turn(activity.type, activity.conversation_id) as stats:
            response = await self._handle(activity, headers)
            stats.status = response.status
            return response

    async def _handle(self, activity: Activity, headers: Mapping[str, str]) -> BotResponse:
        try:
            with span("chatstate.auth", expected=(Unauthorized,)):
                auth = await self.authenticator.authenticate(headers, activity)
        except Unauthorized as exc:
            log.warning("unauthorized: %s", exc)
            return BotResponse(status=401, body={"error": exc.code})
        except AuthUnavailable as exc:
            log.error("cannot check the token: %s", exc)
            return _error(exc, "try again later", retry_after=5)
        try:
            if activity.type == "message":
                return await self._on_message(activity, auth)
            if activity.type == "conversationUpdate":
                return await self._on_conversation_update(activity, auth)
            if activity.type == "invoke":
                return await self._on_invoke(activity)
            return BotResponse(status=200)
        except StoreError as exc:
            if http_status_for(exc) >= 500:
                log.error("storage failed: %s", exc)
                return _error(exc, "storage is unavailable; nothing was saved", retry_after=2)
            log.warning("storage refused the turn: %s", exc)
            return _error(exc, "storage refused the turn; nothing was saved")
        except ConnectorError as exc:
            log.error("reply not delivered: %s", exc)
            return _error(exc, "the reply could not be delivered; retry to get it")
        except ChatstateError as exc:
            log.warning("turn refused: %s", exc)
            return _error(exc, str(exc))
        except Exception:
            log.exception("unexpected failure")
            return BotResponse(status=500, body={"error": "internal_error",
                                                 "reason": "an unexpected error; the log has the details"})

    async def _on_message(self, activity: Activity, auth: AuthResult) -> BotResponse:
        self._check_reply_path(activity, auth)
        text = activity.message_text
        if not text:
            return BotResponse(status=200)
        key = (activity.conversation_id, activity.id)
        if key in self._in_flight:
            log.info("retry of an activity while it is being answered; acknowledged")
            return BotResponse(status=200)
        self._in_flight.add(key)
        try:
            async with self._locks.hold(activity.conversation_id):
                if text.lower() == "/reset":
                    await self.store.clear(activity.conversation_id)
                    log.info("cleared the conversation on /reset")
                    return await self._reply(activity, activity.reply(RESET_DONE, ai=False))
                response = await self._answer(activity, text)
            if (work := self._after_reply.pop(key, None)) is not None:
                await work  # the reply is out; the next turn of this conversation is not held
            return response
        finally:
            self._in_flight.discard(key)

    async def _on_conversation_update(self, activity: Activity, auth: AuthResult) -> BotResponse:
        bot_id = activity.recipient.get("id")
        if not any(member.get("id") != bot_id for member in activity.members_added()):
            return BotResponse(status=200)
        self._check_reply_path(activity, auth)
        return await self._reply(activity, activity.reply(WELCOME, ai=False))

    def _check_reply_path(self, activity: Activity, auth: AuthResult) -> None:
        if activity.expects_replies:
            return
        if not activity.service_url:
            raise BadRequest("the activity has no serviceUrl to reply to")
        if not auth.service_url_trusted:
            raise BadRequest(auth.service_url_refusal or "the serviceUrl is not trusted for replies")

    # -- one turn ---------------------------------------------------------------------------

    async def _answer(self, activity: Activity, text: str) -> BotResponse:
        limits = self.settings.model
        started = time.perf_counter()
        try:
            needed = check_input(text, token_budget=limits.history_token_budget)
        except (InputTooLong, MessageTooLarge) as exc:
            log.info("message too long to answer: %s", exc)
            tokens = exc.tokens if isinstance(exc, InputTooLong) else len(text) // 3
            return await self._reply(activity, activity.reply(TOO_LONG.format(
                tokens=tokens, budget=limits.history_token_budget), ai=False))
        stream: ReplyStream | None = None
        typing: asyncio.Task[None] | None = None
        # A turn that is kept once asked: the user has read it as it streamed, or it was asked
        # again once already after losing a race (so a busy conversation cannot starve it).
        kept: tuple[ChatMessage, ...] | None = None
        indexing: asyncio.Task[Indexed | None] | None = None
        billed, counted, committed = Usage(), False, False  # every model call the turn paid for
        try:
            for attempt in range(self.settings.turn_max_attempts):
                window = await self.store.load_window(
                    activity.conversation_id, token_budget=limits.history_token_budget - needed,
                    max_messages=limits.history_max_messages, activity_id=activity.id)
                if window.committed_activity:
                    # Found on a re-load after a conflict: another instance just committed it
                    # and delivers it. Found at once: a channel retry, which may need a re-send.
                    turn = await self.store.get_turn(activity.conversation_id, activity.id)
                    return await self._redeliver(activity, turn, send=attempt == 0, stream=stream)
                now = self.store.clock()
                if kept is None and not counted and \
                        (limit := over_limit(window.spend, self.settings.data, now)):
                    limit_reached(limit, window.spend, now)
                    return await self._reply(activity, activity.reply(LIMIT_REPLIES[limit], ai=False),
                                             stream=stream)
                if self.settings.data.max_turns_per_minute is not None and not counted:
                    try:  # the turn takes its place in the minute before the model call
                        window, counted = await self.store.reserve_turn(window), True
                    except ConversationConflict:
                        await self._sleep(random.uniform(0, min(1.0, 0.05 * 2 ** attempt)))
                        continue
                if indexing is None:  # index rows, written while the model works
                    indexing = asyncio.create_task(self.store.write_indexes(
                        window, today=utc_day(now), sender=activity.user, shared=activity.in_group))
                if stream is None and typing is None:
                    stream, typing = self._show_progress(activity)
                messages = kept
                if messages is None:
                    try:
                        result = await self.prompt.send(
                            text, history=window.messages, summary=window.summary,
                            speaker=activity.speaker, sender=activity.user,
                            on_text=stream.on_text if stream else None,
                            on_tools=self._tools_listener(stream))
                    except ModelError as exc:
                        log.warning("model failed (%s): %s", type(exc).__name__, exc)
                        return await self._reply(activity, activity.reply(APOLOGY, ai=False),
                                                 stream=stream)
                    billed += result.usage
                    messages = _as_seen(result.messages, stream)
                    if (stream is not None and stream.shown) or attempt >= MAX_REASKS:
                        kept = messages
                window = replace(window, indexed=await indexing)
                try:
                    turn = await self.store.commit_turn(window, activity_id=activity.id,
                                                        messages=messages, billed=billed,
                                                        counted=counted)
                    committed = True
                except ConversationConflict:
                    log.info("conflict on attempt %d%s", attempt + 1,
                             "; committing the same answer after the turns that won"
                             if kept else "")
                    if attempt + 1 < self.settings.turn_max_attempts:
                        await self._sleep(random.uniform(0, min(1.0, 0.05 * 2 ** attempt)))
                    continue
                except DuplicateActivity as exc:
                    log.info("the activity was committed by another instance")
                    return await self._redeliver(activity, exc.turn, send=False, stream=stream)
                except (TurnTooLarge, MessageTooLarge) as exc:
                    log.warning("turn too large to store: %s", exc)
                    return await self._reply(activity, activity.reply(TURN_LIMIT_REPLY, ai=False),
                                             stream=stream)
                log.info("turn committed attempts=%d rows_read=%d window=%d streamed=%s ms=%.1f",
                         attempt + 1, window.rows_read, len(window.messages),
                         bool(stream and stream.shown), (time.perf_counter() - started) * 1000)
                response = await self._deliver(activity, turn, stream=stream)
                self._start_after_reply(activity, window)
                return response
        finally:
            if not committed:  # paid for, stored nowhere: the tokens still count
                await self._charge(activity, billed)
            if indexing is not None:  # a turn that ends before its commit: the rows stay, harmless
                await asyncio.gather(indexing, return_exceptions=True)
            if typing is not None:
                await asyncio.gather(typing, return_exceptions=True)
            if stream is not None:
                await stream.close()
        log.warning("gave up after %d conflicts", self.settings.turn_max_attempts)
        return BotResponse(status=503, body={"error": "conversation_busy",
                                             "reason": "other turns kept committing first"},
                           headers={"Retry-After": "1"})

    def _show_progress(self, activity: Activity) -> tuple[ReplyStream | None,
                                                          asyncio.Task[None] | None]:
        """A stream with its informative update where the channel streams; else a typing
        indicator (none when the reply is the response)."""
        if self.settings.streaming and activity.can_stream:
            stream = ReplyStream(connector=self.connector, activity=activity)
            stream.inform(self.settings.streaming_informative)
            return stream, None
        if activity.expects_replies:
            return None, None
        return None, asyncio.create_task(self._send_typing(activity))

    @staticmethod
    def _tools_listener(stream: ReplyStream | None) -> ToolListener | None:
        if stream is None:
            return None

        async def using(calls: Sequence[ToolCall]) -> None:
            stream.new_round()
            names = ", ".join(dict.fromkeys(call.name for call in calls))
            stream.inform(f"Using {names}…")

        return using

    # -- feedback ---------------------------------------------------------------------------

    async def _on_invoke(self, activity: Activity) -> BotResponse:
        feedback = activity.feedback()
        if feedback is None:
            return BotResponse(status=200)
        reply_id = str(activity.raw.get("replyToId") or "")
        if not reply_id or not await self.store.rate_reply(activity.conversation_id, reply_id,
                                                           feedback):
            log.info("feedback on a reply we do not know (%r); acknowledged", reply_id[:100])
        else:
            log.info("feedback %s stored for reply %r", feedback.reaction, reply_id[:100])
        return BotResponse(status=200, body={})

    def _start_after_reply(self, activity: Activity, window: ConversationWindow) -> None:
        """Prepare the summary a later turn will need, now that the reply is delivered."""
        if self.summarizer is None or not window.summary_due:
            return
        work = asyncio.create_task(self.summarizer.after_turn(window))
        self._background.add(work)
        work.add_done_callback(self._background.discard)
        if not activity.expects_replies:  # with expectReplies it runs after the response
            self._after_reply[(activity.conversation_id, activity.id)] = work

    # -- replies ----------------------------------------------------------------------------

    async def _deliver(self, activity: Activity, turn: StoredTurn, *,
                       stream: ReplyStream | None = None) -> BotResponse:
        reply = turn.reply
        if reply is not None and reply.stopped:
            await self._mark_delivered(activity, reply_id=None)  # the user saw all there is
            return BotResponse(status=200)
        outgoing = activity.reply(reply.content if reply is not None and reply.content else "",
                                  ai=True, feedback=self.settings.feedback)
        if activity.expects_replies:
            return BotResponse(status=200, body={"activities": [outgoing]})
        reply_id = await self._send(activity, outgoing, stream=stream)
        await self._mark_delivered(activity, reply_id=reply_id)
        return BotResponse(status=200)

    async def _charge(self, activity: Activity, billed: Usage) -> None:
        try:
            await self.store.charge(activity.conversation_id, billed)
        except StoreError as exc:
            log.warning("tokens of a turn that stored nothing not counted: %s", exc)

    async def _mark_delivered(self, activity: Activity, *, reply_id: str | None) -> None:
        try:
            await self.store.mark_delivered(activity.conversation_id, activity.id,
                                            reply_id=reply_id)
        except StoreError as exc:  # the reply went out: a 5xx now would get it sent twice
            log.warning("reply delivered but not recorded: %s", exc)

    async def _redeliver(self, activity: Activity, turn: StoredTurn | None, *,
                         send: bool, stream: ReplyStream | None = None) -> BotResponse:
        """A retry of a committed activity: re-send its stored reply if it never went out.

        `send=False` when another instance committed it a moment ago: that instance delivers.
        """
        if turn is not None and activity.expects_replies:
            return await self._deliver(activity, turn)  # the response is the delivery
        if turn is None or turn.delivered or not send:
            log.info("duplicate activity acknowledged without a model call")
            return BotResponse(status=200)
        log.info("re-sending the stored reply")
        return await self._deliver(activity, turn, stream=stream)

    async def _reply(self, activity: Activity, outgoing: dict[str, Any], *,
                     stream: ReplyStream | None = None) -> BotResponse:
        if activity.expects_replies:
            return BotResponse(status=200, body={"activities": [outgoing]})
        await self._send(activity, outgoing, stream=stream)
        return BotResponse(status=200)

    async def _send(self, activity: Activity, outgoing: dict[str, Any], *,
                    stream: ReplyStream | None) -> str | None:
        """Send `outgoing`: as the end of `stream` when one is open, else as a message."""
        if stream is not None:
            return await stream.finish(outgoing)
        return await self.connector.send(service_url=activity.service_url,
                                         conversation_id=activity.conversation_id,
                                         activity=outgoing)

    async def _send_typing(self, activity: Activity) -> None:
        try:
            await self.connector.send(service_url=activity.service_url,
                                      conversation_id=activity.conversation_id,
                                      activity=activity.typing())
        except ConnectorError as exc:
            log.info("typing indicator not sent: %s", exc)


def _as_seen(messages: tuple[ChatMessage, ...], stream: ReplyStream | None) -> tuple[ChatMessage, ...]:
    """The turn as the user saw it: a reply they stopped ends with what they had read."""
    if stream is None or not stream.canceled or messages[-1].stopped:
        return messages
    return (*messages[:-1], replace(messages[-1], content=stream.shown, stopped=True))


def _error(error: ChatstateError, reason: str, *, retry_after: int | None = None) -> BotResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    return BotResponse(status=http_status_for(error), body={"error": error.code, "reason": reason},
                       headers=headers)
