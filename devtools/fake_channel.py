"""Local stand-ins for the channel side: a Bot Connector, and an identity provider that mints JWTs.

`FakeConnector` answers `POST /v3/conversations/{id}/activities` like the Bot Connector and records
what it got (scriptable statuses); streamed replies must keep Teams' streaming contract
(`devtools/teams_streams.py`), an activity over Teams' size (`max_bytes` of JSON) is refused with
413, and `suggestedActions` go only on a message that ends a reply (a plain message or a stream's
final, never an update), as `imBack` buttons, three at most. Every such refusal is a violation.
A PUT to an activity replaces it (a card updated after a click). `on_activity`, when set, hears
each activity taken, with the ID it was given ("sent" or "updated"): `make chat` shows them.
`FakeIdentity` serves OpenID metadata and JWKS for Bot Framework
and for an Entra tenant, signs tokens with its own RSA keys, and answers client-credentials token
requests, so tests exercise the real validation code through the metadata-URL override. Its Bot
Framework metadata can be made slow (`metadata_delay`), malformed (`metadata_body`, `keys_body`)
or trickled one byte at a time (`trickle_seconds`), as a struggling identity provider would.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from devtools.local_server import LocalServer
from devtools.teams_streams import StreamContract

__all__ = ["FakeConnector", "FakeIdentity"]


#: Teams refuses a message over about 28 KB (the activity's JSON).
MAX_ACTIVITY_BYTES = 28_000


#: Told of each activity the stand-in took: ("sent" or "updated", the activity, its ID).
ActivityListener = Callable[[str, dict[str, Any], str | None], None]


class FakeConnector(LocalServer):
    """The Bot Connector's activities endpoint; `activities` holds what the bot sent."""

    def __init__(self, *, latency: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 max_bytes: int = MAX_ACTIVITY_BYTES) -> None:
        """`clock`: the time the streaming limits are measured in (`StreamContract`)."""
        super().__init__()
        self.latency = latency
        self.max_bytes = max_bytes
        self.activities: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.statuses: deque[int] = deque()
        self.streams = StreamContract(clock=clock)
        #: Activities replaced by a PUT, in order.
        self.updates: list[dict[str, Any]] = []
        self.on_activity: ActivityListener | None = None
        self._ids = itertools.count(1)
        #: What each message we answered 201 was sent as, by the ID we gave it.
        self.sent: dict[str, dict[str, Any]] = {}

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v3/conversations/{conversation_id}/activities", self._post)
        app.router.add_post("/v3/conversations/{conversation_id}/activities/{activity_id}", self._post)
        app.router.add_put("/v3/conversations/{conversation_id}/activities/{activity_id}", self._put)

    def _heard(self, event: str, activity: dict[str, Any], activity_id: str | None) -> None:
        if self.on_activity is not None:
            self.on_activity(event, activity, activity_id)

    async def _put(self, request: web.Request) -> web.Response:
        """Replace an activity the bot sent (its ID in the path)."""
        raw = await request.read()
        body = {**json.loads(raw), "id": request.match_info["activity_id"]}
        self.requests.append({"at": time.perf_counter(), "path": request.path,
                              "raw_path": request.raw_path, "method": "PUT",
                              "conversation_id": request.match_info["conversation_id"],
                              "authorization": request.headers.get("Authorization"),
                              "activity": body, "bytes": len(raw)})
        if len(raw) > self.max_bytes:
            message = f"an activity of {len(raw):,} bytes (Teams takes about {self.max_bytes:,})"
            self.streams.violations.append(message)
            return web.json_response({"error": {"code": "MessageSizeTooBig", "message": message}},
                                     status=413)
        self.updates.append(body)
        self._heard("updated", body, body["id"])
        return web.json_response({"id": body["id"]}, status=200)

    def messages(self, conversation_id: str | None = None) -> list[dict[str, Any]]:
        return [a for a in self.activities if a.get("type") == "message" and
                (conversation_id is None or a["conversation"]["id"] == conversation_id)]

    async def _post(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw)
        record = {"at": time.perf_counter(), "path": request.path, "raw_path": request.raw_path,
                  "conversation_id": request.match_info["conversation_id"],
                  "authorization": request.headers.get("Authorization"), "activity": body,
                  "bytes": len(raw)}
        self.requests.append(record)
        if len(raw) > self.max_bytes:
            message = f"an activity of {len(raw):,} bytes (Teams takes about {self.max_bytes:,})"
            self.streams.violations.append(message)
            return web.json_response({"error": {"code": "MessageSizeTooBig", "message": message}},
                                     status=413)
        if (misplaced := _misplaced_suggestions(body)) is not None:
            self.streams.violations.append(misplaced)
            return web.json_response({"error": {"code": "BadArgument", "message": misplaced}},
                                     status=400)
        streamed = self.streams.begin(record["conversation_id"], body)
        stream_id = streamed[1].get("id") if streamed else None
        self.streams.busy(stream_id)
        try:
            if self.latency:
                await asyncio.sleep(self.latency)
        finally:
            self.streams.answered(stream_id)
        status = self.statuses.popleft() if self.statuses else 201
        if status >= 300:
            return web.json_response({"error": {"code": "ServiceError"}}, status=status)
        if streamed is not None:
            status, answer = streamed
            if status < 300 and body.get("type") == "message":
                self.activities.append(body)
            if status < 300:
                self._heard("sent", body, answer.get("id"))
            return web.json_response(answer, status=status)
        self.activities.append(body)
        reply_id = f"reply-{next(self._ids)}"
        self.sent[reply_id] = body
        self._heard("sent", body, reply_id)
        return web.json_response({"id": reply_id}, status=201)


