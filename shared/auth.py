"""Inbound authentication: the Bot Framework (or Entra ID) JWT on every activity.

Checks, in order: a bearer token; RS256 only; a known issuer (Bot Framework, or Entra ID for the
bot's own tenant); a signing key from the issuer's OpenID metadata (cached, refreshed when an
unknown key ID appears, at most once a minute); signature, audience, expiry with 5 minutes of
skew; for Bot Framework tokens, the key's endorsements include the activity's channel and the
`serviceurl` claim equals the activity's `serviceUrl`. Any failure is `Unauthorized(reason)`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2
import jwt

from .activity import Activity
from .errors import AuthUnavailable, Unauthorized
from .settings import BotSettings

__all__ = ["AuthResult", "BotAuthenticator", "OpenIdKeys", "is_loopback_url"]

log = logging.getLogger(__name__)

BOTFRAMEWORK_ISSUER = "https://api.botframework.com"
CLOCK_SKEW_SECONDS = 300
KEYS_TTL_SECONDS = 24 * 3600
REFRESH_AT_MOST_EVERY_SECONDS = 60


@dataclass(frozen=True, kw_only=True)
class AuthResult:
    """Who called: `source` is botframework, entra or none (auth off, local only)."""

    source: str
    #: Replies may go to the activity's serviceUrl (it passed the token check, or is loopback).
    service_url_trusted: bool
    claims: dict[str, Any] = field(default_factory=dict)


@dataclass
class _SigningKey:
    key: Any
    endorsements: list[str] | None


class OpenIdKeys:
    """The signing keys behind one OpenID metadata URL, cached across invocations."""

    def __init__(self, metadata_url: str, *, http: httpx2.AsyncClient) -> None:
        self.metadata_url = metadata_url
        self._http = http
        self._keys: dict[str, _SigningKey] = {}
        self._fetched_at = 0.0
        self._attempted_at = -float(REFRESH_AT_MOST_EVERY_SECONDS)
        self._lock = asyncio.Lock()

    async def get(self, kid: str) -> _SigningKey | None:
        if self._needs_refresh(kid):
            async with self._lock:  # one refresh at a time; the waiters use its result
                if self._needs_refresh(kid):
                    self._attempted_at = time.monotonic()
                    await self._refresh()
        return self._keys.get(kid)

    def _needs_refresh(self, kid: str) -> bool:
        """Stale keys, or an unknown key ID, but never more than one attempt a minute (anyone can
        send a token with a made-up key ID, and failed attempts count too)."""
        now = time.monotonic()
        if now - self._attempted_at < REFRESH_AT_MOST_EVERY_SECONDS and self._keys:
            return False
        if not self._keys:
            return now - self._attempted_at >= 1.0  # first fetch, or retry a failed one each second
        return now - self._fetched_at > KEYS_TTL_SECONDS or kid not in self._keys

    async def _refresh(self) -> None:
        try:
            metadata = (await self._http.get(self.metadata_url)).raise_for_status().json()
            jwks = (await self._http.get(metadata["jwks_uri"])).raise_for_status().json()
        except (httpx2.HTTPError, ValueError, KeyError, TypeError) as exc:
            if self._keys:
                log.warning("could not refresh signing keys from %s (%s); using cached keys",
                            self.metadata_url, exc)
                return
            raise AuthUnavailable(f"cannot fetch signing keys from {self.metadata_url}") from exc
        keys: dict[str, _SigningKey] = {}
        for entry in jwks.get("keys", []):
            try:
                key = jwt.PyJWK(entry, algorithm="RS256").key
            except (jwt.PyJWKError, jwt.InvalidKeyError, KeyError, TypeError):
                continue
            if "kid" in entry:
                keys[str(entry["kid"])] = _SigningKey(key=key, endorsements=entry.get("endorsements"))
        self._keys, self._fetched_at = keys, time.monotonic()


class BotAuthenticator:
    def __init__(self, settings: BotSettings, *, http: httpx2.AsyncClient, in_azure: bool) -> None:
        self._settings = settings
        self._in_azure = in_azure
        self._botframework = OpenIdKeys(settings.openid_metadata_url, http=http)
        self._entra: OpenIdKeys | None = None
        if settings.tenant_id:
            self._entra = OpenIdKeys(
                f"{settings.authority_host}/{settings.tenant_id}/v2.0/.well-known/openid-configuration",
                http=http)
        client_id = settings.client_id or ""
        self._audiences = [client_id, f"api://{client_id}", f"api://botid-{client_id}"]

    async def authenticate(self, headers: Mapping[str, str], activity: Activity) -> AuthResult:
        if not self._settings.auth_enabled:
            if self._in_azure:
                raise Unauthorized("auth_not_configured", "CLIENT_ID is not set in Azure")
            return AuthResult(source="none", service_url_trusted=is_loopback_url(activity.service_url))
        token = _bearer(headers)
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Unauthorized("malformed_token", str(exc)) from None
        if header.get("alg") != "RS256":
            raise Unauthorized("bad_algorithm", f"alg {header.get('alg')!r}")
        issuer = str(unverified.get("iss", ""))
        if issuer == BOTFRAMEWORK_ISSUER:
            claims = await self._verify(token, header, self._botframework, issuer)
            self._check_endorsement_and_service_url(claims, activity, header)
            return AuthResult(source="botframework", service_url_trusted=True, claims=claims)
        if self._entra is not None and issuer in self._entra_issuers():
            claims = await self._verify(token, header, self._entra, issuer)
            # Any app in the tenant can get a token for our audience; only our own app identity
            # (the Agents Playground with the bot's credentials) may steer replies.
            caller = claims.get("azp") or claims.get("appid")
            if caller != self._settings.client_id:
                raise Unauthorized("caller_not_allowed", f"azp/appid {caller!r}")
            return AuthResult(source="entra", service_url_trusted=True, claims=claims)
        raise Unauthorized("bad_issuer", f"issuer {issuer!r}")

    def _entra_issuers(self) -> set[str]:
        tenant = self._settings.tenant_id
        return {f"{self._settings.authority_host}/{tenant}/v2.0",
                f"https://login.microsoftonline.com/{tenant}/v2.0", f"https://sts.windows.net/{tenant}/"}

    async def _verify(self, token: str, header: dict[str, Any], keys: OpenIdKeys,
                      issuer: str) -> dict[str, Any]:
        kid = header.get("kid")
        signing = await keys.get(str(kid)) if kid else None
        if signing is None:
            raise Unauthorized("unknown_key", f"kid {kid!r}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, signing.key, algorithms=["RS256"], audience=self._audiences, issuer=issuer,
                leeway=CLOCK_SKEW_SECONDS, options={"require": ["exp", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token_expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token_not_yet_valid") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("bad_audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("bad_issuer") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("bad_signature") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized("invalid_token", str(exc)) from None
        claims["_endorsements"] = signing.endorsements
        return claims

    @staticmethod
    def _check_endorsement_and_service_url(claims: dict[str, Any], activity: Activity,
                                           header: dict[str, Any]) -> None:
        endorsements = claims.pop("_endorsements", None)
        if not activity.channel_id or activity.channel_id not in (endorsements or []):
            raise Unauthorized("channel_not_endorsed", f"channel {activity.channel_id!r}, "
                               f"key {header.get('kid')!r}")
        claimed = _normal_url(str(claims.get("serviceurl", "")))
        if not claimed or claimed != _normal_url(activity.service_url):
            raise Unauthorized("service_url_mismatch",
                               f"claim {claims.get('serviceurl')!r}, activity {activity.service_url!r}")


def _bearer(headers: Mapping[str, str]) -> str:
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing_token")
    return token.strip()


def _normal_url(url: str) -> str:
    return url.strip().rstrip("/").lower()


def is_loopback_url(url: str) -> bool:
    """Whether `url` points at this machine (where replies may go with auth off)."""
    import ipaddress
    from urllib.parse import urlparse

    host = (urlparse(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
