"""Signing users in (shared/signin.py) against the token service stand-in, the Bot Connector
stand-in and a real Azurite: the OAuth card, single sign-on exchanges (deduplicated across
instances), the 412 that makes Teams show the button, the magic code, /signout, group chats."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from devtools.fake_channel import FakeConnector
from devtools.fake_token_service import Connection, FakeTokenService
from shared.activity import Activity, parse_activity
from shared.connector import BotConnector
from shared.errors import BadRequest
from shared.inbox import Inbox, TurnTicket
from shared.pending import Pending
from shared.signin import (
    CODE_REFUSED,
    OAUTH_CARD,
    SIGN_IN,
    SIGNED_IN,
    SIGNED_IN_GOING_ON,
    SIGNED_OUT,
    SignIn,
)
from shared.signin_store import PendingSignIn, SignInStore
from shared.token_service import TokenService
from tests.e2e.channel import event, in_group, invoke

USER = "29:user-1"
APP_ID = "bot-app-id"
EXCHANGE_URI = "api://botid-sso-app"


@dataclass
class Parts:
    tokens: FakeTokenService
    connector: FakeConnector
    store: SignInStore
    signin: SignIn
    inbox: Inbox

    def other_instance(self) -> SignIn:
        """A second instance of the bot: its own clients, the same table."""
        return SignIn(service=TokenService(self.tokens.url, bot_token=_bot_token),
                      store=self.store, connector=BotConnector(credential=None),
                      connections=self.signin.connections, app_id=APP_ID, inbox=self.inbox)


async def _bot_token() -> str:
    return "bot-token"


@pytest.fixture
async def parts(azurite_connection_string: str, table_name: str) -> AsyncIterator[Parts]:
    tokens = FakeTokenService([Connection(name="graph", audience="api://graph-ish",
                                          exchange_uri=EXCHANGE_URI)], app_id=APP_ID)
    connector = FakeConnector()
    await tokens.start()
    await connector.start()
    store = SignInStore.from_connection_string(azurite_connection_string, table_name=table_name)
    inbox = Inbox.from_connection_string(azurite_connection_string, table_name=table_name,
                                         queue_name=f"q{table_name}")
    service = TokenService(tokens.url, bot_token=_bot_token)
    bot_connector = BotConnector(credential=None)
    signin = SignIn(service=service, store=store, connector=bot_connector,
                    connections=frozenset({"graph"}), app_id=APP_ID, inbox=inbox)
    try:
        yield Parts(tokens=tokens, connector=connector, store=store, signin=signin, inbox=inbox)
    finally:
        await inbox.close()
        await service.close()
        await bot_connector.close()
        await store.close()
        await connector.stop()
        await tokens.stop()


def parsed(body: dict[str, Any]) -> Activity:
    return parse_activity(json.dumps(body).encode(), {"Content-Type": "application/json"})


def message(parts: Parts, text: str = "what is on my calendar?", *,
            conversation_id: str = "a:conv-1") -> dict[str, Any]:
    return event("message", text=text, conversation_id=conversation_id, id="m1",
                 serviceUrl=parts.connector.url)


def exchange_invoke(parts: Parts, exchange_id: str, token: str, *,
                    conversation_id: str = "a:conv-1") -> Activity:
    return parsed(invoke("signin/tokenExchange",
                         {"id": exchange_id, "connectionName": "graph", "token": token},
                         conversation_id=conversation_id, serviceUrl=parts.connector.url))


def cards(connector: FakeConnector) -> list[dict[str, Any]]:
    return [a for a in connector.activities if any(
        attachment.get("contentType") == OAUTH_CARD for attachment in a.get("attachments", []))]


async def test_the_card_asks_in_the_chat_with_teams_sso_and_notes_the_sign_in(parts: Parts) -> None:
    # GIVEN a message in a personal chat
    asking = parsed(message(parts))
    # WHEN the bot asks the user to sign in to "graph"
    await parts.signin.ask(asking, "graph")
    # THEN one OAuth card went to that chat, with the sign-in link and Teams' SSO resource
    (sent,) = cards(parts.connector)
    assert sent["conversation"]["id"] == "a:conv-1" and sent["recipient"]["id"] == USER
    content = sent["attachments"][0]["content"]
    assert content["connectionName"] == "graph"
    (button,) = content["buttons"]
    assert button["type"] == "signin" and button["value"].startswith(f"{parts.tokens.url}/signin")
    assert content["tokenExchangeResource"]["uri"] == EXCHANGE_URI
    # AND the sign-in is pending for that user, in that conversation
    (pending,) = await parts.store.pending(user_id=USER, channel_id="msteams")
    assert (pending.connection, pending.conversation_id) == ("graph", "a:conv-1")


async def test_in_a_group_chat_the_card_goes_to_the_users_own_chat_and_the_group_is_told(
        parts: Parts) -> None:
    # GIVEN Grace's message in a group chat
    asking = parsed(in_group(message(parts, conversation_id="19:group"), user="29:grace",
                             name="Grace"))
    # WHEN she must sign in
    await parts.signin.ask(asking, "graph")
    # THEN a one-to-one chat with her was opened, and the card went there only
    assert list(parts.connector.personal) == ["29:grace"]
    (sent,) = cards(parts.connector)
    assert sent["conversation"]["id"] == parts.connector.personal["29:grace"]
    assert "replyToId" not in sent
    # AND the group got a note that mentions her, without the card
    (note,) = parts.connector.messages("19:group")
    assert note["text"].startswith("<at>Grace</at>, to do that I need you to sign in to graph")
    assert note["entities"] == [{"type": "mention", "text": "<at>Grace</at>",
                                 "mentioned": {"id": "29:grace", "name": "Grace"}}]
    # AND the sign-in is pending in the group conversation, where her turn is
    (pending,) = await parts.store.pending(user_id="29:grace", channel_id="msteams")
    assert pending.conversation_id == "19:group"


async def test_a_group_card_falls_back_to_the_group_when_no_personal_chat_may_be_opened(
        parts: Parts) -> None:
    # GIVEN a user for whom the app is not installed personally
    parts.connector.personal_refused.add("29:grace")
    asking = parsed(in_group(message(parts, conversation_id="19:group"), user="29:grace",
                             name="Grace"))
    # WHEN she must sign in
    await parts.signin.ask(asking, "graph")
    # THEN the card and a note mentioning her went to the group
    (sent,) = cards(parts.connector)
    assert sent["conversation"]["id"] == "19:group"
    assert any(m.get("entities", [{}])[0].get("mentioned", {}).get("id") == "29:grace"
               for m in parts.connector.messages("19:group") if m.get("entities"))


async def test_a_teams_sso_exchange_signs_the_user_in_and_answers_200(parts: Parts) -> None:
    # GIVEN a card asked for, and Teams' SSO token for the user
    await parts.signin.ask(parsed(message(parts)), "graph")
    # WHEN Teams sends the tokenExchange invoke
    answer = await parts.signin.on_invoke(exchange_invoke(parts, "x-1",
                                                          parts.tokens.sso_token(USER)))
    # THEN it answers 200 with the exchange's ID, and the user is signed in
    assert (answer.status, answer.body) == (200, {"id": "x-1", "connectionName": "graph"})
    assert parts.tokens.signed_in(USER, "graph")
    # AND the sign-in is no longer pending, and the user was told
    assert await parts.store.pending(user_id=USER, channel_id="msteams") == []
    assert parts.connector.messages("a:conv-1")[-1]["text"] == SIGNED_IN.format(connection="graph")


async def test_a_failed_exchange_answers_412_so_teams_shows_the_button(parts: Parts) -> None:
    # GIVEN a user who has not consented to the app
    parts.tokens.consent_required.add(USER)
    # WHEN Teams sends the tokenExchange invoke
    answer = await parts.signin.on_invoke(exchange_invoke(parts, "x-2",
                                                          parts.tokens.sso_token(USER)))
    # THEN it answers 412 with a TokenExchangeInvokeResponse, and nobody is signed in
    assert answer.status == 412
    assert answer.body is not None
    assert {k: answer.body[k] for k in ("id", "connectionName")} == {"id": "x-2",
                                                                    "connectionName": "graph"}
    assert answer.body["failureDetail"]
    assert not parts.tokens.signed_in(USER, "graph")
    # AND a token service that fails answers 412 too (the button still works)
    parts.tokens.consent_required.clear()
    parts.tokens.fail_next.append(500)
    answer = await parts.signin.on_invoke(exchange_invoke(parts, "x-3",
                                                          parts.tokens.sso_token(USER)))
    assert answer.status == 412


async def test_duplicate_exchange_invokes_on_two_instances_make_one_exchange(parts: Parts) -> None:
    # GIVEN three Teams clients of one user, their invokes reaching two instances at once
    await parts.signin.ask(parsed(message(parts)), "graph")
    other = parts.other_instance()
    token = parts.tokens.sso_token(USER)
    told_before = len(parts.connector.messages("a:conv-1"))
    try:
        # WHEN the three invokes (one exchange ID) are handled together
        answers = await asyncio.gather(
            parts.signin.on_invoke(exchange_invoke(parts, "x-dup", token)),
            other.on_invoke(exchange_invoke(parts, "x-dup", token)),
            other.on_invoke(exchange_invoke(parts, "x-dup", token)))
    finally:
        await other.service.close()
        await other.connector.close()
    # THEN every client got 200, the token service saw one exchange, and the user was told once
    assert [a.status for a in answers] == [200, 200, 200]
    assert len(parts.tokens.exchanges) == 1
    assert len(parts.connector.messages("a:conv-1")) - told_before == 1


async def test_duplicates_of_a_failed_exchange_all_get_412(parts: Parts) -> None:
    # GIVEN an exchange that fails, and a second client's invoke after it
    parts.tokens.consent_required.add(USER)
    token = parts.tokens.sso_token(USER)
    first = await parts.signin.on_invoke(exchange_invoke(parts, "x-f", token))
    # WHEN the duplicate arrives THEN it too gets 412 (its client shows the button), no exchange
    second = await parts.signin.on_invoke(exchange_invoke(parts, "x-f", token))
    assert (first.status, second.status) == (412, 412)
    assert len(parts.tokens.exchanges) == 1


async def test_verify_state_redeems_the_magic_code(parts: Parts) -> None:
    # GIVEN a card, and the code the sign-in page showed after the button
    await parts.signin.ask(parsed(message(parts)), "graph")
    (sent,) = cards(parts.connector)
    code = parts.tokens.open_sign_in_link(sent["attachments"][0]["content"]["buttons"][0]["value"])
    verify = parsed(invoke("signin/verifyState", {"state": "000000" if code != "000000"
                                                  else "111111"},
                           conversation_id="a:conv-1", serviceUrl=parts.connector.url))
    # WHEN Teams sends verifyState with a wrong code THEN 404, nobody signed in
    assert (await parts.signin.on_invoke(verify)).status == 404
    assert not parts.tokens.signed_in(USER, "graph")
    # WHEN it sends the right one THEN 200 and the user is signed in
    verify.raw["value"] = {"state": code}
    assert (await parts.signin.on_invoke(verify)).status == 200
    assert parts.tokens.signed_in(USER, "graph")


async def test_a_typed_magic_code_counts_only_while_a_sign_in_is_pending(parts: Parts) -> None:
    # GIVEN no sign-in pending: a six-digit message is an ordinary message
    assert await parts.signin.on_message(parsed(message(parts, "123456"))) is None
    # GIVEN a card and its code
    await parts.signin.ask(parsed(message(parts)), "graph")
    (sent,) = cards(parts.connector)
    code = parts.tokens.open_sign_in_link(sent["attachments"][0]["content"]["buttons"][0]["value"])
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    # WHEN a wrong code is typed THEN the user is told so
    assert await parts.signin.on_message(parsed(message(parts, wrong))) == CODE_REFUSED
    # WHEN the right code is typed THEN they are signed in
    said = await parts.signin.on_message(parsed(message(parts, code)))
    assert said == SIGNED_IN.format(connection="graph")
    assert parts.tokens.signed_in(USER, "graph")


async def test_signout_signs_out_of_every_connection(parts: Parts) -> None:
    # GIVEN a signed-in user with a sign-in pending too
    parts.tokens.sign_in(USER, "graph")
    await parts.signin.ask(parsed(message(parts)), "graph")
    # WHEN they send /signout THEN they are signed out, and nothing is pending
    assert await parts.signin.on_message(parsed(message(parts, "/signout"))) == SIGNED_OUT
    assert not parts.tokens.signed_in(USER, "graph")
    assert await parts.store.pending(user_id=USER, channel_id="msteams") == []


async def test_a_forged_or_broken_invoke_is_refused(parts: Parts,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN an exchange invoke for a connection we do not have, and one without a token
    foreign = exchange_invoke(parts, "x-9", "t")
    foreign.raw["value"]["connectionName"] = "somebody-elses"
    empty = exchange_invoke(parts, "x-9", "")
    # WHEN they come THEN each is a BadRequest and no exchange runs
    for activity in (foreign, empty):
        with pytest.raises(BadRequest):
            await parts.signin.on_invoke(activity)
    assert parts.tokens.exchanges == []
    # AND Teams' signin/failure is logged and answered 200
    failure = parsed(invoke("signin/failure", {"code": "resourcematchfailed", "message": "x"},
                            conversation_id="a:conv-1", serviceUrl=parts.connector.url))
    with caplog.at_level(logging.WARNING):
        assert (await parts.signin.on_invoke(failure)).status == 200
    assert "resourcematchfailed" in caplog.text


async def test_direct_lines_tokens_response_event_counts_only_when_the_service_agrees(
        parts: Parts) -> None:
    # GIVEN a card asked for on Web Chat (Direct Line with enhanced authentication)
    await parts.signin.ask(parsed(message(parts)), "graph")
    event_body = invoke("tokens/response", {"connectionName": "graph", "token": "forged"},
                        conversation_id="a:conv-1", serviceUrl=parts.connector.url)
    event_body["type"] = "event"
    told = len(parts.connector.messages("a:conv-1"))
    # WHEN the event comes before the token service has a token THEN nothing happens
    assert SignIn.handles(parsed(event_body))
    assert (await parts.signin.on_invoke(parsed(event_body))).status == 200
    assert len(parts.connector.messages("a:conv-1")) == told
    # WHEN it comes once the user signed in THEN they are told, and nothing is pending
    parts.tokens.sign_in(USER, "graph")
    assert (await parts.signin.on_invoke(parsed(event_body))).status == 200
    assert parts.connector.messages("a:conv-1")[-1]["text"] == SIGNED_IN.format(connection="graph")
    assert await parts.store.pending(user_id=USER, channel_id="msteams") == []


async def test_a_users_removal_and_the_retention_purge_leave_no_sign_in_row(parts: Parts) -> None:
    # GIVEN sign-ins asked of two users, and an exchange each claimed
    await parts.signin.ask(parsed(message(parts)), "graph")
    other = message(parts, conversation_id="a:conv-2")
    other["from"]["id"] = "29:other"
    await parts.signin.ask(parsed(other), "graph")
    for user, conversation in ((USER, "a:conv-1"), ("29:other", "a:conv-2")):
        assert await parts.store.claim_exchange(conversation_id=conversation, exchange_id="x",
                                                user_id=user)
    # WHEN the first user is removed THEN their rows (2) go, the other's stay
    assert await parts.store.forget_user(USER) == 2
    assert await parts.store.pending(user_id=USER, channel_id="msteams") == []
    assert await parts.store.exchange_outcome(conversation_id="a:conv-1", exchange_id="x") is None
    assert len(await parts.store.pending(user_id="29:other", channel_id="msteams")) == 1
    # WHEN the retention timer purges rows older than a cut-off in the future THEN the rest go
    assert await parts.store.purge_before(datetime.now(UTC) + timedelta(minutes=1)) == 2
    assert await parts.store.pending(user_id="29:other", channel_id="msteams") == []
    assert await parts.store.exchange_outcome(conversation_id="a:conv-2", exchange_id="x") is None


async def test_an_expired_sign_in_no_longer_makes_six_digits_a_code(parts: Parts) -> None:
    # GIVEN a card asked for, and a clock past its 15 minutes
    await parts.signin.ask(parsed(message(parts)), "graph")
    later = datetime.now(UTC) + timedelta(minutes=16)
    # WHEN the user's pending sign-ins are read then THEN there is none
    assert await parts.store.pending(user_id=USER, channel_id="msteams", now=later) == []
    # AND another channel's are not this channel's
    assert await parts.store.pending(user_id=USER, channel_id="webchat") == []


async def park(parts: Parts, *, conversation_id: str = "a:conv-1", user: str = USER,
               seconds: float = 600) -> Pending:
    """A turn of `user` parked in the conversation's order until they sign in to "graph"."""
    pending = Pending(kind=SIGN_IN, activity_ids=("m1",), asked=user, asked_name="Ada",
                      expires_at=time.time() + seconds, detail={"connection": "graph"})
    await parts.inbox.change_head(conversation_id, lambda head: replace(head, parked=pending))
    return pending


