"""Outbound activities through the Bot Connector REST API, with the bot's own token.

Tokens for `https://api.botframework.com/.default` come from azure-identity, which caches them
until shortly before they expire: a `ClientSecretCredential` (authority `BOT_AUTHORITY_HOST`,
tenant `TENANT_ID`, or `botframework.com` for a multi-tenant bot) or the
`ManagedIdentityCredential`. Requests go over one aiohttp session with a total deadline; the URL
is sent as built, so the percent-escapes of a Teams conversation ID (%3A, %3B) reach the
connector unchanged. Replies go only to a service URL the inbound check trusted.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import yarl
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import AzureError

from . import telemetry
from .errors import ConnectorError
from .settings import BotAppType, BotSettings, check_credential_settings

__all__ = ["BOTFRAMEWORK_SCOPE", "BotConnector", "build_credential"]

log = logging.getLogger(__name__)

BOTFRAMEWORK_SCOPE = "https://api.botframework.com/.default"


def build_credential(settings: BotSettings, *,
                     credential: AsyncTokenCredential | None = None) -> AsyncTokenCredential | None:
    """How replies authenticate; None when the bot has no identity (auth off, local only).

    `credential` replaces the managed identity (a test seam)."""
    if not settings.client_id:
        return None
    if settings.app_type is BotAppType.USER_ASSIGNED_MSI:
        if credential is not None:
            return credential
        from azure.identity.aio import ManagedIdentityCredential

        return ManagedIdentityCredential(client_id=settings.client_id)
    check_credential_settings(settings)  # raises SettingsError without a secret
    assert settings.client_secret is not None
    from azure.identity.aio import ClientSecretCredential

    tenant = settings.tenant_id if settings.app_type is BotAppType.SINGLE_TENANT else \
        (settings.tenant_id or "botframework.com")
    return ClientSecretCredential(tenant or "botframework.com", settings.client_id,
                                  settings.client_secret, authority=settings.authority_host)


class BotConnector:
    def __init__(self, *, credential: AsyncTokenCredential | None, timeout_seconds: float = 10.0,
                 env_proxy: bool = False,
                 reply_allowed: Callable[[str], bool] | None = None) -> None:
        """`reply_allowed`: whether a service URL may get our activities and token (the reply
        allow-list, `shared.auth.reply_policy`), checked here, where the token is sent."""
        self._credential = credential
        self._reply_allowed = reply_allowed
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._env_proxy = env_proxy
        self._session: aiohttp.ClientSession | None = None

    async def send(self, *, service_url: str, conversation_id: str,
                   activity: dict[str, Any]) -> str | None:
        """POST `activity` to the conversation; the new activity's ID if the channel gave one."""
        kind = (activity.get("channelData") or {}).get("streamType") or activity.get("type", "")
        with telemetry.span("chatstate.reply", {"chatstate.reply.kind": str(kind)}):
            return await self._send(service_url, conversation_id, activity)

    async def update(self, *, service_url: str, conversation_id: str, activity_id: str,
                     activity: dict[str, Any]) -> None:
        """PUT `activity` in place of the one we sent as `activity_id` (a card's new state)."""
        with telemetry.span("chatstate.reply", {"chatstate.reply.kind": "update"}):
            await self._send(service_url, conversation_id, activity, activity_id=activity_id)

    async def _send(self, service_url: str, conversation_id: str, activity: dict[str, Any], *,
                    activity_id: str | None = None) -> str | None:
        if self._reply_allowed is not None and not self._reply_allowed(service_url):
            raise ConnectorError("the serviceUrl is not allowed for replies (BOT_SERVICE_URL_HOSTS); "
                                 "nothing was sent")
        url = f"{service_url.rstrip('/')}/v3/conversations/{quote(conversation_id, safe='')}/activities"
        if activity_id is not None:
            url += f"/{quote(activity_id, safe='')}"
        headers = {"Content-Type": "application/json"}
        if self._credential is not None:
            headers["Authorization"] = f"Bearer {await self._token()}"
        try:
            async with self._client().request(
                    "PUT" if activity_id is not None else "POST", yarl.URL(url, encoded=True),
                    headers=headers, data=json.dumps(activity, ensure_ascii=False).encode(),
                    allow_redirects=False) as response:
                status, body = response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ConnectorError(f"cannot reach the Bot Connector at {service_url}: "
                                 f"{type(exc).__name__} {exc}") from exc
        if status >= 300:
            detail = body[:500].decode("utf-8", "replace")
            raise ConnectorError(f"the Bot Connector answered {status}: {detail}",
                                 answer=(status, detail))
        try:
            answer = json.loads(body) if body else None
        except ValueError:
            return None
        return (str(answer.get("id") or "") or None) if isinstance(answer, dict) else None

    async def token(self) -> str | None:
        """The bot's token for the Bot Connector's hosts (attachments there need it); None
        when the bot has no identity."""
        return await self._token() if self._credential is not None else None

    async def _token(self) -> str:
        assert self._credential is not None
        try:
            return (await self._credential.get_token(BOTFRAMEWORK_SCOPE)).token
        except (AzureError, ValueError) as exc:
            raise ConnectorError(f"cannot get a Bot Framework token: {exc}") from exc

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # trust_env (proxy variables) costs two thread hops per request: only when one is set.
            self._session = aiohttp.ClientSession(timeout=self._timeout, trust_env=self._env_proxy,
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._credential is not None:
            await self._credential.close()
