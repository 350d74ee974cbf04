"""Tools that act as the user, end to end: the app through the dev host, the token service
stand-in, the identity stand-in's on-behalf-of exchange, the demo MCP server's `whoami` (it checks
the bearer token), and the contract-enforcing Bot Connector stand-in. Signed in, not signed in,
Teams single sign-on (exchanged, refused, duplicated), the magic code, /signout, a group chat, and
the canary: no token in logs, spans, history or storage."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import pytest

from devtools.fake_model import Scripted, tool_call
from devtools.fake_token_service import FakeTokenService
from devtools.otlp_collector import OtlpCollector
from shared.signin import OAUTH_CARD, SIGNED_IN, SIGNED_OUT
from tests.e2e.channel import (
    MCP_AUDIENCE,
    SSO_CONNECTION,
    Bench,
    bench,
    in_group,
    invoke,
    otlp_collector,
    stored_text,
)


@pytest.fixture(scope="module")
def collector() -> Iterator[OtlpCollector]:
    with otlp_collector() as running:
        yield running


@pytest.fixture(scope="module")
def channel(azurite_connection_string: str, collector: OtlpCollector) -> Iterator[Bench]:
    with bench(azurite_connection_string, signin=True, extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "200",
            "CHAT_STREAMING": "off"}) as running:
        yield running


def tokens_of(channel: Bench) -> FakeTokenService:
    assert channel.tokens is not None
    return channel.tokens


def person(channel: Bench, name: str = "Ada Lovelace") -> str:
    """A new user (their own sign-ins), named at the token service."""
    user = f"29:{uuid.uuid4().hex[:12]}"
    tokens_of(channel).user(user, name)
    return user


def said(channel: Bench, user: str, text: str, *, conversation: str,
         group: bool = False) -> dict[str, Any]:
    activity = channel.message(text, conversation_id=conversation)
    activity["from"] = {"id": user, "name": "Ada"}
    return in_group(activity, user=user, name="Ada") if group else activity


def sign_in_invoke(channel: Bench, user: str, name: str, value: dict[str, Any], *,
                   conversation: str) -> dict[str, Any]:
    activity = invoke(name, value, conversation_id=conversation,
                      serviceUrl=channel.connector.url)
    activity["from"] = {"id": user, "name": "Ada"}
    return activity


def whoami_then_answer(channel: Bench) -> None:
    """The model calls whoami, then answers."""
    channel.model.then(Scripted(tool_calls=[tool_call("whoami", {}, f"w-{uuid.uuid4().hex[:6]}")]),
                       Scripted(content="Here is who you are."))


def tool_result(channel: Bench) -> str:
    """The newest tool result the model read."""
    return str(next(m["content"] for m in reversed(channel.model.requests[-1]["messages"])
                    if m["role"] == "tool"))


def cards(channel: Bench, conversation: str) -> list[dict[str, Any]]:
    return [a for a in channel.connector.messages(conversation)
            if any(x.get("contentType") == OAUTH_CARD for x in a.get("attachments", []))]


def link_of(card: dict[str, Any]) -> str:
    return str(card["attachments"][0]["content"]["buttons"][0]["value"])


def carded(channel: Bench) -> tuple[str, str, dict[str, Any]]:
    """A new user who asked while not signed in: (user, conversation, the card they got)."""
    user, conversation = person(channel), f"a:{uuid.uuid4().hex}"
    whoami_then_answer(channel)
    channel.post(said(channel, user, "who am I?", conversation=conversation))
    (card,) = cards(channel, conversation)
    return user, conversation, card


def exchange(channel: Bench, user: str, card: dict[str, Any], *,
             conversation: str) -> dict[str, Any]:
    """The signin/tokenExchange invoke Teams sends for `card`, with the user's SSO token."""
    return sign_in_invoke(channel, user, "signin/tokenExchange", {
        "id": card["attachments"][0]["content"]["tokenExchangeResource"]["id"],
        "connectionName": SSO_CONNECTION, "token": tokens_of(channel).sso_token(user)},
        conversation=conversation)


def test_a_signed_in_users_tool_call_carries_their_token_for_its_audience(channel: Bench) -> None:
    # GIVEN Ada, signed in to the connection already
    user, conversation = person(channel), f"a:{uuid.uuid4().hex}"
    tokens_of(channel).sign_in(user, SSO_CONNECTION)
    whoami_then_answer(channel)
    # WHEN she asks, and the model calls whoami
    assert channel.post(said(channel, user, "who am I?", conversation=conversation)).status_code == 200
    # THEN whoami checked a token issued for its audience, naming her
    assert f"You are Ada Lovelace (ada@contoso.example); the token was issued for {MCP_AUDIENCE}" \
        in tool_result(channel)
    # AND she got the answer, and no card
    assert channel.connector.messages(conversation)[-1]["text"] == "Here is who you are."
    assert cards(channel, conversation) == []


