"""The Bot Service token service client: users' tokens for the bot's OAuth connections.

Written here (four calls over aiohttp, as the connector's) rather than taken from the Agents SDK
or botbuilder: their user-token clients log each call's parameters and body at INFO, a Teams SSO
token and a magic code among them, which no log of ours may hold.

    GET    api/usertoken/GetToken          userId connectionName channelId [code]  200 token, 404 none
    POST   api/usertoken/exchange          userId connectionName channelId {token}
                                                                 200 token, 400/404 not exchanged
    DELETE api/usertoken/SignOut           userId channelId [connectionName]      200 or 204
    GET    api/botsignin/GetSignInResource state [finalRedirect]    200 {signInLink, tokenExchange…}

The token service (`CHAT_TOKEN_SERVICE_URL`) keeps each user's token per connection; the bot asks
for it with its own Bot Framework token (the connector's credential, cached by azure-identity).
Each call has one deadline (`CHAT_TOKEN_SERVICE_TIMEOUT_SECONDS`), the bot's token included.
Anything the protocol does not plan for (a 5xx, a refused bot token, a time-out, a body that is
not the documented JSON) is a `TokenServiceError` whose message names the call and its status,
never a token, a magic code or the query string. A `UserToken` keeps its token out of `repr`, so
it cannot reach a log line or a span by accident; nothing here stores it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from . import telemetry
from .activity import Activity
from .errors import ChatstateError, TokenServiceError

__all__ = ["SignInResource", "TokenExchangeResource", "TokenService", "UserToken", "sign_in_state"]

log = logging.getLogger(__name__)

#: At most this much of an error body reaches an exception's message.
_DETAIL_CHARS = 200


@dataclass(frozen=True, kw_only=True)
class UserToken:
    """A user's token for one connection, as the token service gave it (kept in memory only)."""

    token: str = field(repr=False)
    connection: str
    expiration: str | None = None


@dataclass(frozen=True, kw_only=True)
class TokenExchangeResource:
    """What Teams needs for single sign-on: the exchange's ID and the app ID URI to get a token
    for (the OAuth connection's Token Exchange URL)."""

    id: str
    uri: str
    provider_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class SignInResource:
    """The sign-in link of an OAuth card, and its single sign-on resource where the connection
    has one."""

    sign_in_link: str
    exchange: TokenExchangeResource | None = None
    token_post_resource: dict[str, Any] | None = None


def sign_in_state(activity: Activity, *, connection: str, app_id: str) -> str:
    """The `state` of GetSignInResource: the base64 TokenExchangeState (the connection, the
    conversation the card is shown in, the bot's app ID), as the SDKs encode it."""
    raw = activity.raw
    reference = {
        "activityId": activity.id,
        "user": activity.sender,
        "bot": activity.recipient,
        "conversation": raw.get("conversation"),
        "channelId": activity.channel_id,
        "locale": raw.get("locale"),
        "serviceUrl": activity.service_url,
    }
    state = {"connectionName": connection, "conversation": reference,
             "relatesTo": raw.get("relatesTo"), "msAppId": app_id}
    return base64.b64encode(json.dumps(state, ensure_ascii=False).encode()).decode()