async def wake_ups(parts: Parts) -> list[TurnTicket]:
    return [TurnTicket.from_json(m.content) for m in
            await parts.inbox.queue.peek_messages(max_messages=32)]


async def test_signing_in_decides_the_parked_turn_once_and_wakes_its_conversation(
        parts: Parts) -> None:
    # GIVEN Ada's turn parked until she signs in, and the card sent for it
    pending = await park(parts)
    await parts.signin.ask(parsed(message(parts)), "graph", parked_id=pending.id)
    # WHEN her Teams client's silent exchange signs her in
    answer = await parts.signin.on_invoke(exchange_invoke(parts, "x-p",
                                                          parts.tokens.sso_token(USER)))
    # THEN the parked turn is decided (signed in, by her), and one wake-up names it
    assert answer.status == 200
    head = await parts.inbox.read_head("a:conv-1")
    assert head is not None and head.parked is not None
    assert (head.parked.id, head.parked.state, head.parked.decided_by) == (
        pending.id, "signed_in", USER)
    (ticket,) = await wake_ups(parts)
    assert (ticket.conversation_id, ticket.activity_id, ticket.kind) == ("a:conv-1", "m1", "wake")
    # AND she is told the request goes on
    assert parts.connector.messages("a:conv-1")[-1]["text"] == \
        SIGNED_IN_GOING_ON.format(connection="graph")
    # WHEN she signs in again (another card's code) THEN nothing more is woken
    await parts.signin.ask(parsed(message(parts)), "graph", parked_id=pending.id)
    (card, *_) = reversed(cards(parts.connector))
    code = parts.tokens.open_sign_in_link(card["attachments"][0]["content"]["buttons"][0]["value"])
    assert await parts.signin.on_message(parsed(message(parts, code))) == \
        SIGNED_IN.format(connection="graph")
    assert len(await wake_ups(parts)) == 1


