"""The composition root: builds the store, prompt, connector, authenticator and bot from settings.

A function app keeps one `Runtime` per worker process, so clients, connection pools, signing keys
and tokens are reused across invocations.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2

from . import logs, telemetry
from .auth import BotAuthenticator, reply_policy
from .bot import ChatBot
from .budgets import Budgets
from .connector import BotConnector, build_credential
from .inbox import Inbox, max_dequeue_count, visibility_timeout
from .model import build_model
from .prompt import ChatPrompt
from .removal import forget_user
from .settings import AnswerMode, ModelProvider, Settings, load_settings
from .store import ConversationStore, TableConversationStore, UserData
from .summary import Summarizer
from .tokens import tokenizer_name
from .tools import Function

if TYPE_CHECKING:
    from .mcp import McpTools

__all__ = ["HOST_JSON", "Runtime", "build_store"]

#: The Functions host's settings, beside the app (deployed with it).
HOST_JSON = Path(__file__).resolve().parents[1] / "host.json"

log = logging.getLogger(__name__)
# The SDKs log every HTTP request at INFO; keep the operator's log to our own lines.
for _noisy in ("azure", "httpx2", "openai", "mcp"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


class Runtime:
    def __init__(self, settings: Settings, *, functions: Sequence[Function] = (),
                 store: ConversationStore | None = None, credential: Any | None = None,
                 host_json: Path = HOST_JSON) -> None:
        """`store` and `credential` (the managed identity) are test seams; `host_json` the
        Functions host's settings (its queue rules)."""
        logs.install()
        telemetry.setup(settings.telemetry)
        self.settings = settings
        # Signing keys only: a few requests a day, so httpx's own client is plenty.
        self.http = httpx2.AsyncClient(timeout=httpx2.Timeout(10.0))
        self.store = store or build_store(settings, credential)
        self.model = build_model(settings.model, credential=credential)
        limits = settings.model
        # OpenAI and Azure OpenAI take a speaker's `name`; other servers get it as a text prefix.
        named = limits.provider is not ModelProvider.OFFLINE and not limits.base_url
        #: Tools of the MCP servers in CHAT_MCP_SERVERS (none: None), discovered on first use.
        #: The `mcp` SDK is imported only then: it adds about half a second to a cold start.
        self.mcp: McpTools | None = None
        if settings.mcp_servers:
            from .mcp import McpTools

            self.mcp = McpTools(settings.mcp_servers, credential=credential)
        self.prompt = ChatPrompt(self.model, functions=functions, instructions=limits.instructions,
                                 max_tool_rounds=limits.max_tool_rounds,
                                 tool_timeout_seconds=limits.tool_timeout_seconds,
                                 timeout_seconds=limits.timeout_seconds,
                                 speaker_style="name" if named else "prefix",
                                 tool_sources=[self.mcp] if self.mcp is not None else [],
                                 suggested_replies=settings.suggested_replies,
                                 tools_token_budget=limits.tools_token_budget)
        self.summary_model = None
        summarizer = None
        if settings.summary.enabled:
            self.summary_model = build_model(
                replace(limits, model=settings.summary.model,
                        max_reply_tokens=settings.summary.token_budget), credential=credential)
            summarizer = Summarizer(store=self.store, model=self.summary_model,
                                    token_budget=settings.summary.token_budget,
                                    history_token_budget=limits.history_token_budget,
                                    history_max_messages=limits.history_max_messages,
                                    count_spend=settings.data.count_summary_tokens)
        self.connector = BotConnector(credential=build_credential(settings.bot, credential=credential),
                                      env_proxy=settings.env_proxy,
                                      reply_allowed=reply_policy(settings.bot))
        self.authenticator = BotAuthenticator(settings.bot, http=self.http, in_azure=settings.in_azure)
        self.inbox = _build_inbox(settings, credential)
        #: Users' and tenants' budgets and usage (shared/budgets.py).
        self.budgets = Budgets.build(settings, self.store)
        # A failing queued turn is tried as often, and as far apart, as host.json has the host
        # retry a failing queue message.
        self.bot = ChatBot(settings=settings, store=self.store, prompt=self.prompt,
                           connector=self.connector, authenticator=self.authenticator,
                           summarizer=summarizer, inbox=self.inbox,
                           max_attempts=max_dequeue_count(host_json),
                           retry_seconds=visibility_timeout(host_json), budgets=self.budgets)
        _warn_about(settings)
        log.info("token counting: %s", tokenizer_name())

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, *,
                         functions: Sequence[Function] = ()) -> Runtime:
        """Read and validate every setting now: a bad one fails start-up, naming the setting."""
        return cls(load_settings(environ), functions=functions)

    async def forget_user(self, user_id: str) -> UserData:
        """A user's removal: their waiting messages, then their stored data (`shared/removal.py`)."""
        return await forget_user(self.store, self.inbox, user_id)

    async def close(self) -> None:
        await self.store.close()
        if self.inbox is not None:
            await self.inbox.close()
        await self.model.close()
        if self.summary_model is not None:
            await self.summary_model.close()
        await self.connector.close()
        if self.mcp is not None:
            await self.mcp.close()
        await self.http.aclose()