def test_a_user_who_is_not_signed_in_gets_the_card_signs_in_and_asks_again(channel: Bench) -> None:
    # GIVEN Ada, not signed in
    user, conversation = person(channel), f"a:{uuid.uuid4().hex}"
    whoami_then_answer(channel)
    # WHEN she asks, and the model calls whoami
    assert channel.post(said(channel, user, "who am I?", conversation=conversation)).status_code == 200
    # THEN she got an OAuth card with Teams' SSO resource, and the model was told to ask her
    (card,) = cards(channel, conversation)
    content = card["attachments"][0]["content"]
    assert content["connectionName"] == SSO_CONNECTION and content["tokenExchangeResource"]["uri"]
    assert "not signed in" in tool_result(channel)
    # WHEN she uses the card's button and Teams sends verifyState with the page's magic code
    code = tokens_of(channel).open_sign_in_link(link_of(card))
    response = channel.post(sign_in_invoke(channel, user, "signin/verifyState", {"state": code},
                                           conversation=conversation))
    # THEN she is signed in and told so
    assert response.status_code == 200 and tokens_of(channel).signed_in(user, SSO_CONNECTION)
    assert channel.connector.messages(conversation)[-1]["text"] == \
        SIGNED_IN.format(connection=SSO_CONNECTION)
    # WHEN she asks again THEN whoami gets her token
    whoami_then_answer(channel)
    assert channel.post(said(channel, user, "who am I now?", conversation=conversation)).status_code == 200
    assert "You are Ada Lovelace" in tool_result(channel)


def test_teams_sso_exchanges_the_token_and_answers_200(channel: Bench) -> None:
    # GIVEN Ada with a card (she asked while not signed in)
    user, conversation, card = carded(channel)
    exchange_id = card["attachments"][0]["content"]["tokenExchangeResource"]["id"]
    # WHEN her Teams client exchanges its SSO token silently
    response = channel.post(exchange(channel, user, card, conversation=conversation))
    # THEN the invoke is answered 200 with the exchange's ID, and she is signed in
    assert response.status_code == 200
    assert response.json() == {"id": exchange_id, "connectionName": SSO_CONNECTION}
    assert tokens_of(channel).signed_in(user, SSO_CONNECTION)


def test_a_refused_exchange_answers_412_and_the_cards_button_still_signs_in(channel: Bench) -> None:
    # GIVEN Ada, who has not consented, with a card
    user, conversation, card = carded(channel)
    tokens_of(channel).consent_required.add(user)
    exchange_id = card["attachments"][0]["content"]["tokenExchangeResource"]["id"]
    # WHEN Teams' silent exchange is refused
    response = channel.post(exchange(channel, user, card, conversation=conversation))
    # THEN the invoke is answered 412 PreconditionFailed with a TokenExchangeInvokeResponse
    assert response.status_code == 412
    body = response.json()
    assert (body["id"], body["connectionName"]) == (exchange_id, SSO_CONNECTION)
    assert body["failureDetail"] and not tokens_of(channel).signed_in(user, SSO_CONNECTION)
    # WHEN she then presses the card's button (Teams shows it after a 412) and signs in
    code = tokens_of(channel).open_sign_in_link(link_of(card))
    response = channel.post(sign_in_invoke(channel, user, "signin/verifyState", {"state": code},
                                           conversation=conversation))
    # THEN she is signed in
    assert response.status_code == 200 and tokens_of(channel).signed_in(user, SSO_CONNECTION)


def test_duplicate_exchange_invokes_from_several_teams_clients_make_one_exchange(
        channel: Bench) -> None:
    # GIVEN Ada with a card, and Teams open on three devices
    user, conversation, card = carded(channel)
    exchanges_before = len(tokens_of(channel).exchanges)
    told_before = len(channel.connector.messages(conversation))
    invokes = [exchange(channel, user, card, conversation=conversation) for _ in range(3)]
    # WHEN the three clients' invokes arrive at once
    with ThreadPoolExecutor(3) as pool:
        statuses = [r.status_code for r in pool.map(channel.post, invokes)]
    # THEN each was answered 200, the token service saw one exchange, and she was told once
    assert statuses == [200, 200, 200]
    assert len(tokens_of(channel).exchanges) - exchanges_before == 1
    assert len(channel.connector.messages(conversation)) - told_before == 1


def test_a_magic_code_typed_in_the_chat_signs_in(channel: Bench) -> None:
    # GIVEN Ada on a channel without verifyState (she types the code), with a card
    user, conversation, card = carded(channel)
    code = tokens_of(channel).open_sign_in_link(link_of(card))
    calls_before = channel.model.calls
    # WHEN she sends the six digits the sign-in page showed
    assert channel.post(said(channel, user, code, conversation=conversation)).status_code == 200
    # THEN she is signed in, told so, and the code reached no model
    assert tokens_of(channel).signed_in(user, SSO_CONNECTION)
    assert channel.connector.messages(conversation)[-1]["text"] == \
        SIGNED_IN.format(connection=SSO_CONNECTION)
    assert channel.model.calls == calls_before


