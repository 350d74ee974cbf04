"""Inbound authentication: the Bot Framework (or Entra ID) JWT on every activity.

Checks, in order: a bearer token; RS256 only; a known issuer (Bot Framework, or Entra ID for the
bot's own tenant); a signing key from the issuer's OpenID metadata (cached, refreshed when an
unknown key ID appears, at most once a minute); signature, audience, expiry with 5 minutes of
skew; for Bot Framework tokens, the key's endorsements include the activity's channel and the
`serviceurl` claim equals the activity's `serviceUrl`; for Entra tokens, the bot's own app, acting
as itself (app-only). Any failure is `Unauthorized(reason)`.

The signing keys: requests that need keys while a fetch is in flight wait for it and use its
result (a new instance's first requests are not refused); the metadata and JWKS fetches share one
total deadline; when no keys can be had (unreachable, slow, malformed) it is `AuthUnavailable`.

Where replies may go (`AuthResult.service_url_trusted`): with a token, only to an https
`serviceUrl` whose host is on `BOT_SERVICE_URL_HOSTS` (the bot's token goes with every reply),
whatever the token said; with auth off, only to loopback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .activity import Activity
from .errors import AuthUnavailable, Unauthorized
from .settings import BotSettings, is_loopback_host

if TYPE_CHECKING:
    import httpx2
__all__ = ["AuthResult", "BotAuthenticator", "OpenIdKeys", "SigningKey", "is_loopback_url",
           "reply_policy", "service_url_allowed"]

log = logging.getLogger(__name__)

BOTFRAMEWORK_ISSUER = "https://api.botframework.com"
CLOCK_SKEW_SECONDS = 300
KEYS_TTL_SECONDS = 24 * 3600
REFRESH_AT_MOST_EVERY_SECONDS = 60
#: Without keys, a failed fetch is retried at most this often (each waiting request gets a 503).
RETRY_FAILED_FETCH_SECONDS = 1.0
#: The whole fetch (metadata, then JWKS) must finish within this, however slowly bytes arrive.
KEYS_FETCH_DEADLINE_SECONDS = 5.0


@dataclass(frozen=True, kw_only=True)
class AuthResult:
    """Who called: `source` is botframework, entra or none (auth off, local only)."""

    source: str
    #: Replies may go to the activity's serviceUrl: a token passed and the host is allowed
    #: (`BOT_SERVICE_URL_HOSTS`), or auth is off and it is loopback.
    service_url_trusted: bool
    #: Why replies may not go there (the reason of the 400); empty when they may.
    service_url_refusal: str = ""
    claims: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SigningKey:
    key: Any
    #: The channels this key may sign for (Bot Framework keys); empty when none are given.
    endorsements: tuple[str, ...] = ()


class OpenIdKeys:
    """The signing keys behind one OpenID metadata URL, cached across invocations."""

    def __init__(self, metadata_url: str, *,
                 http: httpx2.AsyncClient | Callable[[], httpx2.AsyncClient],
                 deadline_seconds: float = KEYS_FETCH_DEADLINE_SECONDS) -> None:
        self.metadata_url = metadata_url
        self._http = http
        self._deadline = deadline_seconds
        self._keys: dict[str, SigningKey] = {}
        self._fetched_at = 0.0
        self._attempted_at = -float(REFRESH_AT_MOST_EVERY_SECONDS)
        self._fetch: asyncio.Task[None] | None = None

    async def get(self, kid: str) -> SigningKey | None:
        """The key `kid`, or None if the issuer has no such key. `AuthUnavailable` when no keys at
        all can be had. A request that needs a fetch waits for the one in flight, if any."""
        if kid not in self._keys or self._stale():
            if self._fetch is None and self._may_fetch(kid):
                self._attempted_at = time.monotonic()
                self._fetch = asyncio.create_task(self._refresh())
            if self._fetch is not None and kid not in self._keys:
                # shield: a waiter that gives up must not cancel everyone's fetch
                await asyncio.shield(self._fetch)
        if not self._keys:
            raise AuthUnavailable(f"no signing keys from {self.metadata_url}; see the log")
        return self._keys.get(kid)

    def _stale(self) -> bool:
        return time.monotonic() - self._fetched_at > KEYS_TTL_SECONDS

    def _may_fetch(self, kid: str) -> bool:
        """Without keys, retry once a second; with keys, refresh (stale keys, or an unknown key ID)
        at most once a minute: anyone can send a token with a made-up key ID."""
        since = time.monotonic() - self._attempted_at
        if not self._keys:
            return since >= RETRY_FAILED_FETCH_SECONDS
        return since >= REFRESH_AT_MOST_EVERY_SECONDS and (self._stale() or kid not in self._keys)

    async def _refresh(self) -> None:
        """Fetch the keys within the deadline; on any failure keep what we had. Never raises."""
        import httpx2

        try:
            async with asyncio.timeout(self._deadline):
                metadata = await self._get_json(self.metadata_url)
                jwks_uri = metadata.get("jwks_uri")
                if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
                    raise ValueError(f"metadata has no jwks_uri URL: {jwks_uri!r}")
                keys = _signing_keys(await self._get_json(jwks_uri))
        except (httpx2.HTTPError, httpx2.InvalidURL, TimeoutError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.warning("could not fetch signing keys from %s (%s); %s", self.metadata_url, reason,
                        "using cached keys" if self._keys else "none to use")
        else:
            self._keys, self._fetched_at = keys, time.monotonic()
        finally:
            self._fetch = None

    async def _get_json(self, url: str) -> dict[str, Any]:
        http = self._http() if callable(self._http) else self._http
        document = (await http.get(url)).raise_for_status().json()
        if not isinstance(document, dict):
            raise ValueError(f"{url} is not a JSON object")
        return document


def _signing_keys(jwks: dict[str, Any]) -> dict[str, SigningKey]:
    """The RS256 keys of a JWKS document by key ID; a `ValueError` when it holds none usable."""
    import jwt

    entries = jwks.get("keys")
    if not isinstance(entries, list):
        raise ValueError("the JWKS document has no keys list")
    keys: dict[str, SigningKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        try:
            key = jwt.PyJWK(entry, algorithm="RS256").key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError,
                AttributeError):
            log.warning("skipped signing key %r: it does not parse", entry["kid"])
            continue
        endorsements = entry.get("endorsements")
        keys[entry["kid"]] = SigningKey(key=key, endorsements=tuple(
            e for e in endorsements if isinstance(e, str)) if isinstance(endorsements, list) else ())
    if not keys:
        raise ValueError("the JWKS document holds no usable RS256 key")
    return keys


class BotAuthenticator:
    def __init__(self, settings: BotSettings, *,
                 http: httpx2.AsyncClient | Callable[[], httpx2.AsyncClient],
                 in_azure: bool) -> None:
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
            if is_loopback_url(activity.service_url):
                return AuthResult(source="none", service_url_trusted=True)
            return AuthResult(source="none", service_url_trusted=False, service_url_refusal=(
                "with auth off, replies go only to a loopback serviceUrl"))
        token = _bearer(headers)
        import jwt

        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Unauthorized("malformed_token", str(exc)) from None
        if header.get("alg") != "RS256":
            raise Unauthorized("bad_algorithm", f"alg {header.get('alg')!r}")
        issuer = str(unverified.get("iss", ""))
        if issuer == BOTFRAMEWORK_ISSUER:
            claims, signing = await self._verify(token, header, self._botframework, issuer)
            self._check_endorsement_and_service_url(claims, signing, activity, header)
            return self._result("botframework", claims, activity)
        if self._entra is not None and issuer in self._entra_issuers():
            claims, _ = await self._verify(token, header, self._entra, issuer)
            # Any app in the tenant can get a token for our audience; only our own app identity
            # (the Agents Playground with the bot's credentials) may steer replies.
            caller = claims.get("azp") or claims.get("appid")
            if caller != self._settings.client_id:
                raise Unauthorized("caller_not_allowed", f"azp/appid {caller!r}")
            # ...and only as itself. An app registration that exposes a scope lets a user mint a
            # delegated token with our azp. Microsoft's access token claims reference: `scp` is
            # "only included for user tokens"; the optional claim `idtyp` is "app" for app-only
            # tokens and "user" for app+user ones (learn.microsoft.com/entra/identity-platform/
            # access-token-claims-reference, optional-claims-reference).
            if "scp" in claims or claims.get("idtyp") == "user":
                raise Unauthorized("not_app_only", f"a delegated token (scp {claims.get('scp')!r}, "
                                   f"idtyp {claims.get('idtyp')!r})")
            return self._result("entra", claims, activity)
        raise Unauthorized("bad_issuer", f"issuer {issuer!r}")

    def _result(self, source: str, claims: dict[str, Any], activity: Activity) -> AuthResult:
        """A passed token; replies may go to the serviceUrl only if its host is allowed."""
        if service_url_allowed(activity.service_url, self._settings.service_url_hosts):
            return AuthResult(source=source, service_url_trusted=True, claims=claims)
        return AuthResult(source=source, service_url_trusted=False, claims=claims, service_url_refusal=(
            f"replies go only to https Bot Framework hosts (BOT_SERVICE_URL_HOSTS); serviceUrl "
            f"{activity.service_url!r} is not one"))

    def _entra_issuers(self) -> set[str]:
        tenant = self._settings.tenant_id
        return {f"{self._settings.authority_host}/{tenant}/v2.0",
                f"https://login.microsoftonline.com/{tenant}/v2.0", f"https://sts.windows.net/{tenant}/"}

    async def _verify(self, token: str, header: dict[str, Any], keys: OpenIdKeys,
                      issuer: str) -> tuple[dict[str, Any], SigningKey]:
        kid = header.get("kid")
        signing = await keys.get(str(kid)) if kid else None
        if signing is None:
            raise Unauthorized("unknown_key", f"kid {kid!r}")
        import jwt

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
        return claims, signing

    @staticmethod
    def _check_endorsement_and_service_url(claims: dict[str, Any], signing: SigningKey,
                                           activity: Activity, header: dict[str, Any]) -> None:
        if not activity.channel_id or activity.channel_id not in signing.endorsements:
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
    """Whether `url` is a well-formed http(s) URL of this machine (where replies may go with auth
    off). A malformed URL is not."""
    parts = _scheme_and_host(url)
    return parts is not None and is_loopback_host(parts[1])


def reply_policy(settings: BotSettings) -> Callable[[str], bool]:
    """Where replies (and the bot's token) may go: with auth on, `BOT_SERVICE_URL_HOSTS`; with
    auth off, loopback only. Checked where the token is used (the connector, the answer of a
    kept activity), not only when an activity comes in."""
    if settings.auth_enabled:
        hosts = settings.service_url_hosts
        return lambda url: service_url_allowed(url, hosts)
    return is_loopback_url


def service_url_allowed(url: str, hosts: Sequence[str]) -> bool:
    """Whether replies, and the bot's token with them, may go to `url`: https, and a host matching
    one of `hosts` (`name` exactly, or `*.name`: any subdomain of it). Plain http only for a
    loopback host listed there (local tests)."""
    parts = _scheme_and_host(url)
    if parts is None:
        return False
    scheme, host = parts
    if scheme != "https" and not is_loopback_host(host):
        return False
    return any(host.endswith(pattern[1:]) if pattern.startswith("*.") else host == pattern
               for pattern in hosts)


def _scheme_and_host(url: str) -> tuple[str, str] | None:
    """(scheme, lower-case host) of a well-formed http(s) URL; None for anything odd: no host,
    user info, a bad port, backslashes, spaces or control characters (parsers disagree on those)."""
    if not url.isprintable() or any(char in url for char in "\\ "):
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not one)
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host or "@" in parts.netloc or (
            host.startswith(".") or ".." in host):
        return None
    return parts.scheme, host
