"""A local Bot Service token service that enforces its protocol, for tests and `make run`.

    GET    /api/usertoken/GetToken            200 TokenResponse, 404 not signed in (or a wrong code)
    POST   /api/usertoken/exchange            200 TokenResponse, 400 when the SSO token cannot be
                                              exchanged (not one Teams gave this user for the
                                              connection's Token Exchange URL, or consent needed)
    DELETE /api/usertoken/SignOut             200 (one connection, or every one without a name)
    GET    /api/botsignin/GetSignInResource   200 {signInLink, tokenExchangeResource}; 400 for a
                                              state that is not a TokenExchangeState
    GET    /signin?session=…                  the identity provider's page: the user signs in and
                                              is shown a six-digit magic code (single use, 5 min,
                                              bound to that user, connection and channel)
    GET    /keys                              the JWKS that verifies the tokens it issues

Every /api call needs the bot's bearer token (401 without) and the query fields the SDKs send
(400 without). Users' tokens are JWTs it signs (RS256) for the connection's audience; a test may
give it the identity stand-in's key, so that an on-behalf-of exchange there accepts them. It
records each request (`requests`, the magic code left out), each exchange (`exchanges`) and
every token it issued (`issued`, for the canary tests). `fail_next` answers the next calls with
the given statuses (`fail_on`: one operation's); `consent_required` names users whose exchanges fail as consent would.

    python -m devtools.fake_token_service --port 8932 --connection demo=api://chatstate-demo \
        --anonymous-bot          # make run: the bot runs with auth off, so it has no token
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import html
import json
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from devtools.local_server import LocalServer

__all__ = ["Connection", "FakeTokenService"]

MAGIC_CODE_SECONDS = 300
TOKEN_SECONDS = 3600


@dataclass(frozen=True, kw_only=True)
class Connection:
    """One OAuth connection: the audience of the tokens it gives, and (for Teams SSO) its Token
    Exchange URL, the app ID URI Teams' SSO tokens must be for."""

    name: str
    audience: str
    exchange_uri: str | None = None


@dataclass
class _Session:
    user_id: str
    connection: str
    channel_id: str
    conversation_id: str


@dataclass
class _Code:
    user_id: str
    connection: str
    channel_id: str
    expires: float


@dataclass
class _Profile:
    name: str
    oid: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def upn(self) -> str:
        return f"{self.name.split()[0].lower()}@contoso.example"


