"""The webhook: one POST to /api/messages, from request checks to a quick answer.

    parse → authenticate → dispatch: invoke (feedback; a card's button, `shared/card_actions.py`),
    conversationUpdate (welcome) and expectReplies are answered inline, their contract being the
    response; a message is accepted (kept in the inbox with its place in the conversation's order,
    its informative update sent when nothing else is being answered there, a wake-up queued) and
    answered 200 at once; an older client's card button (`Action.Submit`, a message with the
    button's verb in its `value`) goes to the card's handler, as the invoke does

The answer itself (the conversation's order, the turn and its delivery) is shared/order.py and
shared/answer.py, run by the queue trigger; with `CHAT_ANSWER_MODE=inline` (hosts without a queue)
the webhook runs it before it responds. A retry of an activity already accepted is acknowledged
(the inbox's conditional create) with a fresh wake-up queued (its first delivery may have been
kept but not queued), and one already answered is acknowledged and dropped (its turn committed
and delivered); one committed but not delivered is kept without a stream, and the answer re-sends
it. Teams allows one stream per chat: the webhook opens one ("Thinking…") only for a message that
goes first (the conversation idle, its last stream request a second ago or more: decided with its
place in the inbox, so of two messages racing on an idle chat one does), after its wake-up is
queued; a message that waits behind another gets its stream when its turn starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .activity import Activity, parse_activity
from .answer import APOLOGY, RESET_DONE, TOO_LONG, Answerer, Unanswered
from .approval_answers import VERBS as APPROVAL_VERBS
from .approval_answers import ApprovalAnswers
from .approval_card import parse_answer
from .approvals import Approvals
from .attachments import has_attachments
from .auth import AuthResult, BotAuthenticator, reply_policy
from .budgets import Budgets
from .card_actions import (
    INVOKE_NAME,
    CardActions,
    ShowCard,
    ShowMessage,
    card_attachment,
    invoke_response,
    submitted_verb,
)
from .connector import BotConnector
from .delivery import Delivery
from .errors import (
    AuthUnavailable,
    BadRequest,
    ChatstateError,
    ConnectorError,
    StoreError,
    Unauthorized,
    http_status_for,
)
from .inbox import Inbox, TurnTicket
from .logs import turn_context
from .prompt import ChatPrompt
from .settings import AnswerMode, Settings
from .signins import SignIns
from .store import ConversationStore
from .summary import Summarizer
from .telemetry import span, turn
from .tools import Function
from .turn import MAX_REASKS, TurnRunner

if TYPE_CHECKING:
    from .signin import SignIn
    from .user_tokens import UserTokens

__all__ = ["APOLOGY", "MAX_REASKS", "RESET_DONE", "TOO_LONG", "WELCOME", "BotResponse", "ChatBot"]

log = logging.getLogger(__name__)

#: Tries to keep the start of a stream the webhook opened (the answer waits for it).
STREAM_RECORD_ATTEMPTS = 4

WELCOME = ("Hi! I'm a chat bot that remembers our conversation. Ask me anything; "
           "send /reset to make me forget and start over.")


@dataclass(frozen=True, kw_only=True)
class BotResponse:
    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class ChatBot:
    def __init__(self, *, settings: Settings, store: ConversationStore, prompt: ChatPrompt,
                 connector: BotConnector, authenticator: BotAuthenticator,
                 summarizer: Summarizer | None = None, inbox: Inbox | None = None,
                 clock: Callable[[], datetime] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 max_attempts: int = 5, retry_seconds: float = 5.0,
                 budgets: Budgets | None = None,
                 signin: SignIn | None = None, users: UserTokens | None = None) -> None:
        """`inbox`: the accepted activities and the turn queue (without one, answers are inline).
        `clock`, `sleep`: the turn's time (None: the store's) and its backoff (test seams).
        `max_attempts`, `retry_seconds`: a failing queued turn's tries and their spacing.
        `budgets`: the users' and tenants' (None: built from the settings, on a store that keeps
        them). `signin`, `users`: signing users in, and their tokens for tools (None: no tool acts
        as the user)."""
        self.settings = settings
        self.store = store
        self.prompt = prompt
        self.connector = connector
        self.authenticator = authenticator
        self.inbox = inbox
        self.signin = signin
        self.delivery = Delivery(settings=settings, store=store, connector=connector)
        self.budgets = budgets or Budgets.build(settings, store, clock)
        self.answerer = Answerer(
            settings=settings, store=store, delivery=self.delivery, summarizer=summarizer,
            inbox=inbox, turns=TurnRunner(settings=settings, store=store, prompt=prompt,
                                          clock=clock, sleep=sleep, budgets=self.budgets,
                                          users=users),
            reply_allowed=reply_policy(settings.bot), max_attempts=max_attempts,
            retry_seconds=retry_seconds)
        self._in_flight: set[tuple[str, str]] = set()
        self._queued = settings.answer_mode is AnswerMode.QUEUE and inbox is not None
        #: The handlers of our cards' buttons, by verb.
        self.card_actions = CardActions()
        #: Answers to approval cards (the turn queue only: only it can wait for a person).
        self.approval_answers: ApprovalAnswers | None = None
        if self._queued and inbox is not None:
            self.approval_answers = ApprovalAnswers(inbox=inbox)
            self.card_actions.register(*APPROVAL_VERBS, handler=self.approval_answers.on_card)
            self.answerer.add_waiter(Approvals(
                settings=settings, store=store, inbox=inbox, connector=connector,
                tools=self._tools, run_resumed=self.answerer.answer_resumed))
            if signin is not None:  # turns that wait for their user to sign in
                self.answerer.add_waiter(SignIns(
                    settings=settings, store=store, inbox=inbox, signin=signin,
                    tools=self._tools, run_resumed=self.answerer.answer_resumed))

    async def _tools(self) -> dict[str, Function]:
        return (await self.prompt.current_tools())[0]

    async def handle(self, *, body: bytes, headers: Mapping[str, str]) -> BotResponse:
        """Answer one POST to /api/messages. Never raises; every failure has a status and reason."""
        try:
            activity = parse_activity(body, headers)
        except BadRequest as exc:
            log.warning("rejected a request: %s", exc)
            return _error(exc, str(exc))
        with turn_context(activity.conversation_id, activity.id), \
                turn(activity.type, activity.conversation_id) as stats:
            response = await self._handle(activity, body, headers)
            stats.status = response.status
            return response

    async def _handle(self, activity: Activity, body: bytes,
                      headers: Mapping[str, str]) -> BotResponse:
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
                return await self._on_message(activity, auth, body)
            if activity.type == "conversationUpdate":
                return await self._on_conversation_update(activity, auth)
            if activity.type == "invoke" or (self.signin is not None and self.signin.handles(activity)):
                return await self._on_invoke(activity, auth)
            return BotResponse(status=200)
        except Unanswered as exc:
            log.warning("gave up: %s", exc)
            return BotResponse(status=503, body={"error": "conversation_busy",
                                                 "reason": "other turns kept committing first"},
                               headers={"Retry-After": "1"})
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

    async def _on_message(self, activity: Activity, auth: AuthResult, body: bytes) -> BotResponse:
        self._check_reply_path(activity, auth)
        if submitted_verb(activity) is not None and not activity.message_text:
            return await self._on_card_submit(activity)
        if not activity.message_text and not has_attachments(activity):
            return BotResponse(status=200)
        if self.signin is not None and (said := await self.signin.on_message(activity)):
            outgoing = await self.delivery.text(activity, said)  # /signout, a magic code
            return BotResponse(status=200, body={"activities": [outgoing]} if outgoing else None)
        if self._queued and not activity.expects_replies:
            if self.approval_answers is not None and parse_answer(activity.message_text):
                answered = await self.approval_answers.on_text(activity)
                if answered is not None:  # an answer to a waiting request, not a message
                    # Plain: the reply may name the person (their display name is theirs).
                    await self.delivery.send(activity, {**activity.reply(answered, ai=False),
                                                        "textFormat": "plain"})
                    return BotResponse(status=200)
            return await self._accept(activity, body)
        key = (activity.conversation_id, activity.id)
        if key in self._in_flight:
            log.info("retry of an activity while it is being answered; acknowledged")
            return BotResponse(status=200)
        self._in_flight.add(key)
        try:
            outgoing = await self.answerer.answer(activity)
        finally:
            self._in_flight.discard(key)
        return BotResponse(status=200, body={"activities": [outgoing]} if outgoing else None)

    async def _accept(self, activity: Activity, body: bytes) -> BotResponse:
        """Keep the message in its conversation's order, queue a wake-up, and show that it is
        being answered if it goes first; 200 at once."""
        assert self.inbox is not None
        # The head alone, not the activity's row: a kept activity waits (the head is not idle),
        # so a retry of one opens no stream, and `accept`'s create of its row refuses it.
        head, committed = await asyncio.gather(
            self.inbox.read_head(activity.conversation_id),
            self.store.get_turn(activity.conversation_id, activity.id))
        if committed is not None and committed.delivered:
            log.info("retry of an activity already answered; acknowledged")
            return BotResponse(status=200)
        sender = activity.user
        # A turn committed but not delivered is re-sent by the answer, with no stream to open.
        place = await self.inbox.accept(
            body, conversation_id=activity.conversation_id, activity_id=activity.id,
            sender=sender.id or "", aad=sender.aad_id or "",
            reset=activity.message_text.lower() == "/reset",
            may_stream=committed is None and self.delivery.streams(activity), head=head)
        if place is None:
            # Its first delivery may have been kept but not queued (and answered 503): wake the
            # conversation again (a wake-up that finds it answered, or held, costs nothing).
            await self.inbox.enqueue(TurnTicket(conversation_id=activity.conversation_id,
                                                activity_id=activity.id,
                                                enqueued_at=time.time(), kind="wake"))
            log.info("retry of an activity already accepted; acknowledged, its wake-up queued")
            return BotResponse(status=200)
        ticket = TurnTicket(conversation_id=activity.conversation_id, activity_id=activity.id,
                            enqueued_at=time.time())
        try:
            await self.inbox.enqueue(ticket)
        except StoreError:
            try:  # let the channel's retry accept it again
                await self.inbox.remove(activity.conversation_id, [activity.id], unseen=True)
            except StoreError as exc:
                log.error("not queued, and its kept copy not removed: %s", exc)
            raise
        if place.opens_stream:
            await self._open_stream(activity)
        log.info("accepted as number %d of the conversation and queued", place.seq)
        return BotResponse(status=200)

    async def _open_stream(self, activity: Activity) -> None:
        """The message went first: its stream starts now ("Thinking…"), and is kept with it for
        the answer, which waits for it (a few tries: a stream nobody records is left open)."""
        assert self.inbox is not None
        stream = await self.delivery.open_stream(activity)
        for attempt in range(STREAM_RECORD_ATTEMPTS):
            try:
                await self.inbox.keep_stream(activity.conversation_id, activity.id, stream)
                return
            except StoreError as exc:
                if attempt + 1 == STREAM_RECORD_ATTEMPTS:
                    log.error("the stream's start was not kept; the answer goes without it: %s",
                              exc)
                    return
                await asyncio.sleep(0.05 * 2 ** attempt)

    async def _on_conversation_update(self, activity: Activity, auth: AuthResult) -> BotResponse:
        bot_id = activity.recipient.get("id")
        if not any(member.get("id") != bot_id for member in activity.members_added()) or \
                not self.settings.welcomes(activity.channel_id):
            return BotResponse(status=200)
        self._check_reply_path(activity, auth)
        outgoing = await self.delivery.text(activity, WELCOME)
        return BotResponse(status=200, body={"activities": [outgoing]} if outgoing else None)

    def _check_reply_path(self, activity: Activity, auth: AuthResult) -> None:
        if activity.expects_replies:
            return
        if not activity.service_url:
            raise BadRequest("the activity has no serviceUrl to reply to")
        if not auth.service_url_trusted:
            raise BadRequest(auth.service_url_refusal or "the serviceUrl is not trusted for replies")

    async def _on_card_submit(self, activity: Activity) -> BotResponse:
        """An older client's card button: the handler's answer goes back as a message."""
        reply = await self.card_actions.handle(activity)
        if isinstance(reply, ShowCard):
            outgoing = {**activity.reply("", ai=False), "attachments": [card_attachment(reply.card)]}
        else:
            outgoing = activity.reply(reply.text if isinstance(reply, ShowMessage) else
                                      reply.message, ai=False)
        if activity.expects_replies:
            return BotResponse(status=200, body={"activities": [outgoing]})
        card_id = activity.raw.get("replyToId")
        if isinstance(reply, ShowCard) and isinstance(card_id, str) and card_id:
            try:  # the pressed card shows its new state, as an invoke's answer would
                await self.connector.update(service_url=activity.service_url,
                                            conversation_id=activity.conversation_id,
                                            activity_id=card_id, activity=outgoing)
                return BotResponse(status=200)
            except ConnectorError as exc:
                log.info("the pressed card was not updated (%s); answering with a new one",
                         type(exc).__name__)
        await self.delivery.send(activity, outgoing)
        return BotResponse(status=200)

    async def _on_invoke(self, activity: Activity, auth: AuthResult) -> BotResponse:
        if self.signin is not None and self.signin.handles(activity):
            self._check_reply_path(activity, auth)
            answer = await self.signin.on_invoke(activity)
            return BotResponse(status=answer.status, body=answer.body)
        if activity.raw.get("name") == INVOKE_NAME:
            status, body = invoke_response(await self.card_actions.handle(activity))
            return BotResponse(status=status, body=body)
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


def _error(error: ChatstateError, reason: str, *, retry_after: int | None = None) -> BotResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    return BotResponse(status=http_status_for(error), body={"error": error.code, "reason": reason},
                       headers=headers)