async def test_a_parked_turn_is_woken_only_for_its_own_user_and_while_it_waits(
        parts: Parts) -> None:
    # GIVEN Grace's turn parked in a group chat, noted for Ada by a forged row, and an expired one
    group = await park(parts, conversation_id="19:group", user="29:grace")
    await parts.signin.ask(parsed(message(parts, conversation_id="19:group")), "graph",
                           parked_id=group.id)
    expired = await park(parts, conversation_id="a:old", seconds=-1)
    await parts.signin.ask(parsed(message(parts, conversation_id="a:old")), "graph",
                           parked_id=expired.id)
    # WHEN Ada signs in
    parts.tokens.sign_in(USER, "graph")
    verify = parsed(invoke("signin/tokenExchange", {"id": "x-q", "connectionName": "graph",
                                                     "token": parts.tokens.sso_token(USER)},
                           conversation_id="a:conv-1", serviceUrl=parts.connector.url))
    assert (await parts.signin.on_invoke(verify)).status == 200
    # THEN neither turn is decided: one was Grace's, the other had expired
    for conversation in ("19:group", "a:old"):
        head = await parts.inbox.read_head(conversation)
        assert head is not None and head.parked is not None and head.parked.waiting
    assert await wake_ups(parts) == []


async def test_the_sign_in_is_noted_before_the_card_goes_out(parts: Parts,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a connector that notes, as each card arrives, whether the sign-in was noted by then
    # (Teams' silent exchange can come back within milliseconds of the card)
    noted: list[bool] = []
    seen: list[bool] = []
    original = parts.store.note_pending

    async def noting(pending: PendingSignIn) -> None:
        await original(pending)
        noted.append(True)

    monkeypatch.setattr(parts.store, "note_pending", noting)
    parts.connector.on_activity = lambda event, activity, activity_id: seen.append(
        bool(noted)) if activity.get("attachments") else None
    # WHEN the bot asks for a sign-in
    await parts.signin.ask(parsed(message(parts)), "graph")
    # THEN the sign-in was already noted when the card arrived
    assert seen == [True]