def build_store(settings: Settings, credential: Any | None = None) -> ConversationStore:
    """The conversation store the settings name (`credential`: the managed identity, a test seam)."""
    storage = settings.storage
    if storage.table_endpoint:
        if credential is None:
            from azure.identity.aio import DefaultAzureCredential

            credential = DefaultAzureCredential(
                managed_identity_client_id=storage.managed_identity_client_id)
        return TableConversationStore.from_endpoint(storage.table_endpoint,
                                                    table_name=storage.table_name,
                                                    credential=credential,
                                                    env_proxy=settings.env_proxy,
                                                    summaries=settings.summary.enabled)
    return TableConversationStore.from_connection_string(storage.connection_string,
                                                         table_name=storage.table_name,
                                                         env_proxy=settings.env_proxy,
                                                         summaries=settings.summary.enabled)


def _build_inbox(settings: Settings, credential: Any | None) -> Inbox | None:
    """The accepted activities and the turn queue (None in inline mode)."""
    storage = settings.storage
    if settings.answer_mode is not AnswerMode.QUEUE:
        return None
    if storage.table_endpoint and storage.queue_endpoint:
        if credential is None:
            from azure.identity.aio import DefaultAzureCredential

            credential = DefaultAzureCredential(
                managed_identity_client_id=storage.managed_identity_client_id)
        return Inbox.from_endpoints(table_endpoint=storage.table_endpoint,
                                    queue_endpoint=storage.queue_endpoint,
                                    table_name=storage.table_name, queue_name=storage.turn_queue,
                                    credential=credential)
    return Inbox.from_connection_string(storage.connection_string, table_name=storage.table_name,
                                        queue_name=storage.turn_queue)


def _warn_about(settings: Settings) -> None:
    if not settings.bot.auth_enabled:
        if settings.in_azure:
            log.error("CLIENT_ID is not set: every request to /api/messages will be refused (401)")
        else:
            log.warning("!!! AUTH IS OFF: CLIENT_ID is not set, so /api/messages accepts requests "
                        "without a token and replies only to loopback service URLs. Local use only.")
    log.info("chatstate: model=%s (%s), table=%s, auth=%s, answers=%s", settings.model.model,
             settings.model.provider.value, settings.storage.table_name,
             "on" if settings.bot.auth_enabled else "off",
             f"queue {settings.storage.turn_queue}"
             if settings.answer_mode is AnswerMode.QUEUE else "inline")
    if settings.mcp_servers:
        log.info("MCP servers: %s (tools discovered on first use)",
                 ", ".join(f"{server.name} {server.url}" for server in settings.mcp_servers))