def test_signout_signs_the_user_out_without_a_model_call(channel: Bench) -> None:
    # GIVEN Ada, signed in
    user, conversation = person(channel), f"a:{uuid.uuid4().hex}"
    tokens_of(channel).sign_in(user, SSO_CONNECTION)
    calls_before = channel.model.calls
    # WHEN she sends /signout
    assert channel.post(said(channel, user, "/signout", conversation=conversation)).status_code == 200
    # THEN she is signed out and told so, with no model call
    assert not tokens_of(channel).signed_in(user, SSO_CONNECTION)
    assert channel.connector.messages(conversation)[-1]["text"] == SIGNED_OUT
    assert channel.model.calls == calls_before
    # AND her next tool call asks her to sign in again
    whoami_then_answer(channel)
    channel.post(said(channel, user, "who am I?", conversation=conversation))
    assert len(cards(channel, conversation)) == 1


def test_in_a_group_chat_the_card_goes_to_the_user_who_must_sign_in(channel: Bench) -> None:
    # GIVEN Ada in a group chat, not signed in
    user, group = person(channel), f"19:{uuid.uuid4().hex}@thread.v2"
    whoami_then_answer(channel)
    # WHEN her message makes the model call whoami
    assert channel.post(said(channel, user, "who am I?", conversation=group,
                             group=True)).status_code == 200
    # THEN the card went to her one-to-one chat with the bot, not to the group
    personal = channel.connector.personal[user]
    (card,) = cards(channel, personal)
    assert cards(channel, group) == [] and card["recipient"]["id"] == user
    # AND the group was told, with an @mention of her
    notes = [m for m in channel.connector.messages(group) if m.get("entities") and
             m["entities"][0].get("type") == "mention"]
    assert notes and notes[0]["entities"][0]["mentioned"]["id"] == user
    # WHEN she signs in from her own chat (Teams' silent exchange there)
    exchange_id = card["attachments"][0]["content"]["tokenExchangeResource"]["id"]
    response = channel.post(sign_in_invoke(
        channel, user, "signin/tokenExchange",
        {"id": exchange_id, "connectionName": SSO_CONNECTION,
         "token": tokens_of(channel).sso_token(user)}, conversation=personal))
    # THEN she is signed in
    assert response.status_code == 200 and tokens_of(channel).signed_in(user, SSO_CONNECTION)


def test_the_canary_no_token_or_code_in_logs_spans_history_or_storage(
        channel: Bench, collector: OtlpCollector) -> None:
    # GIVEN a full round: a card, a refused exchange, a magic code, a tool call with an exchanged
    # token, a sign-out
    user, conversation, card = carded(channel)
    tokens = tokens_of(channel)
    tokens.consent_required.add(user)
    assert channel.post(exchange(channel, user, card, conversation=conversation)).status_code == 412
    code = tokens.open_sign_in_link(link_of(card))
    channel.post(said(channel, user, code, conversation=conversation))
    whoami_then_answer(channel)
    channel.post(said(channel, user, "who am I now?", conversation=conversation))
    assert "You are Ada Lovelace" in tool_result(channel)
    channel.post(said(channel, user, "/signout", conversation=conversation))
    secrets = [*tokens.issued, *channel.identity.issued, code]
    assert len(secrets) >= 4
    # WHEN everything the bot kept or emitted is read
    time.sleep(0.5)  # the span processor exports every 200 ms
    places = {
        "log": channel.host.log_text(),
        "spans": json.dumps([[s.name, s.attributes] for s in collector.spans], default=str),
        "history": json.dumps(channel.history(conversation)),
        "storage": stored_text(channel),
    }
    # THEN no token and no magic code is in any of them
    for place, text in places.items():
        for secret in secrets:
            assert secret not in text, f"a token or code reached the {place}"
    # AND the places were really read (the turns are there)
    assert "who am I now?" in places["history"] and "who am I now?" in places["storage"]
    assert "chatstate.token_service GetToken" in places["spans"]



def test_a_users_removal_deletes_the_sign_ins_asked_of_them(channel: Bench) -> None:
    # GIVEN Ada with a card (a sign-in asked of her, kept in the sign-in table)
    user, _, _ = carded(channel)
    assert user in stored_text(channel)
    # WHEN she is removed through the operator API
    removed = channel.http.delete(f"{channel.host.url}/api/users/{quote(user, safe='')}")
    # THEN no row of the sign-in table names her any more
    assert removed.status_code == 200
    assert user not in stored_text(channel)
