"""Tools that act as the user (shared/user_tokens.py): the user's token fetched once per turn,
exchanged on-behalf-of at the identity stand-in for a tool's audience, sent to that MCP server
only, and the sign-in asked for when there is none."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from devtools.fake_channel import FakeIdentity
from devtools.fake_model import FakeModelServer, Scripted, tool_call
from devtools.fake_token_service import Connection, FakeTokenService
from devtools.local_server import loopback_certificate
from devtools.mcp_server import BearerCheck, DemoMcpServer
from shared.activity import Activity, parse_activity
from shared.errors import SignInRequired, TokenServiceError
from shared.mcp import McpTools
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import McpServerSettings, SignInSettings, UserAccess, load_settings
from shared.token_service import TokenService
from shared.tools import tool
from shared.user_tokens import UserTokens, user_token
from tests.e2e.channel import event

USER = "29:user-1"
SSO_APP = "sso-app"
MCP_AUDIENCE = "api://mcp-demo"


@dataclass
class Parts:
    identity: FakeIdentity
    tokens: FakeTokenService
    users: UserTokens
    asked: list[str]


async def _bot_token() -> str:
    return "bot-token"


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    certificate = loopback_certificate(tmp_path)
    identity = FakeIdentity(certificate=certificate)
    identity.obo_apps[SSO_APP] = "sso-secret"
    # The token service's tokens are Entra's: signed with the identity stand-in's key, for the app.
    tokens = FakeTokenService([Connection(name="graph", audience=f"api://botid-{SSO_APP}")],
                              signing_key=identity.keys["entra-key-1"], kid="entra-key-1",
                              tenant_id=identity.tenant_id)
    await identity.start()
    await tokens.start()
    asked: list[str] = []

    async def ask(activity: Activity, connection: str) -> None:
        asked.append(connection)

    service = TokenService(tokens.url, bot_token=_bot_token)
    users = UserTokens(service=service, settings=SignInSettings(app_id=SSO_APP,
                                                                app_secret="sso-secret"),
                       tenant_id="tenant-1", authority_host=identity.url, ask=ask,
                       credential_options={"connection_verify": str(certificate)})
    try:
        yield Parts(identity=identity, tokens=tokens, users=users, asked=asked)
    finally:
        await users.close()
        await tokens.stop()
        await identity.stop()


def activity(user: str = USER) -> Activity:
    body = event("message", text="hi", conversation_id="a:1", id="m1",
                 serviceUrl="http://127.0.0.1:9")
    body["from"]["id"] = user
    return parse_activity(json.dumps(body).encode(), {"Content-Type": "application/json"})


async def test_the_users_token_is_fetched_once_a_turn_and_exchanged_for_the_audience(
        parts: Parts) -> None:
    # GIVEN Ada signed in to "graph"
    parts.tokens.user(USER, "Ada Lovelace")
    raw = parts.tokens.sign_in(USER, "graph")
    plain = UserAccess(connection="graph")
    exchanged = UserAccess(connection="graph", scope=f"{MCP_AUDIENCE}/.default")
    # WHEN one turn asks three times for the plain token and twice for the exchanged one
    with parts.users.acting(activity()):
        first = [await user_token(plain) for _ in range(3)]
        second = [await user_token(exchanged) for _ in range(2)]
    # THEN the token service was asked once and Entra once: nothing more for the turn
    assert len(parts.tokens.requests) == 1
    assert [r["grant_type"] for r in parts.identity.token_requests] == [
        "urn:ietf:params:oauth:grant-type:jwt-bearer"]
    # AND the plain token is the connection's; the exchanged one is Ada's, for the audience only
    assert first == [raw] * 3
    claims = jwt.decode(second[0], options={"verify_signature": False})
    assert claims["aud"] == MCP_AUDIENCE and claims["name"] == "Ada Lovelace"
    assert second == [second[0]] * 2 and second[0] in parts.identity.issued
    # WHEN a new turn runs THEN it asks again (nothing was kept)
    with parts.users.acting(activity()):
        await user_token(plain)
    assert len(parts.tokens.requests) == 2


async def test_a_user_who_is_not_signed_in_is_asked_once_a_turn(parts: Parts) -> None:
    # GIVEN a user with no token
    access = UserAccess(connection="graph")
    # WHEN one turn's tools ask twice
    with parts.users.acting(activity()):
        for _ in range(2):
            with pytest.raises(SignInRequired, match="graph"):
                await user_token(access)
    # THEN the card was asked for once
    assert parts.asked == ["graph"]
    # AND with no turn at all there is no user to act for
    with pytest.raises(SignInRequired):
        await user_token(access)


async def test_a_refused_exchange_is_an_error_that_carries_no_token(parts: Parts) -> None:
    # GIVEN a signed-in user, and an app secret Entra does not accept
    raw = parts.tokens.sign_in(USER, "graph")
    parts.identity.obo_apps[SSO_APP] = "another-secret"
    # WHEN the exchange runs THEN it fails naming Entra's code, not the token
    with parts.users.acting(activity()):
        with pytest.raises(TokenServiceError, match="AADSTS7000215") as caught:
            await user_token(UserAccess(connection="graph", scope=f"{MCP_AUDIENCE}/.default"))
    assert raw not in str(caught.value)


async def test_an_mcp_server_that_acts_as_the_user_gets_their_token_and_only_it_does(
        parts: Parts) -> None:
    # GIVEN a demo MCP server checking bearer tokens for its audience (whoami), as "me"
    # (asUser, exchanged for its audience), and another one as "docs" (no user)
    parts.tokens.user(USER, "Ada Lovelace")
    parts.tokens.sign_in(USER, "graph")
    mcp = await DemoMcpServer(bearer=BearerCheck(
        audience=MCP_AUDIENCE, keys=(parts.identity.keys["entra-key-1"].public_key(),))).start()
    docs = await DemoMcpServer().start()
    servers = [McpServerSettings(name="me", url=mcp.url, tools=("whoami",), timeout_seconds=5, trusted=True,
                                 as_user=UserAccess(connection="graph",
                                                    scope=f"{MCP_AUDIENCE}/.default")),
               McpServerSettings(name="docs", url=docs.url, tools=("search_docs",), trusted=True,
                                 timeout_seconds=5)]
    tools = McpTools(servers)
    async with FakeModelServer() as model:
        model.then(Scripted(tool_calls=[tool_call("whoami", {}, "w1"),
                                        tool_call("search_docs", {"query": "mcp"}, "s1")]),
                   Scripted(content="done"))
        prompt = ChatPrompt(build_model(load_settings({"OPENAI_BASE_URL": model.base_url,
                                                       "OPENAI_MODEL": "m"}).model),
                            tool_sources=[tools])
        try:
            # WHEN a turn acting for Ada calls both tools
            with parts.users.acting(activity()):
                await prompt.send("who am I, and what is MCP?")
        finally:
            await tools.close()
            await prompt.model.close()
            await mcp.stop()
            await docs.stop()
        results = {m["tool_call_id"]: m["content"] for m in model.requests[1]["messages"]
                   if m["role"] == "tool"}
    # THEN whoami saw Ada's token for its audience
    assert "You are Ada Lovelace (ada@contoso.example); the token was issued for api://mcp-demo" \
        in results["w1"]
    # AND the other server answered, and none of its requests carried any token
    assert "pages found" in results["s1"] and docs.headers
    assert all("authorization" not in headers for headers in docs.headers)
    # AND the discovery of "me" (tools/list) carried no user token either: only its tool call did
    assert "authorization" not in mcp.headers[0]


async def test_whoami_refuses_a_call_without_the_users_token() -> None:
    # GIVEN the demo server's whoami, called by a server entry that does not act as the user
    mcp = await DemoMcpServer(bearer=BearerCheck(audience=MCP_AUDIENCE, keys=())).start()
    tools = McpTools([McpServerSettings(name="demo", url=mcp.url, tools=("whoami",), trusted=True,
                                        timeout_seconds=5)])
    try:
        (function,) = await tools.functions()
        # WHEN it is called THEN the server refuses it: no bearer token came
        with pytest.raises(Exception, match="needs the user's own token"):
            await tools.servers[0].call("whoami", {})
    finally:
        await tools.close()
        await mcp.stop()
    assert function.as_user is None


@tool(as_user=UserAccess(connection="graph"))
async def my_token_length() -> int:
    """How long the user's token is (a Python tool that acts as the user)."""
    return len(await user_token())


