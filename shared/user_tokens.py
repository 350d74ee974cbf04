"""The user's own token for a tool: fetched per turn, exchanged for the tool's audience, kept only
in memory while the turn runs.

    with users.acting(activity):          # around the turn's prompt (shared/turn.py)
        ...                               # a tool that acts as the user:
        token = await user_token(access)  # its bearer token (an MCP server's, shared/mcp.py)

`user_token(access)` asks the token service for the user's token of `access.connection` once per
turn, and when `access.scope` is set exchanges it on-behalf-of for that audience once per turn
(azure-identity's `OnBehalfOfCredential` as the app registration CHAT_SIGNIN_APP_ID: with its
secret locally, with the managed identity's assertion in Azure). The tokens live in the turn's
`ActingUser`, which nothing stores and which ends with the turn; they are never logged, never put
on a span. A user who is not signed in gets `SignInRequired` (after `ask`, which sends them the
card, once per connection per turn).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .activity import Activity
from .errors import SignInRequired, TokenServiceError
from .settings import SignInSettings, UserAccess

if TYPE_CHECKING:  # tools import this module: what it needs at run time is imported when used
    from .token_service import TokenService

__all__ = ["ActingUser", "UserTokens", "acting_user", "current_access", "user_token"]

log = logging.getLogger(__name__)

#: Entra's token-exchange audience: a managed identity's token for it is a client assertion.
TOKEN_EXCHANGE_SCOPE = "api://AzureADTokenExchange/.default"
_AADSTS = re.compile(r"AADSTS\d+")

#: Sends the user the sign-in card for a connection (shared/signin.py).
Ask = Callable[[Activity, str], Awaitable[None]]


@dataclass
class ActingUser:
    """The user a turn acts for, and the tokens fetched for them during the turn (memory only)."""

    activity: Activity
    users: UserTokens
    #: The turn can wait for the user to sign in (parked in the turn queue's order); else a tool
    #: that needs them sends the card and tells the model.
    can_wait: bool = False
    _tokens: dict[tuple[str, str | None], str] = field(default_factory=dict, repr=False)
    _asked: set[str] = field(default_factory=set)

    @property
    def user_id(self) -> str:
        return str(self.activity.sender.get("id") or "")

    async def signed_in(self, connection: str) -> bool:
        """Whether the user has a token for `connection` (fetched now, kept for the turn); asks
        nothing of the user: a turn that can wait for them pauses before the call instead."""
        if (connection, None) not in self._tokens:
            found = await self.users.service.get_token(
                user_id=self.user_id, connection=connection,
                channel_id=self.activity.channel_id) if self.user_id else None
            if found is None:
                return False
            self._tokens[(connection, None)] = found.token
        return True

    async def token(self, access: UserAccess) -> str:
        key = (access.connection, access.scope)
        if key not in self._tokens:
            raw = self._tokens.get((access.connection, None)) or await self._fetch(access.connection)
            self._tokens[(access.connection, None)] = raw
            if access.scope is not None:
                self._tokens[key] = await self.users.on_behalf_of(raw, access.scope)
        return self._tokens[key]

    async def _fetch(self, connection: str) -> str:
        found = None
        if self.user_id:
            found = await self.users.service.get_token(
                user_id=self.user_id, connection=connection, channel_id=self.activity.channel_id)
        if found is None:
            if connection not in self._asked and self.users.ask is not None:
                self._asked.add(connection)
                await self.users.ask(self.activity, connection)
            raise SignInRequired(connection)
        return found.token


_acting: ContextVar[ActingUser | None] = ContextVar("chatstate_acting_user", default=None)
_access: ContextVar[UserAccess | None] = ContextVar("chatstate_tool_access", default=None)


async def user_token(access: UserAccess | None = None) -> str:
    """The signed-in user's token for `access` (None: the running tool's declared access).
    `SignInRequired` when there is no user to act for, or they are not signed in."""
    access = access or _access.get()
    if access is None:
        raise ValueError("user_token() needs the tool's UserAccess (declare as_user on the tool)")
    acting = _acting.get()
    if acting is None:
        raise SignInRequired(access.connection)
    return await acting.token(access)


def acting_user() -> ActingUser | None:
    """The user the running turn acts for (None outside a turn that acts for one)."""
    return _acting.get()


@contextmanager
def current_access(access: UserAccess | None) -> Iterator[None]:
    """The access the running tool declared (`Function.invoke` binds it for its handler)."""
    token = _access.set(access)
    try:
        yield
    finally:
        _access.reset(token)


class UserTokens:
    """Users' tokens for tools: the token service, and the on-behalf-of exchange."""

    def __init__(self, *, service: TokenService, settings: SignInSettings,
                 tenant_id: str | None, authority_host: str, ask: Ask | None = None,
                 managed_identity: Any | None = None,
                 credential_options: dict[str, Any] | None = None, can_wait: bool = False) -> None:
        """`ask`: sends the sign-in card. `managed_identity`: an async credential whose token for
        `api://AzureADTokenExchange` signs the exchange when there is no app secret (Azure).
        `credential_options`: more keywords for the exchange's credential (a test's CA file).
        `can_wait`: turns may pause until the user signs in (the turn queue answers them; an
        activity with expectReplies is answered inline, so it never waits)."""
        self.service = service
        self.settings = settings
        self.tenant_id = tenant_id
        self.authority_host = authority_host
        self.ask = ask
        self._managed_identity = managed_identity
        self._credential_options = credential_options or {}
        self.can_wait = can_wait

    @contextmanager
    def acting(self, activity: Activity) -> Iterator[ActingUser]:
        """The turn of `activity` acts for its sender until the block ends."""
        acting = ActingUser(activity=activity, users=self,
                            can_wait=self.can_wait and not activity.expects_replies)
        token = _acting.set(acting)
        try:
            yield acting
        finally:
            _acting.reset(token)

    async def on_behalf_of(self, user_token: str, scope: str) -> str:
        """`user_token` exchanged for `scope` as the app CHAT_SIGNIN_APP_ID (one Entra call)."""
        from azure.core.exceptions import AzureError
        from azure.identity.aio import OnBehalfOfCredential

        app_id = self.settings.app_id
        if app_id is None:
            raise TokenServiceError("an on-behalf-of exchange needs CHAT_SIGNIN_APP_ID")
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                signing: dict[str, Any]
                if self.settings.app_secret:
                    signing = {"client_secret": self.settings.app_secret}
                else:
                    assertion = await self._assertion()
                    signing = {"client_assertion_func": lambda: assertion}
                credential = OnBehalfOfCredential(
                    self._tenant_of(user_token), app_id, user_assertion=user_token,
                    authority=self.authority_host, **signing, **self._credential_options)
                async with credential:
                    return (await credential.get_token(scope)).token
        except TimeoutError:
            raise TokenServiceError(f"the on-behalf-of exchange for {scope} took over "
                                    f"{self.settings.timeout_seconds:g} s") from None
        except (AzureError, ValueError) as exc:
            # Entra's message may quote the request: only its AADSTS code goes on.
            code = _AADSTS.search(str(exc))
            raise TokenServiceError(f"the on-behalf-of exchange for {scope} was refused"
                                    f"{f' ({code.group()})' if code else ''}") from None

    async def _assertion(self) -> str:
        if self._managed_identity is None:
            raise TokenServiceError("an on-behalf-of exchange needs CHAT_SIGNIN_APP_SECRET, or a "
                                    "managed identity (AZURE_CLIENT_ID) with a federated "
                                    "credential on the app")
        return str((await self._managed_identity.get_token(TOKEN_EXCHANGE_SCOPE)).token)

    def _tenant_of(self, user_token: str) -> str:
        """The user's tenant (their token's `tid`; the exchange must run there), else TENANT_ID."""
        import jwt

        try:
            tenant = jwt.decode(user_token, options={"verify_signature": False}).get("tid")
        except jwt.PyJWTError:
            tenant = None
        return str(tenant or self.tenant_id or "organizations")

    async def close(self) -> None:
        await self.service.close()
        if self._managed_identity is not None:
            await self._managed_identity.close()
