"""The answer: one accepted message turned into a delivered reply, inline or from the turn queue.

    (ticket → accepted activity) → progress → the turn → the delivery → the summary work

`answer()` runs one message: `/reset`, the input check, the turn (shared/turn.py) with its
progress and delivery (shared/delivery.py), then the summary work, after the reply went out.
`answer_ticket()` is the queue trigger's core, at least once and answered once: a ticket whose
activity is committed and delivered does nothing, one committed but not delivered is re-sent,
otherwise the turn runs. A failure raises, so the host retries after its visibility timeout; on
the last dequeue (host.json `maxDequeueCount`) the user first gets one short apology, and the host
moves the message to the poison queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .activity import Activity, parse_activity
from .attachments import AttachmentReader, Incoming, Refusal
from .delivery import Delivery, Progress
from .errors import (
    BadRequest,
    InputTooLong,
    MessageTooLarge,
    ModelError,
    ModelMisconfigured,
    StoreError,
)
from .inbox import Inbox, TurnTicket
from .logs import turn_context
from .prompt import check_input
from .settings import Settings
from .store import ConversationStore, ConversationWindow
from .streaming import StreamStart
from .summary import Summarizer
from .telemetry import turn
from .turn import Busy, Committed, Found, Refused, TurnRunner

__all__ = ["APOLOGY", "BUSY", "RESET_DONE", "SETUP_PROBLEM", "TOO_LONG", "Answerer", "Unanswered"]

log = logging.getLogger(__name__)

RESET_DONE = "Done: I have forgotten this conversation. Let's start over."
APOLOGY = "Sorry, I couldn't get an answer just now. Please try again in a moment."
SETUP_PROBLEM = ("Sorry, I can't answer: my model is not set up correctly, so trying again will "
                 "not help. The bot's operator will find what to fix in its log.")
BUSY = "Sorry, this conversation is very busy right now. Please send that again in a moment."
TOO_LONG = ("Sorry, that message is too long for me (about {tokens:,} tokens; I can take "
            "{budget:,}). Could you shorten it?")
_HEADERS = {"Content-Type": "application/json"}


class Unanswered(Exception):
    """Other turns kept committing first: nothing was stored or sent (inline: answer 503)."""


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


class Answerer:
    def __init__(self, *, settings: Settings, store: ConversationStore, turns: TurnRunner,
                 delivery: Delivery, summarizer: Summarizer | None = None,
                 inbox: Inbox | None = None) -> None:
        """`summarizer`: prepares rolling summaries after replies (None: no summaries).
        `inbox`: the accepted activities (None: inline answers only)."""
        self.settings = settings
        self.store = store
        self.turns = turns
        self.delivery = delivery
        self.summarizer = summarizer
        self.inbox = inbox
        self._locks = _KeyedLocks()
        self._background: set[asyncio.Task[bool]] = set()
        self.attachments = AttachmentReader(settings=settings, token=delivery.connector.token)

    async def answer(self, activity: Activity, *, resume: StreamStart | None = None,
                     retried: bool = False, apologize: bool = True) -> dict[str, Any] | None:
        """Answer one message; with expectReplies, the reply activity (nothing is sent).

        `apologize`: a model failure ends in the apology (else it is raised, for a retry).
        `retried`: an earlier attempt may have streamed: send only the final message."""
        text = activity.message_text
        async with self._locks.hold(activity.conversation_id):
            if text.lower() == "/reset":
                await self.store.clear(activity.conversation_id)
                log.info("cleared the conversation on /reset")
                return await self._say(activity, RESET_DONE, resume=resume)
            budget = self.settings.model.history_token_budget
            incoming = await self.attachments.read(activity, text, token_budget=budget)
            if isinstance(incoming, Refusal):
                log.info("attachments refused: %s", incoming.reason)
                return await self._say(activity, incoming.reply, resume=resume)
            text = incoming.text
            try:  # the images' tokens as the model's context counts them (shared/tokens.py)
                needed = check_input(text, token_budget=budget) + incoming.image_tokens
            except (InputTooLong, MessageTooLarge) as exc:
                log.info("message too long to answer: %s", exc)
                tokens = exc.tokens if isinstance(exc, InputTooLong) else len(text) // 3
                return await self._say(activity, TOO_LONG.format(tokens=tokens, budget=budget),
                                       resume=resume)
            progress = self.delivery.progress(activity, resume=resume, updates=not retried)
            try:
                outgoing, window = await self._turn(activity, text, needed, progress, apologize,
                                                    incoming)
            finally:
                await progress.close()
        if window is not None:
            await self._after_reply(activity, window)
        return outgoing

    async def _say(self, activity: Activity, text: str, *,
                   resume: StreamStart | None) -> dict[str, Any] | None:
        """A reply of ours without a turn: it ends the stream the webhook opened, if any."""
        if resume is None:
            return await self.delivery.text(activity, text)
        progress = self.delivery.progress(activity, resume=resume, updates=False)
        try:
            return await self.delivery.text(activity, text, progress=progress)
        finally:
            await progress.close()

    async def _turn(self, activity: Activity, text: str, needed: int, progress: Progress,
                    apologize: bool, incoming: Incoming | None = None,
                    ) -> tuple[dict[str, Any] | None, ConversationWindow | None]:
        try:
            result = await self.turns.run(activity, text, needed=needed, stream=progress.stream,
                                          attachments=incoming)
        except ModelError as exc:
            # A setup problem (401/403/404) is told at once: a retry would fail the same way.
            setup = isinstance(exc, ModelMisconfigured)
            log.log(logging.ERROR if setup else logging.WARNING, "model failed (%s): %s",
                    type(exc).__name__, exc)
            if not (apologize or setup):
                raise
            return await self.delivery.text(activity, SETUP_PROBLEM if setup else APOLOGY,
                                             progress=progress), None
        if isinstance(result, Committed):
            return await self.delivery.reply(activity, result.turn, progress=progress,
                                             suggestions=result.suggestions), result.window
        if isinstance(result, Found):
            return await self._redeliver(activity, result, progress), None
        if isinstance(result, Refused):
            return await self.delivery.text(activity, result.text, progress=progress), None
        assert isinstance(result, Busy)
        raise Unanswered(f"other turns kept committing first ({result.attempts} attempts)")

    async def _redeliver(self, activity: Activity, found: Found,
                         progress: Progress) -> dict[str, Any] | None:
        """A retry of a committed activity: re-send its stored reply if it never went out."""
        if found.turn is not None and activity.expects_replies:
            return await self.delivery.reply(activity, found.turn)  # the response is the delivery
        if found.turn is None or found.turn.delivered or not found.send:
            log.info("duplicate activity acknowledged without a model call")
            return None
        log.info("re-sending the stored reply")
        return await self.delivery.reply(activity, found.turn, progress=progress)

    async def _after_reply(self, activity: Activity, window: ConversationWindow) -> None:
        """Prepare the summary a later turn will need, now that the reply is delivered."""
        if self.summarizer is None or not window.summary_due:
            return
        spend = None
        if self.settings.data.count_summary_tokens and self.turns.budgets is not None:
            spend = self.turns.budgets.for_turn(  # the summary's call, in the user's budgets
                activity, max_reply_tokens=self.summarizer.token_budget)
        work = asyncio.create_task(self.summarizer.after_turn(window, spend=spend))
        if not activity.expects_replies:
            await work
            return
        self._background.add(work)  # with expectReplies it runs after the response
        work.add_done_callback(self._background.discard)

    # -- the turn queue ----------------------------------------------------------------------

    async def answer_ticket(self, message: str | bytes, *, dequeue_count: int,
                            max_dequeue_count: int) -> None:
        """Answer the accepted activity a queue message names; raise to have it retried."""
        ticket = TurnTicket.from_json(message)
        last = dequeue_count >= max_dequeue_count
        # Its own span and metrics, as activity type "answer": the webhook's "message" is the accept.
        with turn_context(ticket.conversation_id, ticket.activity_id), \
                turn("answer", ticket.conversation_id) as stats:
            stats.status = 500  # until answered
            log.info("picked up after %.0f ms (dequeue %d of %d)",
                     (time.time() - ticket.enqueued_at) * 1000, dequeue_count, max_dequeue_count)
            assert self.inbox is not None, "the turn queue needs an inbox"
            body = await self.inbox.load(ticket.conversation_id, ticket.activity_id)
            if body is None:
                log.info("nothing kept for this activity: answered already; nothing to do")
                stats.status = 200
                return
            activity = parse_activity(body, _HEADERS)
            try:
                await self.answer(activity, resume=ticket.stream, retried=dequeue_count > 1,
                                  apologize=False)
            except Exception as exc:
                if not last:
                    log.warning("the turn failed on dequeue %d of %d; the queue retries it: %s",
                                dequeue_count, max_dequeue_count, _reason(exc))
                    raise
                log.error("the turn failed on its last dequeue (%d); apologising; the message "
                          "goes to the poison queue: %s", dequeue_count, _reason(exc))
                await self._apologize(activity, ticket)
                raise
            stats.status = 200
            try:
                await self.inbox.remove(ticket.conversation_id, ticket.activity_id)
            except StoreError as exc:  # answered: a retry now would only find it done
                log.warning("answered, but its kept copy not removed (retention will): %s", exc)

    async def _apologize(self, activity: Activity, ticket: TurnTicket) -> None:
        try:
            await self._say(activity, APOLOGY, resume=ticket.stream)
        except Exception as exc:
            log.error("the apology was not sent either: %s", _reason(exc))


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, BadRequest) else str(exc)