class TokenService:
    """The token service at `url`, asked with the bot's token (`bot_token`: None when the bot has
    no identity, locally)."""

    def __init__(self, url: str, *, bot_token: Callable[[], Awaitable[str | None]],
                 timeout_seconds: float = 5.0, env_proxy: bool = False) -> None:
        self.url = url.rstrip("/")
        self._bot_token = bot_token
        self._timeout = timeout_seconds
        self._env_proxy = env_proxy
        self._session: aiohttp.ClientSession | None = None

    async def get_token(self, *, user_id: str, connection: str, channel_id: str,
                        code: str | None = None) -> UserToken | None:
        """The user's token, or None when they are not signed in (or `code`, a magic code, is not
        the one they were shown)."""
        query = {"userId": user_id, "connectionName": connection, "channelId": channel_id}
        if code is not None:
            query["code"] = code
        status, body = await self._call("GET", "api/usertoken/GetToken", query)
        if status == 404:
            return None
        self._expect(status, (200,), "GetToken")
        return _user_token(body, connection, "GetToken")

    async def exchange(self, *, user_id: str, connection: str, channel_id: str,
                       token: str) -> UserToken | None:
        """Exchange a channel's single sign-on token (Teams') for the connection's token; None when
        the service cannot (consent needed, a token for another resource): the user must sign in."""
        query = {"userId": user_id, "connectionName": connection, "channelId": channel_id}
        status, body = await self._call("POST", "api/usertoken/exchange", query, {"token": token})
        if status in (400, 404):
            return None
        self._expect(status, (200,), "exchange")
        return _user_token(body, connection, "exchange")

    async def sign_out(self, *, user_id: str, channel_id: str, connection: str | None = None) -> None:
        """Forget the user's token for `connection` (None: for every connection of the bot)."""
        query = {"userId": user_id, "channelId": channel_id}
        if connection is not None:
            query["connectionName"] = connection
        status, _ = await self._call("DELETE", "api/usertoken/SignOut", query)
        self._expect(status, (200, 204), "SignOut")

    async def sign_in_resource(self, *, state: str) -> SignInResource:
        """The sign-in link (and single sign-on resource) for an OAuth card; `state` from
        `sign_in_state`."""
        status, body = await self._call("GET", "api/botsignin/GetSignInResource", {"state": state})
        self._expect(status, (200,), "GetSignInResource")
        data = _json(body, "GetSignInResource")
        link = data.get("signInLink")
        # https, or the stand-in's own (loopback) address: the card's button opens it.
        if not isinstance(link, str) or not link.startswith(("https://", f"{self.url}/")):
            raise TokenServiceError("GetSignInResource answered without an https signInLink")
        exchange = data.get("tokenExchangeResource")
        post = data.get("tokenPostResource")
        return SignInResource(
            sign_in_link=link,
            exchange=TokenExchangeResource(
                id=str(exchange["id"]), uri=str(exchange["uri"]),
                provider_id=str(exchange["providerId"]) if exchange.get("providerId") else None)
            if isinstance(exchange, dict) and exchange.get("id") and exchange.get("uri") else None,
            token_post_resource=post if isinstance(post, dict) else None)

    async def _call(self, method: str, path: str, query: dict[str, str],
                    payload: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """One request within the deadline: (status, body). The query may hold a magic code, so no
        message here names it."""
        operation = path.rsplit("/", 1)[-1]
        with telemetry.span(f"chatstate.token_service {operation}", kind="client",
                            expected=(TokenServiceError,)) as current:
            try:
                async with asyncio.timeout(self._timeout):
                    headers = {"Accept": "application/json"}
                    bot_token = await self._bot_token()
                    if bot_token:
                        headers["Authorization"] = f"Bearer {bot_token}"
                    data = None
                    if payload is not None:
                        headers["Content-Type"] = "application/json"
                        data = json.dumps(payload).encode()
                    async with self._client().request(method, f"{self.url}/{path}", params=query,
                                                      headers=headers, data=data,
                                                      allow_redirects=False) as response:
                        status, body = response.status, await response.read()
            except TimeoutError:
                raise TokenServiceError(f"the token service took over {self._timeout:g} s "
                                        f"({operation})") from None
            except aiohttp.ClientError as exc:
                raise TokenServiceError(f"cannot reach the token service ({operation}): "
                                        f"{type(exc).__name__}") from None
            except ChatstateError as exc:  # the bot's own token (the connector's credential)
                raise TokenServiceError(f"no bot token for the token service ({operation}): "
                                        f"{exc}") from None
            current.set_attribute("http.response.status_code", status)
        return status, body

    def _expect(self, status: int, allowed: tuple[int, ...], operation: str) -> None:
        if status in allowed:
            return
        if status in (401, 403):
            raise TokenServiceError(f"the token service refused the bot's token ({operation}, "
                                    f"{status}): check the bot's app ID and credential")
        raise TokenServiceError(f"the token service answered {status} ({operation})")

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(trust_env=self._env_proxy,
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _json(body: bytes, operation: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise TokenServiceError(f"the token service's {operation} answer is not a JSON object")
    return data


def _user_token(body: bytes, connection: str, operation: str) -> UserToken | None:
    """A TokenResponse; one without a token means none (the SDKs read it so)."""
    data = _json(body, operation)
    token = data.get("token")
    if not token:
        return None
    if not isinstance(token, str):
        raise TokenServiceError(f"the token service's {operation} answer has a token that is not "
                                "a string")
    expiration = data.get("expiration")
    return UserToken(token=token, connection=connection,
                     expiration=expiration if isinstance(expiration, str) else None)