def _misplaced_suggestions(activity: dict[str, Any]) -> str | None:
    """Why the activity's `suggestedActions` break the contract; None when they keep it."""
    suggested = activity.get("suggestedActions")
    if suggested is None:
        return None
    if activity.get("type") != "message":
        return "suggestedActions go only on a message (a stream's final, never an update)"
    actions = suggested.get("actions") if isinstance(suggested, dict) else None
    if not isinstance(actions, list) or not 1 <= len(actions) <= 3:
        return "suggestedActions hold 1 to 3 actions"
    for action in actions:
        if not isinstance(action, dict) or action.get("type") != "imBack" or not all(
                isinstance(action.get(key), str) and action[key] for key in ("title", "value")):
            return "each suggested action is an imBack with a title and a value"
    return None


class FakeIdentity(LocalServer):
    """OpenID metadata + JWKS + token endpoint, with keys it can sign with."""

    BOTFRAMEWORK_ISSUER = "https://api.botframework.com"

    def __init__(self, *, tenant_id: str = "tenant-1", endorsements: tuple[str, ...] = ("msteams", "test"),
                 certificate: Path | None = None) -> None:
        """`certificate`: serve HTTPS (azure-identity sends client secrets to https authorities only)."""
        super().__init__(certificate=certificate)
        self.tenant_id = tenant_id
        self.endorsements = list(endorsements)
        self.keys = {"bf-key-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
                     "entra-key-1": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
        self.stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.metadata_requests = 0
        self.token_requests: list[dict[str, str]] = []
        #: Seconds the Bot Framework metadata takes to answer.
        self.metadata_delay = 0.0
        #: Raw bodies served instead of the Bot Framework metadata / JWKS (malformed documents).
        self.metadata_body: bytes | None = None
        self.keys_body: bytes | None = None
        #: When > 0, the metadata is sent one byte every this many seconds.
        self.trickle_seconds = 0.0

    @property
    def botframework_metadata_url(self) -> str:
        return f"{self.url}/botframework/v1/.well-known/openidconfiguration"

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/botframework/v1/.well-known/openidconfiguration", self._bf_metadata)
        app.router.add_get("/botframework/keys", self._bf_keys)
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._entra_metadata)
        app.router.add_get("/{tenant}/discovery/v2.0/keys", self._entra_keys)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._token)

    def _jwk(self, kid: str, **extra: Any) -> dict[str, Any]:
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key(), as_dict=True)
        return {**jwk, "kid": kid, "use": "sig", "alg": "RS256", **extra}

    async def _bf_metadata(self, request: web.Request) -> web.StreamResponse:
        self.metadata_requests += 1
        if self.metadata_delay:
            await asyncio.sleep(self.metadata_delay)
        body = self.metadata_body or json.dumps(
            {"issuer": self.BOTFRAMEWORK_ISSUER, "jwks_uri": f"{self.url}/botframework/keys",
             "id_token_signing_alg_values_supported": ["RS256"]}).encode()
        if not self.trickle_seconds:
            return web.Response(body=body, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Content-Length": str(len(body))})
        await response.prepare(request)
        for index in range(len(body)):
            await response.write(body[index:index + 1])
            await asyncio.sleep(self.trickle_seconds)
        await response.write_eof()
        return response

    async def _bf_keys(self, request: web.Request) -> web.Response:
        if self.keys_body is not None:
            return web.Response(body=self.keys_body, content_type="application/json")
        return web.json_response({"keys": [self._jwk("bf-key-1", endorsements=self.endorsements)]})

    async def _entra_metadata(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        return web.json_response({"issuer": f"https://login.microsoftonline.com/{tenant}/v2.0",
                                  "jwks_uri": f"{self.url}/{tenant}/discovery/v2.0/keys"})

    async def _entra_keys(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [self._jwk("entra-key-1")]})

    async def _token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.token_requests.append({k: str(v) for k, v in form.items()})
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        return web.json_response({"access_token": f"outbound-{uuid.uuid4().hex[:8]}",
                                  "token_type": "Bearer", "expires_in": 3600})

    def botframework_token(self, *, audience: str, service_url: str, kid: str = "bf-key-1",
                           issuer: str | None = None, expires_in: int = 600,
                           algorithm: str = "RS256", key: Any = None, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": issuer or self.BOTFRAMEWORK_ISSUER, "aud": audience, "iat": now - 5,
                   "nbf": now - 5, "exp": now + expires_in, "serviceurl": service_url, **claims}
        if algorithm == "none":
            return jwt.encode(payload, None, algorithm="none", headers={"kid": kid})
        return jwt.encode(payload, key or self.keys.get(kid, self.stranger), algorithm=algorithm,
                          headers={"kid": kid})

    def entra_token(self, *, audience: str, caller: str | None = None, expires_in: int = 600,
                    **claims: Any) -> str:
        """An app-only Entra token; `caller` (azp) defaults to the audience: the bot's own app.
        `claims` add to or replace the payload's (`scp`, `idtyp` for a delegated user token)."""
        now = int(time.time())
        payload = {"iss": f"https://login.microsoftonline.com/{self.tenant_id}/v2.0", "aud": audience,
                   "azp": caller or audience, "tid": self.tenant_id, "iat": now - 5, "nbf": now - 5,
                   "exp": now + expires_in, **claims}
        return jwt.encode(payload, self.keys["entra-key-1"], algorithm="RS256",
                          headers={"kid": "entra-key-1"})