class FakeTokenService(LocalServer):
    """The token service; `connections` are the bot's OAuth connections."""

    def __init__(self, connections: list[Connection], *, app_id: str | None = None,
                 tenant_id: str = "tenant-1", signing_key: Any = None, kid: str = "fts-key-1",
                 clock: Callable[[], float] = time.time, bot_token_required: bool = True) -> None:
        """`app_id`: the bot's, which a sign-in state must name (None: any). `signing_key`, `kid`:
        sign users' tokens with another stand-in's key (the identity provider's).
        `bot_token_required` False: serve a bot with no identity (auth off, `make run`)."""
        super().__init__()
        self.bot_token_required = bot_token_required
        self.connections = {connection.name: connection for connection in connections}
        self.app_id = app_id
        self.tenant_id = tenant_id
        self.key = signing_key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = kid
        self.clock = clock
        self.profiles: dict[str, _Profile] = {}
        self.tokens: dict[tuple[str, str], str] = {}
        self.requests: list[dict[str, Any]] = []
        self.exchanges: list[dict[str, str]] = []
        self.issued: list[str] = []
        self.fail_next: deque[int] = deque()
        #: Statuses the next calls of one operation answer (by its path's last part, e.g.
        #: "GetSignInResource").
        self.fail_on: dict[str, deque[int]] = {}
        self.consent_required: set[str] = set()
        #: Seconds every /api call waits before it answers.
        self.delay = 0.0
        self._sso: dict[str, tuple[str, str]] = {}  # SSO token -> (user ID, audience)
        self._sessions: dict[str, _Session] = {}
        self._codes: dict[str, _Code] = {}

    # -- what a test or a person does on the user's side -----------------------------------------

    def user(self, user_id: str, name: str) -> None:
        """Name the person behind a channel user ID (their tokens say who they are)."""
        self.profiles[user_id] = _Profile(name=name)

    def sign_in(self, user_id: str, connection: str) -> str:
        """The user is signed in already (a token is kept for them); the token."""
        token = self._mint(user_id, self.connections[connection].audience)
        self.tokens[(user_id, connection)] = token
        return token

    def sso_token(self, user_id: str, *, audience: str | None = None) -> str:
        """The token a Teams client gets silently for the app (`audience`: the app ID URI; by
        default the first connection's Token Exchange URL)."""
        audience = audience or next(c.exchange_uri for c in self.connections.values()
                                    if c.exchange_uri)
        token = self._mint(user_id, audience)
        self._sso[token] = (user_id, audience)
        return token

    def open_sign_in_link(self, link: str) -> str:
        """What the user's browser does with the card's button: sign in; the magic code shown."""
        session_id = link.rsplit("session=", 1)[-1]
        session = self._sessions[session_id]
        code = f"{secrets.randbelow(1_000_000):06d}"
        self._codes[code] = _Code(user_id=session.user_id, connection=session.connection,
                                  channel_id=session.channel_id,
                                  expires=self.clock() + MAGIC_CODE_SECONDS)
        return code

    def signed_in(self, user_id: str, connection: str) -> bool:
        return (user_id, connection) in self.tokens

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/keys"

    # -- the service ---------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/usertoken/GetToken", self._get_token)
        app.router.add_post("/api/usertoken/exchange", self._exchange)
        app.router.add_delete("/api/usertoken/SignOut", self._sign_out)
        app.router.add_get("/api/botsignin/GetSignInResource", self._sign_in_resource)
        app.router.add_get("/signin", self._sign_in_page)
        app.router.add_get("/keys", self._keys)

    async def _api(self, request: web.Request, required: tuple[str, ...]) -> web.Response | None:
        """The checks every /api call passes; a refusal, or None."""
        query = {k: v for k, v in request.query.items() if k != "code"}
        self.requests.append({"method": request.method, "path": request.path, "query": query,
                              "authorization": request.headers.get("Authorization")})
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_next:
            return _error(self.fail_next.popleft(), "ServiceError", "scripted failure")
        if failing := self.fail_on.get(request.path.rsplit("/", 1)[-1]):
            return _error(failing.popleft(), "ServiceError", "scripted failure")
        if self.bot_token_required and \
                not (request.headers.get("Authorization") or "").startswith("Bearer "):
            return _error(401, "Unauthorized", "the bot's token is missing")
        missing = [name for name in required if not request.query.get(name)]
        if missing:
            return _error(400, "BadArgument", f"missing {', '.join(missing)}")
        connection = request.query.get("connectionName")
        if connection is not None and connection not in self.connections:
            return _error(400, "BadArgument", f"no OAuth connection named {connection!r}")
        return None

    async def _get_token(self, request: web.Request) -> web.Response:
        if refused := await self._api(request, ("userId", "connectionName", "channelId")):
            return refused
        user_id, connection = request.query["userId"], request.query["connectionName"]
        code = request.query.get("code")
        if code is not None:
            found = self._codes.get(code)
            if found is None or found.expires < self.clock() or (found.user_id, found.connection,
                                                                  found.channel_id) != (
                    user_id, connection, request.query["channelId"]):
                return _error(404, "NotFound", "no such magic code for this user")
            del self._codes[code]  # used once
            self.sign_in(user_id, connection)
        token = self.tokens.get((user_id, connection))
        if token is None:
            return _error(404, "NotFound", "the user is not signed in")
        return self._token_response(token, connection, request.query["channelId"])

    async def _exchange(self, request: web.Request) -> web.Response:
        if refused := await self._api(request, ("userId", "connectionName", "channelId")):
            return refused
        user_id, name = request.query["userId"], request.query["connectionName"]
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "BadArgument", "the body is not JSON")
        sso = body.get("token") if isinstance(body, dict) else None
        self.exchanges.append({"user": user_id, "connection": name})
        connection = self.connections[name]
        if not isinstance(sso, str) or not sso:
            return _error(400, "BadArgument", "the body has no token")
        if self._sso.get(sso) != (user_id, connection.exchange_uri) or not connection.exchange_uri:
            return _error(400, "BadArgument", "not an exchangeable token of this user for this "
                          "connection's Token Exchange URL")
        if user_id in self.consent_required:
            return _error(400, "ConsentRequired", "the user has not consented to the app")
        return self._token_response(self.sign_in(user_id, name), name,
                                    request.query["channelId"])

    async def _sign_out(self, request: web.Request) -> web.Response:
        if refused := await self._api(request, ("userId", "channelId")):
            return refused
        user_id, connection = request.query["userId"], request.query.get("connectionName")
        for key in [key for key in self.tokens if key[0] == user_id and
                    connection in (None, key[1])]:
            del self.tokens[key]
        return web.json_response({})

    async def _sign_in_resource(self, request: web.Request) -> web.Response:
        if refused := await self._api(request, ("state",)):
            return refused
        try:
            state = json.loads(base64.b64decode(request.query["state"], validate=True))
            reference = state["conversation"]
            session = _Session(user_id=str(reference["user"]["id"]),
                               connection=str(state["connectionName"]),
                               channel_id=str(reference["channelId"]),
                               conversation_id=str(reference["conversation"]["id"]))
            if not reference["serviceUrl"]:
                raise ValueError("no serviceUrl")
        except (ValueError, KeyError, TypeError):
            return _error(400, "BadArgument", "state is not a base64 TokenExchangeState")
        if session.connection not in self.connections:
            return _error(400, "BadArgument", "the state names no known connection")
        if self.app_id is not None and state.get("msAppId") != self.app_id:
            return _error(400, "BadArgument", "the state's msAppId is not this bot's")
        name = reference["user"].get("name")
        if isinstance(name, str) and name and session.user_id not in self.profiles:
            self.user(session.user_id, name)  # who signs in, as the identity provider knows them
        session_id = uuid.uuid4().hex
        self._sessions[session_id] = session
        answer: dict[str, Any] = {"signInLink": f"{self.url}/signin?session={session_id}"}
        connection = self.connections[session.connection]
        if connection.exchange_uri:
            answer["tokenExchangeResource"] = {"id": str(uuid.uuid4()),
                                               "uri": connection.exchange_uri,
                                               "providerId": "00000000-0000-0000-0000-000000000000"}
        return web.json_response(answer)

    async def _sign_in_page(self, request: web.Request) -> web.Response:
        session_id = request.query.get("session", "")
        if session_id not in self._sessions:
            return web.Response(status=404, text="no such sign-in")
        code = self.open_sign_in_link(f"session={session_id}")
        who = self._profile(self._sessions[session_id].user_id).name
        return web.Response(content_type="text/html", text=(
            f"<!doctype html><title>Signed in</title><h1>Signed in as {html.escape(who)}</h1>"
            f"<p>Type this code in the chat to finish: <b>{code}</b></p>"))

    async def _keys(self, request: web.Request) -> web.Response:
        jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(),
                                                                 as_dict=True)
        return web.json_response({"keys": [{**jwk, "kid": self.kid, "use": "sig",
                                            "alg": "RS256"}]})

    def _token_response(self, token: str, connection: str, channel_id: str) -> web.Response:
        expiration = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock() + TOKEN_SECONDS))
        return web.json_response({"channelId": channel_id, "connectionName": connection,
                                  "token": token, "expiration": expiration})

    def _profile(self, user_id: str) -> _Profile:
        return self.profiles.setdefault(user_id, _Profile(name=f"User {user_id[-6:]}"))

    def _mint(self, user_id: str, audience: str) -> str:
        profile = self._profile(user_id)
        now = int(self.clock())
        token = jwt.encode({"iss": f"https://login.microsoftonline.com/{self.tenant_id}/v2.0",
                            "aud": audience, "tid": self.tenant_id, "oid": profile.oid,
                            "name": profile.name, "preferred_username": profile.upn,
                            "scp": "access_as_user", "iat": now - 5, "nbf": now - 5,
                            "exp": now + TOKEN_SECONDS, "uti": uuid.uuid4().hex},
                           self.key, algorithm="RS256", headers={"kid": self.kid})
        self.issued.append(token)
        return token


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=8932)
    parser.add_argument("--connection", action="append", default=[],
                        metavar="NAME=AUDIENCE[,EXCHANGE_URI]",
                        help="an OAuth connection: its name, the audience of its tokens")
    parser.add_argument("--anonymous-bot", action="store_true",
                        help="serve a bot that sends no token (auth off, as make run runs it)")
    args = parser.parse_args()
    connections = []
    for spec in args.connection or ["demo=api://chatstate-demo"]:
        name, _, rest = spec.partition("=")
        audience, _, exchange = rest.partition(",")
        connections.append(Connection(name=name, audience=audience, exchange_uri=exchange or None))

    async def serve() -> None:
        service = await FakeTokenService(
            connections, bot_token_required=not args.anonymous_bot).start(args.port)
        print(f"token service stand-in: {service.url} (connections: "
              f"{', '.join(c.name for c in connections)})", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
