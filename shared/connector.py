"""Outbound replies through the Bot Connector REST API, with the bot's own token.

Tokens for `https://api.botframework.com/.default` come from the client secret (client-credentials
grant at `<authority>/<TENANT_ID or botframework.com>/oauth2/v2.0/token`) or from a managed identity
(azure-identity), and are cached until five minutes before they expire. Replies go only to a
service URL the inbound check trusted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol
from urllib.parse import quote

import httpx2

from .errors import ConnectorError, SettingsError
from .settings import BotAppType, BotSettings

__all__ = ["BOTFRAMEWORK_SCOPE", "BotConnector", "ClientSecretTokens", "CredentialTokens",
           "TokenSource", "build_token_source"]

log = logging.getLogger(__name__)

BOTFRAMEWORK_SCOPE = "https://api.botframework.com/.default"
_REFRESH_MARGIN_SECONDS = 300


class TokenSource(Protocol):
    async def token(self) -> str: ...


class _CachedToken:
    def __init__(self) -> None:
        self._value = ""
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    async def get(self, fetch: Any) -> str:
        if time.time() < self._expires_at - _REFRESH_MARGIN_SECONDS:
            return self._value
        async with self._lock:
            if time.time() >= self._expires_at - _REFRESH_MARGIN_SECONDS:
                self._value, self._expires_at = await fetch()
        return self._value


class _CachingTokens:
    """A token source that fetches with `_fetch` and keeps the token until near its expiry."""

    def __init__(self) -> None:
        self._cache = _CachedToken()

    async def token(self) -> str:
        return await self._cache.get(self._fetch)

    async def _fetch(self) -> tuple[str, float]:
        raise NotImplementedError


class ClientSecretTokens(_CachingTokens):
    """The client-credentials grant for a bot with a client secret."""

    def __init__(self, *, client_id: str, client_secret: str, authority: str,
                 http: httpx2.AsyncClient) -> None:
        super().__init__()
        self._client_id, self._secret, self._authority = client_id, client_secret, authority
        self._http = http

    async def _fetch(self) -> tuple[str, float]:
        try:
            response = await self._http.post(f"{self._authority}/oauth2/v2.0/token", data={
                "grant_type": "client_credentials", "client_id": self._client_id,
                "client_secret": self._secret, "scope": BOTFRAMEWORK_SCOPE})
            response.raise_for_status()
            body = response.json()
            return str(body["access_token"]), time.time() + float(body.get("expires_in", 3600))
        except (httpx2.HTTPError, ValueError, KeyError) as exc:
            raise ConnectorError(f"cannot get a Bot Framework token: {exc}") from exc


class CredentialTokens(_CachingTokens):
    """Tokens from an azure-identity async credential (the managed identity in Azure)."""

    def __init__(self, credential: Any) -> None:
        super().__init__()
        self._credential = credential

    async def _fetch(self) -> tuple[str, float]:
        try:
            access = await self._credential.get_token(BOTFRAMEWORK_SCOPE)
        except Exception as exc:
            raise ConnectorError(f"the managed identity gave no token: {exc}") from exc
        return str(access.token), float(access.expires_on)


def build_token_source(settings: BotSettings, *, http: httpx2.AsyncClient,
                       credential: Any | None = None) -> TokenSource | None:
    """How replies authenticate; None when the bot has no identity (auth off, local only)."""
    if not settings.client_id:
        return None
    if settings.app_type is BotAppType.USER_ASSIGNED_MSI:
        if credential is None:
            from azure.identity.aio import ManagedIdentityCredential

            credential = ManagedIdentityCredential(client_id=settings.client_id)
        return CredentialTokens(credential)
    if not settings.client_secret:
        raise SettingsError("CLIENT_SECRET", f"is required when BOT_APP_TYPE is "
                            f"{settings.app_type.value} (or use UserAssignedMSI)")
    tenant = settings.tenant_id if settings.app_type is BotAppType.SINGLE_TENANT else \
        (settings.tenant_id or "botframework.com")
    return ClientSecretTokens(client_id=settings.client_id, client_secret=settings.client_secret,
                              authority=f"{settings.authority_host}/{tenant}", http=http)


class BotConnector:
    def __init__(self, *, http: httpx2.AsyncClient, tokens: TokenSource | None) -> None:
        self._http = http
        self._tokens = tokens

    async def send(self, *, service_url: str, conversation_id: str, activity: dict[str, Any]) -> str | None:
        """POST `activity` to the conversation; returns the new activity ID if the channel gave one."""
        url = f"{service_url.rstrip('/')}/v3/conversations/{quote(conversation_id, safe='')}/activities"
        headers = {"Content-Type": "application/json"}
        if self._tokens is not None:
            headers["Authorization"] = f"Bearer {await self._tokens.token()}"
        try:
            response = await self._http.post(url, json=activity, headers=headers)
        except httpx2.HTTPError as exc:
            raise ConnectorError(f"cannot reach the Bot Connector at {service_url}: {exc}") from exc
        if response.status_code >= 300:
            raise ConnectorError(f"the Bot Connector answered {response.status_code}")
        try:
            body = response.json()
        except ValueError:
            return None
        return (str(body.get("id") or "") or None) if isinstance(body, dict) else None
