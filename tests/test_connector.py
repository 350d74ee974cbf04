"""Outbound replies: tokens from a managed identity or a client secret, cached; errors typed."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import pytest
from azure.core.credentials import AccessToken

from devtools.fake_channel import FakeConnector, FakeIdentity
from shared.connector import BOTFRAMEWORK_SCOPE, BotConnector, build_token_source
from shared.errors import ConnectorError, SettingsError
from shared.settings import load_settings


class FakeManagedIdentity:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        self.calls.append(scopes)
        return AccessToken(f"mi-token-{len(self.calls)}", 4_102_444_800)


@pytest.fixture
async def connector() -> AsyncIterator[FakeConnector]:
    server = FakeConnector()
    await server.start()
    yield server
    await server.stop()


async def test_a_managed_identity_bot_replies_with_its_identitys_token(connector: FakeConnector) -> None:
    # GIVEN a UserAssignedMSI bot and a credential standing in for the managed identity
    settings = load_settings({"CLIENT_ID": "mi-client", "TENANT_ID": "t", "BOT_APP_TYPE": "UserAssignedMSI"})
    credential = FakeManagedIdentity()
    async with httpx2.AsyncClient() as http:
        tokens = build_token_source(settings.bot, http=http, credential=credential)
        bot = BotConnector(http=http, tokens=tokens)
        # WHEN two replies go out
        for text in ("one", "two"):
            await bot.send(service_url=connector.url, conversation_id="19:x@thread;messageid=1",
                           activity={"type": "message", "text": text})
    # THEN both carry the identity's token, asked for once, for the Bot Framework scope
    assert credential.calls == [(BOTFRAMEWORK_SCOPE,)]
    assert [r["authorization"] for r in connector.requests] == ["Bearer mi-token-1"] * 2
    assert connector.requests[0]["path"] == "/v3/conversations/19:x@thread;messageid=1/activities"


async def test_a_secret_bot_gets_a_client_credentials_token_once(connector: FakeConnector) -> None:
    identity = FakeIdentity()
    await identity.start()
    try:
        settings = load_settings({"CLIENT_ID": "app", "CLIENT_SECRET": "s", "TENANT_ID": "tenant-1",
                                  "BOT_APP_TYPE": "SingleTenant", "BOT_AUTHORITY_HOST": identity.url})
        async with httpx2.AsyncClient() as http:
            bot = BotConnector(http=http, tokens=build_token_source(settings.bot, http=http))
            for _ in range(3):
                await bot.send(service_url=connector.url, conversation_id="c", activity={"type": "message"})
        assert len(identity.token_requests) == 1
        assert identity.token_requests[0] == {"grant_type": "client_credentials", "client_id": "app",
                                              "client_secret": "s", "scope": BOTFRAMEWORK_SCOPE}
        assert len({r["authorization"] for r in connector.requests}) == 1
    finally:
        await identity.stop()


async def test_a_refusing_connector_is_a_typed_error(connector: FakeConnector) -> None:
    connector.statuses.append(503)
    async with httpx2.AsyncClient() as http:
        with pytest.raises(ConnectorError):
            await BotConnector(http=http, tokens=None).send(
                service_url=connector.url, conversation_id="c", activity={"type": "message"})
        with pytest.raises(ConnectorError):
            await BotConnector(http=http, tokens=None).send(
                service_url="http://127.0.0.1:9", conversation_id="c", activity={"type": "message"})


def test_a_secret_bot_without_a_secret_fails_start_up() -> None:
    settings = load_settings({"CLIENT_ID": "app"})
    with pytest.raises(SettingsError) as caught:
        build_token_source(settings.bot, http=httpx2.AsyncClient())
    assert caught.value.setting == "CLIENT_SECRET"
