"""Signing a user in: the OAuth card, Teams single sign-on, the magic code, and /signout.

    a tool needs the user      → `ask`: an OAuth card (the token service's sign-in link, and
                                 Teams' single sign-on resource) to the user who must sign in; in
                                 a group chat it goes to their one-to-one chat with the bot, and
                                 the group gets a note that mentions them; the sign-in is noted
                                 as pending (shared/signin_store.py)
    signin/tokenExchange       → Teams' silent SSO token, sent once per open Teams client with one
                                 exchange ID: the first to claim the ID (a conditional create,
                                 any instance) exchanges it; 200 when it worked, 412 with a
                                 TokenExchangeInvokeResponse when not, so Teams shows the card's
                                 button; the others answer with the claimed exchange's outcome
    signin/verifyState         → the magic code of the button's sign-in page: GetToken with it
    a six-digit message        → the same code, typed (Web Chat), while a sign-in is pending
    signin/failure             → Teams got no SSO token (a setup problem): logged, 200
    a tokens/response event    → Direct Line's enhanced authentication signed the user in (its
                                 token is not read: the token service is asked, as for a code)
    /signout                   → SignOut of every connection; answered with no model call

A turn that paused for the sign-in (its tool call held, the turn parked in its conversation's
order, `Pending` kind `signin`, shared/order.py) is noted with the sign-in it waits for. Whichever
way the user signs in, the webhook decides that parked turn (`signed_in`, one conditional write
of the conversation's order head: a second sign-in finds it decided) and queues a wake-up: the
drain resumes the turn, on any instance, with no worker having waited.

Group chats: the card goes to a one-to-one chat so that only the person asked sees it, and so that
the other members' Teams clients do not each start a silent exchange of their own tokens (Teams
SSO also works in one-to-one and group chats, not in channels). When the bot may not open that
chat (Teams: the app is not installed for the user), the card goes to the group, mentioning them,
and only their own invokes count. Tokens pass through here and are dropped: a tool gets its own
per turn (shared/user_tokens.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from .activity import Activity
from .connector import BotConnector
from .errors import BadRequest, ConnectorError, TokenServiceError
from .inbox import Inbox, OrderHead, TurnTicket
from .messages import utc_now
from .signin_store import ExchangeOutcome, PendingSignIn, SignInStore
from .speakers import clean_name
from .token_service import SignInResource, TokenService, sign_in_state

__all__ = ["OAUTH_CARD", "SIGN_IN", "InvokeAnswer", "SignIn", "oauth_card"]

log = logging.getLogger(__name__)

OAUTH_CARD = "application/vnd.microsoft.card.oauth"
#: The kind of a turn parked until its user signs in (`Pending.kind`).
SIGN_IN = "signin"
#: A sign-in asked for stays pending (a magic code or an invoke counts for it) this long.
PENDING_MINUTES = 15
#: A duplicate exchange invoke waits at most this long for the claimed exchange's outcome.
DUPLICATE_WAIT_SECONDS = 3.0
_MAGIC_CODE = re.compile(r"^\d{6}$")

ASK = "To do that I need you to sign in to {connection}."
ASK_IN_GROUP = "{mention}, to do that I need you to sign in to {connection}: I sent you a " \
    "sign-in card in our one-to-one chat."
ASK_HERE = "{mention}, to do that I need you to sign in to {connection}."
SIGNED_IN = "You're signed in to {connection}. Send your question again and I'll use it."
SIGNED_IN_GOING_ON = "You're signed in to {connection}. Going on with your request."
CODE_REFUSED = "That code didn't work. Use the Sign in button again to get a new one."
SIGNED_OUT = "You're signed out. Tools that act as you will ask you to sign in again."
_FAILURE_DETAIL = "The bot could not exchange the token; sign in with the button."


@dataclass(frozen=True, kw_only=True)
class InvokeAnswer:
    """The invoke response: its status and body (the webhook sends it as the HTTP response)."""

    status: int
    body: dict[str, Any] | None = None


def oauth_card(resource: SignInResource, *, connection: str, text: str) -> dict[str, Any]:
    """An OAuth card attachment: the button opens the sign-in link; Teams uses the token exchange
    resource, when there is one, to try single sign-on first."""
    content: dict[str, Any] = {"text": text, "connectionName": connection,
                               "buttons": [{"type": "signin", "title": "Sign in",
                                            "value": resource.sign_in_link}]}
    if resource.exchange is not None:
        exchange = {"id": resource.exchange.id, "uri": resource.exchange.uri}
        if resource.exchange.provider_id:
            exchange["providerId"] = resource.exchange.provider_id
        content["tokenExchangeResource"] = exchange
    if resource.token_post_resource is not None:
        content["tokenPostResource"] = resource.token_post_resource
    return {"contentType": OAUTH_CARD, "content": content}


class SignIn:
    def __init__(self, *, service: TokenService, store: SignInStore, connector: BotConnector,
                 connections: frozenset[str], app_id: str, inbox: Inbox | None = None,
                 clock: Callable[[], datetime] = utc_now,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """`connections`: the OAuth connections tools use; `app_id`: the bot's (the state).
        `inbox`: the conversations' order, where turns wait parked (None: inline answers)."""
        self.service = service
        self.store = store
        self.connector = connector
        self.connections = connections
        self.app_id = app_id
        self.inbox = inbox
        self._clock = clock
        self._sleep = sleep

    # -- asking -------------------------------------------------------------------------------

    async def ask(self, activity: Activity, connection: str, *, parked_id: str = "",
                  expires_at: datetime | None = None) -> None:
        """Send the user of `activity` the card to sign in to `connection`; note it pending
        (`parked_id`: the turn parked until then, waiting until `expires_at`)."""
        where, note = activity, None
        if activity.in_group:
            personal = await self._personal_chat(activity)
            where, note = (personal, ASK_IN_GROUP) if personal is not None else (activity, ASK_HERE)
        text = ASK.format(connection=connection)
        resource = await self.service.sign_in_resource(
            state=sign_in_state(where, connection=connection, app_id=self.app_id))
        card = {**where.reply("", ai=False),
                "attachments": [oauth_card(resource, connection=connection, text=text)]}
        if where is not activity:  # a new chat: nothing there to reply to
            card.pop("replyToId", None)
        # Noted before the card goes: Teams' silent exchange can come back within milliseconds,
        # and a sign-in must find the turn waiting for it.
        await self.store.note_pending(PendingSignIn(
            user_id=_user_id(activity), channel_id=activity.channel_id, connection=connection,
            conversation_id=activity.conversation_id, parked_id=parked_id,
            expires_at=expires_at or self._clock() + timedelta(minutes=PENDING_MINUTES)))
        if note is not None:  # the group: a note that mentions who must sign in
            await self._send(activity, _mentioning(activity, note, connection=connection))
        await self._send(where, card)
        log.info("asked the user to sign in to %s%s", connection,
                 " in a one-to-one chat" if where is not activity else "")

    async def _personal_chat(self, activity: Activity) -> Activity | None:
        """`activity` as if it came in the sender's one-to-one chat with the bot (made now), or
        None when the bot may not open one."""
        tenant = activity.raw.get("conversation", {}).get("tenantId")
        try:
            conversation_id = await self.connector.create_conversation(
                service_url=activity.service_url, bot=activity.recipient, user=activity.sender,
                tenant_id=tenant if isinstance(tenant, str) else None)
        except ConnectorError as exc:
            log.warning("no one-to-one chat for the sign-in card (%s); it goes to the group",
                        exc.answer[0] if exc.answer else "unreachable")
            return None
        conversation = {"id": conversation_id, "conversationType": "personal", "isGroup": False}
        if isinstance(tenant, str):
            conversation["tenantId"] = tenant
        return replace(activity, raw={**activity.raw, "conversation": conversation},
                       conversation_id=conversation_id)

    async def _send(self, where: Activity, outgoing: dict[str, Any]) -> None:
        await self.connector.send(service_url=where.service_url,
                                  conversation_id=where.conversation_id, activity=outgoing)

    # -- the webhook: invokes and messages ------------------------------------------------------

    @staticmethod
    def handles(activity: Activity) -> bool:
        """A sign-in invoke (`signin/...`), or Direct Line's `tokens/response` event."""
        name = str(activity.raw.get("name", ""))
        return (activity.type == "invoke" and name.startswith("signin/")) or \
            (activity.type == "event" and name == "tokens/response")

    async def on_invoke(self, activity: Activity) -> InvokeAnswer:
        name = activity.raw.get("name")
        value = activity.raw.get("value")
        value = value if isinstance(value, dict) else {}
        if name == "signin/tokenExchange":
            return await self._token_exchange(activity, value)
        if name == "signin/verifyState":
            return await self._verify_state(activity, value)
        if name == "tokens/response":
            return await self._token_response(activity, value)
        if name == "signin/failure":
            code = str(value.get("code") or "unknown")[:64]
            log.warning("Teams could not get a single sign-on token (%s): check the app "
                        "package's webApplicationInfo and the connection's Token Exchange URL",
                        code)
            return InvokeAnswer(status=200, body={})
        raise BadRequest(f"unknown sign-in invoke {str(name)[:64]!r}")

    async def on_message(self, activity: Activity) -> str | None:
        """The reply to a sign-in message (/signout, a magic code typed while a sign-in is
        pending); None when it is not one."""
        text = activity.message_text
        if text.lower() == "/signout":
            await self.service.sign_out(user_id=_user_id(activity),
                                        channel_id=activity.channel_id)
            await self.store.clear_pending(user_id=_user_id(activity))
            log.info("signed the user out")
            return SIGNED_OUT
        if not _MAGIC_CODE.match(text):
            return None
        pending = await self.store.pending(user_id=_user_id(activity),
                                           channel_id=activity.channel_id, now=self._clock())
        if not pending:
            return None
        connection = await self._redeem(activity, text, [p.connection for p in pending])
        return CODE_REFUSED if connection is None else await self._signed_in(activity, connection,
                                                                              tell=False)

    async def _token_exchange(self, activity: Activity, value: dict[str, Any]) -> InvokeAnswer:
        exchange_id, connection, token = value.get("id"), value.get("connectionName"), \
            value.get("token")
        if not (isinstance(exchange_id, str) and exchange_id and isinstance(token, str) and token):
            raise BadRequest("a signin/tokenExchange invoke needs value.id and value.token")
        if connection not in self.connections:
            raise BadRequest("the signin/tokenExchange invoke names no OAuth connection of ours")
        user = _user_id(activity)
        if not await self.store.claim_exchange(conversation_id=activity.conversation_id,
                                               exchange_id=exchange_id, user_id=user):
            claimed = await self._outcome(activity.conversation_id, exchange_id)
            log.info("a duplicate single sign-on exchange (another Teams client): %s", claimed)
            return _exchanged(exchange_id, connection) if claimed != "failed" else \
                _not_exchanged(exchange_id, connection)
        try:
            exchanged = await self.service.exchange(user_id=user, connection=connection,
                                                    channel_id=activity.channel_id, token=token)
        except TokenServiceError as exc:
            log.error("single sign-on exchange failed: %s", exc)
            exchanged = None
        outcome: ExchangeOutcome = "signed-in" if exchanged is not None else "failed"
        await self.store.settle_exchange(conversation_id=activity.conversation_id,
                                         exchange_id=exchange_id, outcome=outcome)
        if exchanged is None:
            log.info("single sign-on exchange refused (consent, or another app's token); Teams "
                     "shows the sign-in button")
            return _not_exchanged(exchange_id, connection)
        await self._signed_in(activity, connection)
        return _exchanged(exchange_id, connection)

    async def _outcome(self, conversation_id: str, exchange_id: str) -> str:
        """The claimed exchange's outcome, waited for (bounded); still under way counts as done:
        the first client shows the button if it fails."""
        steps = int(DUPLICATE_WAIT_SECONDS / 0.1)
        for _ in range(steps):
            outcome = await self.store.exchange_outcome(conversation_id=conversation_id,
                                                        exchange_id=exchange_id)
            if outcome != "exchanging":
                return outcome or "failed"
            await self._sleep(0.1)
        return "exchanging"

    async def _verify_state(self, activity: Activity, value: dict[str, Any]) -> InvokeAnswer:
        code = value.get("state")
        if not isinstance(code, str) or not code:
            raise BadRequest("a signin/verifyState invoke needs value.state")
        pending = await self.store.pending(user_id=_user_id(activity),
                                           channel_id=activity.channel_id, now=self._clock())
        candidates = [p.connection for p in pending] or sorted(self.connections)
        connection = await self._redeem(activity, code, candidates)
        if connection is None:
            log.info("a magic code that no pending sign-in accepted")
            return InvokeAnswer(status=404, body={})
        await self._signed_in(activity, connection)
        return InvokeAnswer(status=200, body={})

    async def _token_response(self, activity: Activity, value: dict[str, Any]) -> InvokeAnswer:
        """The token service says the user signed in (Direct Line): check with it, not the event."""
        connection = value.get("connectionName")
        if connection not in self.connections:
            raise BadRequest("the tokens/response event names no OAuth connection of ours")
        found = await self.service.get_token(user_id=_user_id(activity), connection=connection,
                                             channel_id=activity.channel_id)
        if found is not None:
            await self._signed_in(activity, connection)
        return InvokeAnswer(status=200)

    async def _redeem(self, activity: Activity, code: str, connections: list[str]) -> str | None:
        """The connection `code` (a magic code) signed the user in to, or None."""
        for connection in dict.fromkeys(connections):
            found = await self.service.get_token(user_id=_user_id(activity),
                                                 connection=connection,
                                                 channel_id=activity.channel_id, code=code)
            if found is not None:
                log.info("a magic code redeemed")
                return connection
        return None

    async def _signed_in(self, activity: Activity, connection: str, *, tell: bool = True) -> str:
        """The user signed in: each turn parked for it is decided and woken, the sign-ins asked
        for are done; tell them (`tell` False: the words, for the caller to send)."""
        user = _user_id(activity)
        asked = await self.store.pending(user_id=user, channel_id=activity.channel_id,
                                         now=self._clock())
        woken = [await self._wake(pending) for pending in asked
                 if pending.connection == connection and pending.parked_id]
        await self.store.clear_pending(user_id=user, connection=connection)
        log.info("signed in to %s; %d parked turn(s) resume", connection, sum(woken))
        said = (SIGNED_IN_GOING_ON if any(woken) else SIGNED_IN).format(connection=connection)
        if tell:
            try:
                await self._send(activity, activity.reply(said, ai=False))
            except ConnectorError as exc:
                log.warning("signed in, but not told so: %s", exc)
        return said

    async def _wake(self, pending: PendingSignIn) -> bool:
        """Decide the turn parked for `pending` (it was this user's, for this sign-in, waiting and
        not expired: checked on the head as written) and queue its wake-up; False when it is no
        longer waiting (a duplicate sign-in, expired, superseded, removed)."""
        if self.inbox is None:
            return False
        now = self._clock().timestamp()

        def decided(head: OrderHead) -> OrderHead | None:
            parked = head.parked
            if parked is None or parked.id != pending.parked_id or parked.kind != SIGN_IN or \
                    parked.asked != pending.user_id or not parked.waiting or parked.expired(now):
                return None
            return replace(head, parked=parked.decide("signed_in", by=pending.user_id, at=now))

        written = await self.inbox.change_head(pending.conversation_id, decided)
        if written is None or written.parked is None:
            return False
        await self.inbox.enqueue(TurnTicket(conversation_id=pending.conversation_id,
                                            activity_id=written.parked.activity_ids[-1],
                                            enqueued_at=now, kind="wake"))
        return True


def _exchanged(exchange_id: str, connection: str) -> InvokeAnswer:
    return InvokeAnswer(status=200, body={"id": exchange_id, "connectionName": connection})


def _not_exchanged(exchange_id: str, connection: str) -> InvokeAnswer:
    """412 PreconditionFailed: Teams shows the OAuth card's sign-in button."""
    return InvokeAnswer(status=412, body={"id": exchange_id, "connectionName": connection,
                                          "failureDetail": _FAILURE_DETAIL})


def _user_id(activity: Activity) -> str:
    user = activity.sender.get("id")
    if not isinstance(user, str) or not user:
        raise BadRequest("a sign-in needs the activity's from.id")
    return user


def _mentioning(activity: Activity, template: str, *, connection: str) -> dict[str, Any]:
    """A message to the group that @mentions the sender where `template` says {mention}."""
    name = (clean_name(str(activity.sender.get("name") or "")) or "you").translate(
        {ord("<"): None, ord(">"): None})
    mention = f"<at>{name}</at>"
    outgoing = activity.reply(template.format(mention=mention, connection=connection), ai=False)
    outgoing["entities"] = [{"type": "mention", "text": mention,
                             "mentioned": {"id": activity.sender.get("id"), "name": name}}]
    return outgoing
