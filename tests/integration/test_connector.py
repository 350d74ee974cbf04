"""Outbound replies: azure-identity tokens (managed identity or client secret), escapes kept, errors
typed; against a local Bot Connector and identity provider."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from azure.core.credentials import AccessToken
from azure.identity.aio import ClientSecretCredential, ManagedIdentityCredential

from devtools.fake_channel import FakeConnector, FakeIdentity
from devtools.local_server import loopback_certificate
from shared.connector import BOTFRAMEWORK_SCOPE, BotConnector, build_credential
from shared.errors import ConnectorError, SettingsError
from shared.settings import load_settings


class FakeManagedIdentity:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        self.calls.append(scopes)
        return AccessToken(f"mi-token-{len(self.calls)}", 4_102_444_800)

    async def close(self) -> None:
        pass


@pytest.fixture
async def connector() -> AsyncIterator[FakeConnector]:
    server = FakeConnector()
    await server.start()
    yield server
    await server.stop()


async def test_a_reply_carries_the_credentials_token_to_the_conversation_as_escaped(
        connector: FakeConnector) -> None:
    # GIVEN a connector with a credential standing in for the managed identity
    credential = FakeManagedIdentity()
    bot = BotConnector(credential=credential)  # type: ignore[arg-type]
    try:
        # WHEN a reply goes to a Teams conversation whose ID holds ':' and ';' escapes
        await bot.send(service_url=connector.url, conversation_id="a:1%3Ab;messageid=1",
                       activity={"type": "message", "text": "one"})
    finally:
        await bot.close()
    # THEN it carries the identity's token for the Bot Framework scope, and the ID's escapes (and
    # our own escape of its '%') reached the connector as sent, not decoded
    assert credential.calls == [(BOTFRAMEWORK_SCOPE,)]
    assert connector.requests[0]["authorization"] == "Bearer mi-token-1"
    assert connector.requests[0]["raw_path"] == "/v3/conversations/a%3A1%253Ab%3Bmessageid%3D1/activities"


async def test_a_secret_bots_token_comes_from_the_authority_once(
        connector: FakeConnector, tmp_path: Path) -> None:
    # GIVEN an identity provider over HTTPS (azure-identity sends secrets to https only) and a
    # client-secret credential against it
    certificate = loopback_certificate(tmp_path)
    identity = FakeIdentity(certificate=certificate)
    await identity.start()
    credential = ClientSecretCredential("tenant-1", "app", "s", authority=identity.url,
                                        connection_verify=str(certificate))
    bot = BotConnector(credential=credential)
    try:
        # WHEN three replies go out
        for _ in range(3):
            await bot.send(service_url=connector.url, conversation_id="c", activity={"type": "message"})
    finally:
        await bot.close()
        await identity.stop()
    # THEN one client-credentials grant was made, and its token reused from azure-identity's cache
    assert len(identity.token_requests) == 1
    assert identity.token_requests[0] == {"grant_type": "client_credentials", "client_id": "app",
                                          "client_secret": "s", "scope": BOTFRAMEWORK_SCOPE}
    assert len({r["authorization"] for r in connector.requests}) == 1


def test_the_settings_choose_the_credential() -> None:
    # GIVEN each kind of bot WHEN its credential is built THEN it is the one its settings name
    assert build_credential(load_settings({}).bot) is None
    managed = build_credential(load_settings(
        {"CLIENT_ID": "mi", "TENANT_ID": "t", "BOT_APP_TYPE": "UserAssignedMSI"}).bot)
    assert isinstance(managed, ManagedIdentityCredential)
    for app_type, tenant in (("MultiTenant", "botframework.com"), ("SingleTenant", "t-1")):
        secret = build_credential(load_settings({
            "CLIENT_ID": "app", "CLIENT_SECRET": "s", "TENANT_ID": "t-1" if app_type != "MultiTenant" else "",
            "BOT_APP_TYPE": app_type, "BOT_AUTHORITY_HOST": "https://login.microsoftonline.us"}).bot)
        assert isinstance(secret, ClientSecretCredential)
        assert secret._client._tenant_id == tenant  # type: ignore[attr-defined]
        assert secret._client._authority == "https://login.microsoftonline.us"  # type: ignore[attr-defined]


async def test_a_refusing_or_missing_connector_is_a_typed_error_naming_the_cause(
        connector: FakeConnector) -> None:
    # GIVEN a connector that answers 503, and an address where nothing listens
    connector.statuses.append(503)
    bot = BotConnector(credential=None)
    try:
        # WHEN replies go to each THEN each is a ConnectorError saying what happened
        with pytest.raises(ConnectorError, match="answered 503"):
            await bot.send(service_url=connector.url, conversation_id="c", activity={"type": "message"})
        with pytest.raises(ConnectorError, match=r"cannot reach the Bot Connector at http://127\.0\.0\.1:9"):
            await bot.send(service_url="http://127.0.0.1:9", conversation_id="c",
                           activity={"type": "message"})
    finally:
        await bot.close()


def test_a_secret_bot_without_a_secret_fails_start_up() -> None:
    settings = load_settings({"CLIENT_ID": "app"})
    with pytest.raises(SettingsError) as caught:
        build_credential(settings.bot)
    assert caught.value.setting == "CLIENT_SECRET"