async def test_a_python_tool_that_acts_as_the_user_gets_the_token_or_tells_the_model(
        parts: Parts) -> None:
    # GIVEN a Python tool declaring the "graph" connection, and a model that calls it twice
    async with FakeModelServer() as model:
        model.then(Scripted(tool_calls=[tool_call("my_token_length", {}, "t1")]),
                   Scripted(content="first"),
                   Scripted(tool_calls=[tool_call("my_token_length", {}, "t2")]),
                   Scripted(content="second"))
        prompt = ChatPrompt(build_model(load_settings({"OPENAI_BASE_URL": model.base_url,
                                                       "OPENAI_MODEL": "m"}).model),
                            functions=[my_token_length])
        try:
            # WHEN a turn runs while the user is not signed in, then one after they sign in
            with parts.users.acting(activity()):
                await prompt.send("how long?")
            raw = parts.tokens.sign_in(USER, "graph")
            with parts.users.acting(activity()):
                await prompt.send("and now?")
        finally:
            await prompt.model.close()
        first = model.requests[1]["messages"][-1]["content"]
        second = model.requests[3]["messages"][-1]["content"]
    # THEN the model was told the user must sign in (a card was sent), then got the answer
    assert "not signed in" in first and "sign-in card" in first and parts.asked == ["graph"]
    assert second == str(len(raw))


async def test_whether_the_user_is_signed_in_is_asked_without_a_card(parts: Parts) -> None:
    # GIVEN a turn acting for a user who is not signed in
    with parts.users.acting(activity()) as acting:
        # WHEN the turn asks whether they are THEN no, and no card was asked for
        assert not await acting.signed_in("graph")
        assert parts.asked == []
        # WHEN they sign in meanwhile THEN yes, and the token is kept for the turn's tools
        raw = parts.tokens.sign_in(USER, "graph")
        assert await acting.signed_in("graph")
        requests = len(parts.tokens.requests)
        assert await user_token(UserAccess(connection="graph")) == raw
        assert len(parts.tokens.requests) == requests
