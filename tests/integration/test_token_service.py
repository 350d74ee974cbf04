"""The token service client against the stand-in that enforces the protocol: every status path,
the magic code's rules, single sign-on exchanges, and errors that never carry a token or a code."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

import pytest

from devtools.fake_token_service import Connection, FakeTokenService
from shared.activity import Activity, parse_activity
from shared.errors import TokenServiceError
from shared.token_service import TokenService, UserToken, sign_in_state
from tests.e2e.channel import event

USER = "29:user-1"
APP_ID = "bot-app-id"
EXCHANGE_URI = "api://botid-sso-app"


@pytest.fixture
async def stand_in() -> AsyncIterator[FakeTokenService]:
    service = FakeTokenService([Connection(name="graph", audience="api://graph-ish",
                                           exchange_uri=EXCHANGE_URI),
                                Connection(name="tickets", audience="api://tickets")],
                               app_id=APP_ID)
    async with service:
        yield service


def client_for(stand_in: FakeTokenService, *, bot_token: str | None = "bot-token",
               timeout: float = 2.0) -> TokenService:
    async def token() -> str | None:
        return bot_token

    return TokenService(stand_in.url, bot_token=token, timeout_seconds=timeout)


@pytest.fixture
async def client(stand_in: FakeTokenService) -> AsyncIterator[TokenService]:
    service = client_for(stand_in)
    try:
        yield service
    finally:
        await service.close()


def activity(**fields: object) -> Activity:
    body = event("message", text="hi", conversation_id="conv-1", id="act-1",
                 serviceUrl="https://smba.trafficmanager.net/teams/", **fields)
    return parse_activity(json.dumps(body).encode(), {"Content-Type": "application/json"})


async def test_get_token_is_the_users_token_when_signed_in_and_none_when_not(
        stand_in: FakeTokenService, client: TokenService) -> None:
    # GIVEN a user signed in to one connection only
    issued = stand_in.sign_in(USER, "tickets")
    # WHEN the bot asks for both
    found = await client.get_token(user_id=USER, connection="tickets", channel_id="msteams")
    missing = await client.get_token(user_id=USER, connection="graph", channel_id="msteams")
    # THEN it has the one token (200) and None for the other (404)
    assert isinstance(found, UserToken) and found.token == issued and found.connection == "tickets"
    assert found.expiration and missing is None
    # AND every call carried the bot's token and the fields the protocol wants
    assert {r["authorization"] for r in stand_in.requests} == {"Bearer bot-token"}
    assert stand_in.requests[0]["query"] == {"userId": USER, "connectionName": "tickets",
                                             "channelId": "msteams"}
    # AND the token never shows in the object's repr (so in no log line)
    assert issued not in repr(found)


@pytest.mark.parametrize("status, said", [(500, "answered 500"), (503, "answered 503"),
                                          (401, "refused the bot's token"),
                                          (403, "refused the bot's token"),
                                          (429, "answered 429")])
async def test_an_unplanned_status_is_a_token_service_error_naming_it(
        stand_in: FakeTokenService, client: TokenService, status: int, said: str) -> None:
    # GIVEN a token service that fails the next call
    stand_in.sign_in(USER, "tickets")
    stand_in.fail_next.append(status)
    # WHEN the bot asks for a token THEN it gets a TokenServiceError that says what happened
    with pytest.raises(TokenServiceError, match=said):
        await client.get_token(user_id=USER, connection="tickets", channel_id="msteams")


async def test_an_unknown_connection_and_a_missing_bot_token_are_refused(
        stand_in: FakeTokenService) -> None:
    # GIVEN a client with no bot token, and one with a token
    anonymous, client = client_for(stand_in, bot_token=None), client_for(stand_in)
    try:
        # WHEN the anonymous one asks THEN the service's 401 is a TokenServiceError
        with pytest.raises(TokenServiceError, match="refused the bot's token"):
            await anonymous.get_token(user_id=USER, connection="tickets", channel_id="msteams")
        # WHEN a connection the bot does not have is named THEN its 400 is one too
        with pytest.raises(TokenServiceError, match="answered 400"):
            await client.get_token(user_id=USER, connection="nope", channel_id="msteams")
    finally:
        await anonymous.close()
        await client.close()


async def test_a_slow_or_unreachable_service_costs_at_most_the_deadline(
        stand_in: FakeTokenService) -> None:
    # GIVEN a service slower than the client's deadline
    stand_in.delay = 2.0
    client = client_for(stand_in, timeout=0.2)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        # WHEN the bot asks THEN it gives up with a TokenServiceError at its deadline
        with pytest.raises(TokenServiceError, match=r"took over 0\.2 s"):
            await client.get_token(user_id=USER, connection="tickets", channel_id="msteams")
        assert loop.time() - started < 1.5
    finally:
        await client.close()
    # AND a service that is not there at all is one too
    gone = TokenService("http://127.0.0.1:9", bot_token=lambda: asyncio.sleep(0, "t"),
                        timeout_seconds=1)
    try:
        with pytest.raises(TokenServiceError, match="cannot reach"):
            await gone.get_token(user_id=USER, connection="tickets", channel_id="msteams")
    finally:
        await gone.close()


async def test_a_magic_code_signs_the_user_in_once_and_only_them(
        stand_in: FakeTokenService, client: TokenService) -> None:
    # GIVEN a sign-in resource for the user (a card), and the code its page showed
    resource = await client.sign_in_resource(
        state=sign_in_state(activity(), connection="tickets", app_id=APP_ID))
    code = stand_in.open_sign_in_link(resource.sign_in_link)
    # WHEN another user presents the code THEN nothing is signed in
    assert await client.get_token(user_id="29:other", connection="tickets", channel_id="msteams",
                                  code=code) is None
    # WHEN a wrong code is given THEN nothing either
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    assert await client.get_token(user_id=USER, connection="tickets", channel_id="msteams",
                                  code=wrong) is None
    # WHEN the user presents it THEN they are signed in
    found = await client.get_token(user_id=USER, connection="tickets", channel_id="msteams",
                                   code=code)
    assert found is not None and stand_in.signed_in(USER, "tickets")
    # AND the code cannot be used twice, and never reached the stand-in's request log
    await client.sign_out(user_id=USER, channel_id="msteams")
    assert await client.get_token(user_id=USER, connection="tickets", channel_id="msteams",
                                  code=code) is None
    assert code not in json.dumps(stand_in.requests)


async def test_an_expired_magic_code_is_refused(stand_in: FakeTokenService,
                                                client: TokenService) -> None:
    # GIVEN a code, and a clock six minutes later
    resource = await client.sign_in_resource(
        state=sign_in_state(activity(), connection="tickets", app_id=APP_ID))
    code = stand_in.open_sign_in_link(resource.sign_in_link)
    later = stand_in.clock() + 360
    stand_in.clock = lambda: later
    # WHEN it is presented THEN it signs no one in
    assert await client.get_token(user_id=USER, connection="tickets", channel_id="msteams",
                                  code=code) is None


async def test_a_teams_sso_token_is_exchanged_for_this_user_only(
        stand_in: FakeTokenService, client: TokenService) -> None:
    # GIVEN Teams' SSO tokens: the user's for the app, another user's, and one for another app
    mine = stand_in.sso_token(USER)
    theirs = stand_in.sso_token("29:other")
    elsewhere = stand_in.sso_token(USER, audience="api://another-app")
    # WHEN each is exchanged for the user THEN only theirs, for the app, works (400 otherwise)
    assert await client.exchange(user_id=USER, connection="graph", channel_id="msteams",
                                 token=theirs) is None
    assert await client.exchange(user_id=USER, connection="graph", channel_id="msteams",
                                 token=elsewhere) is None
    assert not stand_in.signed_in(USER, "graph")
    exchanged = await client.exchange(user_id=USER, connection="graph", channel_id="msteams",
                                      token=mine)
    assert exchanged is not None and stand_in.signed_in(USER, "graph")
    # AND a connection without a Token Exchange URL exchanges nothing
    assert await client.exchange(user_id=USER, connection="tickets", channel_id="msteams",
                                 token=mine) is None


async def test_an_exchange_needing_consent_is_not_exchanged(
        stand_in: FakeTokenService, client: TokenService) -> None:
    # GIVEN a user who has not consented to the app
    stand_in.consent_required.add(USER)
    # WHEN their SSO token is exchanged THEN the answer is "not exchanged", not an error
    assert await client.exchange(user_id=USER, connection="graph", channel_id="msteams",
                                 token=stand_in.sso_token(USER)) is None
    # AND a 5xx is an error, not "not exchanged"
    stand_in.fail_next.append(502)
    with pytest.raises(TokenServiceError, match="answered 502"):
        await client.exchange(user_id=USER, connection="graph", channel_id="msteams",
                              token=stand_in.sso_token(USER))


async def test_sign_out_forgets_one_connection_or_all(stand_in: FakeTokenService,
                                                      client: TokenService) -> None:
    # GIVEN a user signed in to two connections
    stand_in.sign_in(USER, "graph")
    stand_in.sign_in(USER, "tickets")
    # WHEN signed out of one THEN only that one is gone
    await client.sign_out(user_id=USER, channel_id="msteams", connection="graph")
    assert not stand_in.signed_in(USER, "graph") and stand_in.signed_in(USER, "tickets")
    # WHEN signed out of all THEN nothing is left
    await client.sign_out(user_id=USER, channel_id="msteams")
    assert not stand_in.signed_in(USER, "tickets")
    assert stand_in.requests[-1]["query"] == {"userId": USER, "channelId": "msteams"}


async def test_the_sign_in_resource_needs_a_real_state(stand_in: FakeTokenService,
                                                      client: TokenService) -> None:
    # GIVEN the state of a Teams message, for the SSO connection
    state = sign_in_state(activity(), connection="graph", app_id=APP_ID)
    decoded = json.loads(base64.b64decode(state))
    assert decoded["connectionName"] == "graph" and decoded["msAppId"] == APP_ID
    assert decoded["conversation"]["user"]["id"] == USER
    # WHEN the resource is asked for THEN it has a link and Teams' exchange resource
    resource = await client.sign_in_resource(state=state)
    assert resource.sign_in_link.startswith(f"{stand_in.url}/signin?")
    assert resource.exchange is not None and resource.exchange.uri == EXCHANGE_URI
    # WHEN the state is not one (or is another bot's) THEN the 400 is a TokenServiceError
    with pytest.raises(TokenServiceError, match="answered 400"):
        await client.sign_in_resource(state="bm90IGpzb24=")
    with pytest.raises(TokenServiceError, match="answered 400"):
        await client.sign_in_resource(
            state=sign_in_state(activity(), connection="graph", app_id="another-bot"))
