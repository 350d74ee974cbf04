"""The composition root: builds the store, prompt, connector, authenticator and bot from settings.

A function app keeps one `Runtime` per worker process, so clients, connection pools, signing keys
and tokens are reused across invocations. Settings are read and checked when it is made (a bad one
fails start-up, naming it); its parts are built, and their modules and SDKs imported, when first
used: `import function_app` stays cheap, an HTTP instance never loads the model's SDK, and a
queue instance never loads the token checks (benchmarks/cold_start.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import logs, telemetry
from .settings import AnswerMode, ModelProvider, Settings, check_credential_settings, load_settings
from .tokens import tokenizer_name

if TYPE_CHECKING:
    import httpx2

    from .auth import BotAuthenticator
    from .bot import ChatBot
    from .budgets import Budgets
    from .connector import BotConnector
    from .inbox import Inbox
    from .mcp import McpTools
    from .model import ChatModel
    from .prompt import ChatPrompt
    from .store import ConversationStore, UserData
    from .summary import Summarizer
    from .tools import Function

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
        check_credential_settings(settings.bot)
        self.settings = settings
        self._functions = tuple(functions)
        self._credential = credential
        self._host_json = host_json
        self._http: httpx2.AsyncClient | None = None
        self._telemetry = False
        if store is not None:
            self.store = store
        _warn_about(settings)

    def _set_up(self) -> None:
        """Telemetry, set up before the first part is used (its exporters load only then)."""
        if not self._telemetry:
            self._telemetry = True
            telemetry.setup(self.settings.telemetry)
            log.info("token counting: %s", tokenizer_name())

    @functools.cached_property
    def store(self) -> ConversationStore:
        self._set_up()
        return build_store(self.settings, self._credential)

    @functools.cached_property
    def inbox(self) -> Inbox | None:
        """The accepted activities and the turn queue (None in inline mode)."""
        self._set_up()
        return _build_inbox(self.settings, self._credential)

    @functools.cached_property
    def model(self) -> ChatModel:
        from .model import build_model

        self._set_up()
        return build_model(self.settings.model, credential=self._credential)

    @functools.cached_property
    def summary_model(self) -> ChatModel | None:
        from .model import build_model

        summary = self.settings.summary
        if not summary.enabled:
            return None
        return build_model(replace(self.settings.model, model=summary.model,
                                   max_reply_tokens=summary.token_budget),
                           credential=self._credential)

    @functools.cached_property
    def mcp(self) -> McpTools | None:
        """Tools of the MCP servers in CHAT_MCP_SERVERS (none: None), discovered on first use.
        The `mcp` SDK is imported only then: it adds about half a second to a cold start."""
        if not self.settings.mcp_servers:
            return None
        from .mcp import McpTools

        return McpTools(self.settings.mcp_servers, credential=self._credential)

    @functools.cached_property
    def prompt(self) -> ChatPrompt:
        from .prompt import ChatPrompt

        limits = self.settings.model
        # OpenAI and Azure OpenAI take a speaker's `name`; other servers get it as a text prefix.
        named = limits.provider is not ModelProvider.OFFLINE and not limits.base_url
        return ChatPrompt(self.model, functions=self._functions, instructions=limits.instructions,
                          max_tool_rounds=limits.max_tool_rounds,
                          tool_timeout_seconds=limits.tool_timeout_seconds,
                          timeout_seconds=limits.timeout_seconds,
                          speaker_style="name" if named else "prefix",
                          tool_sources=[self.mcp] if self.mcp is not None else [],
                          suggested_replies=self.settings.suggested_replies,
                          tools_token_budget=limits.tools_token_budget)

    @functools.cached_property
    def connector(self) -> BotConnector:
        from .connector import BotConnector, build_credential

        self._set_up()
        from .auth import reply_policy

        return BotConnector(credential=build_credential(self.settings.bot,
                                                        credential=self._credential),
                            env_proxy=self.settings.env_proxy,
                            reply_allowed=reply_policy(self.settings.bot))

    @functools.cached_property
    def authenticator(self) -> BotAuthenticator:
        from .auth import BotAuthenticator

        return BotAuthenticator(self.settings.bot, http=self.keys_http,
                                in_azure=self.settings.in_azure)

    @functools.cached_property
    def bot(self) -> ChatBot:
        from .bot import ChatBot
        from .inbox import max_dequeue_count, visibility_timeout

        # A failing queued turn is tried as often, and as far apart, as host.json has the host
        # retry a failing queue message.
        return ChatBot(settings=self.settings, store=self.store, prompt=self.prompt,
                       connector=self.connector, authenticator=self.authenticator,
                       summarizer=self._summarizer(), inbox=self.inbox,
                       max_attempts=max_dequeue_count(self._host_json),
                       retry_seconds=visibility_timeout(self._host_json), budgets=self.budgets)

    @functools.cached_property
    def budgets(self) -> Budgets | None:
        """Users' and tenants' budgets and usage (shared/budgets.py)."""
        from .budgets import Budgets

        return Budgets.build(self.settings, self.store)

    def _summarizer(self) -> Summarizer | None:
        from .summary import Summarizer

        if self.summary_model is None:
            return None
        limits = self.settings.model
        return Summarizer(store=self.store, model=self.summary_model,
                          token_budget=self.settings.summary.token_budget,
                          history_token_budget=limits.history_token_budget,
                          history_max_messages=limits.history_max_messages,
                          count_spend=self.settings.data.count_summary_tokens)

    def keys_http(self) -> httpx2.AsyncClient:
        """The HTTP client for signing keys (a few requests a day: httpx's own client is plenty),
        made when the first token is checked."""
        if self._http is None:
            import httpx2

            self._http = httpx2.AsyncClient(timeout=httpx2.Timeout(10.0))
        return self._http

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, *,
                         functions: Sequence[Function] = ()) -> Runtime:
        """Read and validate every setting now: a bad one fails start-up, naming the setting."""
        return cls(load_settings(environ), functions=functions)

    async def forget_user(self, user_id: str) -> UserData:
        """A user's removal: their waiting messages, then their stored data (`shared/removal.py`)."""
        from .removal import forget_user

        return await forget_user(self.store, self.inbox, user_id)

    async def close(self) -> None:
        """Close the clients that were made."""
        built = self.__dict__
        for name in ("store", "inbox", "model", "summary_model", "connector", "mcp"):
            part = built.get(name)
            if part is not None:
                await part.close()
        if self._http is not None:
            await self._http.aclose()


def build_store(settings: Settings, credential: Any | None = None) -> ConversationStore:
    """The conversation store the settings name (`credential`: the managed identity, a test seam)."""
    from .store import TableConversationStore

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
    from .inbox import Inbox

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
