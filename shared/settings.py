"""The only module that reads the environment: every setting, its default, and its validation.

`SETTINGS` lists each setting once (name, default, description). `load_settings()` reads them,
checks them and returns a frozen `Settings`; a bad value raises `SettingsError` naming the setting.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import urlparse

from .errors import SettingsError
from .policy import ToolPolicy

__all__ = [
    "SETTINGS",
    "AnswerMode",
    "ApprovalSettings",
    "AttachmentSettings",
    "BotSettings",
    "BudgetSettings",
    "DataSettings",
    "McpServerSettings",
    "ModelPrice",
    "ModelProvider",
    "ModelSettings",
    "OrderSettings",
    "Setting",
    "Settings",
    "StorageSettings",
    "SummarySettings",
    "TelemetrySettings",
    "UnknownSetting",
    "is_loopback_host",
    "load_settings",
    "trigger_setting",
    "unknown_settings",
]

log = logging.getLogger(__name__)

DEVELOPMENT_STORAGE = "UseDevelopmentStorage=true"
BOTFRAMEWORK_OPENID_METADATA = "https://login.botframework.com/v1/.well-known/openidconfiguration"
#: The public cloud's Bot Connector hosts: Teams (smba.trafficmanager.net; GCC tenants, whose bots
#: are public-cloud bots, smba.infra.gcc.teams.microsoft.com) and the Bot Framework channels
#: (webchat., directline., europe.webchat., slack. ... .botframework.com).
BOT_SERVICE_URL_HOSTS = "smba.trafficmanager.net,smba.infra.gcc.teams.microsoft.com,*.botframework.com"
#: Where Teams' file attachments (`downloadUrl`) point: SharePoint and OneDrive for Business
#: (public cloud and GCC; GCC High and DoD add *.sharepoint.us).
FILE_HOSTS = "*.sharepoint.com"
DEFAULT_INSTRUCTIONS = "You are a helpful, concise assistant in a chat."
#: Daily at 03:30 UTC. Function triggers read it as `%CHAT_RETENTION_SCHEDULE%`.
RETENTION_SCHEDULE = "0 30 3 * * *"


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One environment setting. `default` None means "unset unless given"."""

    name: str
    description: str
    default: str | None = None
    secret: bool = False
    #: Set by the Bicep templates' app settings when deployed (False: a local or optional setting).
    deployed: bool = True


SETTINGS: tuple[Setting, ...] = (
    # storage
    Setting(name="CHAT_STORAGE_CONNECTION_STRING", default=DEVELOPMENT_STORAGE, deployed=False,
            description="Table Storage connection string; the default is Azurite. Ignored when "
            "CHAT_STORAGE_TABLE_ENDPOINT is set."),
    Setting(name="CHAT_STORAGE_TABLE_ENDPOINT",
            description="https://<account>.table.core.windows.net: use Entra ID (managed identity "
            "in Azure) instead of a connection string."),
    Setting(name="CHAT_TABLE_NAME", default="conversations",
            description="The table holding conversations; created if missing."),
    Setting(name="AZURE_CLIENT_ID",
            description="Client ID of the user-assigned managed identity used for storage and the "
            "model (and the bot when BOT_APP_TYPE is UserAssignedMSI)."),
    # model
    Setting(name="OPENAI_API_KEY", secret=True, deployed=False,
            description="API key for OpenAI or an OpenAI-compatible server."),
    Setting(name="OPENAI_BASE_URL", deployed=False,
            description="Base URL of an OpenAI-compatible server, e.g. http://localhost:11434/v1."),
    Setting(name="OPENAI_MODEL", default="gpt-4o-mini", deployed=False,
            description="Model name sent to OpenAI or the compatible server."),
    Setting(name="AZURE_OPENAI_ENDPOINT",
            description="https://<resource>.openai.azure.com: use Azure OpenAI."),
    Setting(name="AZURE_OPENAI_DEPLOYMENT", description="The Azure OpenAI chat deployment name."),
    Setting(name="OPENAI_API_VERSION", default="2024-10-21",
            description="Azure OpenAI API version."),
    Setting(name="AZURE_OPENAI_API_KEY", secret=True, deployed=False,
            description="Azure OpenAI key; when absent, Entra ID (azure-identity) is used."),
    Setting(name="CHAT_INSTRUCTIONS", default=DEFAULT_INSTRUCTIONS,
            description="The system prompt sent first on every turn."),
    Setting(name="CHAT_HISTORY_TOKEN_BUDGET", default="8000",
            description="Tokens of history (new message included) sent to the model per turn."),
    Setting(name="CHAT_HISTORY_MAX_MESSAGES", default="200",
            description="At most this many stored messages are sent per turn."),
    Setting(name="CHAT_MAX_REPLY_TOKENS", default="1000",
            description="max_completion_tokens for each model call."),
    Setting(name="CHAT_MODEL_TIMEOUT_SECONDS", default="30",
            description="Total deadline of one turn's model calls, retries included."),
    Setting(name="CHAT_MODEL_MAX_RETRIES", default="2",
            description="SDK retries of a model call on 429, 5xx and connection errors."),
    Setting(name="CHAT_MAX_TOOL_ROUNDS", default="5",
            description="Rounds of tool calls one turn may run before it stops politely."),
    Setting(name="CHAT_TOOL_TIMEOUT_SECONDS", default="10",
            description="Deadline of one tool call; a late tool returns an error to the model."),
    Setting(name="CHAT_SUMMARY", default="on",
            description="on or off: fold the turns that leave the history window into a rolling "
            "summary sent after the instructions (off: the window slides, as before)."),
    Setting(name="CHAT_SUMMARY_MODEL", deployed=False,
            description="The model (or Azure OpenAI deployment) that writes summaries; unset: "
            "the chat model."),
    Setting(name="CHAT_SUMMARY_TOKEN_BUDGET", default="1000",
            description="At most this many tokens of summary are sent per turn (and asked of "
            "the summary model)."),
    # bot
    Setting(name="CLIENT_ID",
            description="The bot's Microsoft App ID. Turns inbound auth on; required in Azure."),
    Setting(name="CLIENT_SECRET", secret=True, deployed=False,
            description="The bot's client secret (MultiTenant/SingleTenant bots without a "
            "managed identity)."),
    Setting(name="TENANT_ID",
            description="The bot's Entra tenant (single-tenant and managed-identity bots)."),
    Setting(name="BOT_APP_TYPE", default="MultiTenant",
            description="MultiTenant, SingleTenant or UserAssignedMSI: how replies get tokens."),
    Setting(name="BOT_OPENID_METADATA_URL", default=BOTFRAMEWORK_OPENID_METADATA, deployed=False,
            description="Bot Framework OpenID metadata (sovereign clouds, tests)."),
    Setting(name="BOT_AUTHORITY_HOST", default="https://login.microsoftonline.com",
            deployed=False,
            description="Entra authority host for inbound Entra tokens and outbound token "
            "requests (sovereign clouds, tests)."),
    Setting(name="BOT_SERVICE_URL_HOSTS", default=BOT_SERVICE_URL_HOSTS, deployed=False,
            description="Hosts an activity's serviceUrl may name for replies (the bot's token goes "
            "with them), comma-separated; `*.name` matches any subdomain of name. https only "
            "(http for a listed loopback host, for tests). The default is the public cloud's "
            "(Teams, Teams GCC, the Bot Framework channels such as Web Chat and Direct Line); "
            "GCC High adds smba.infra.gov.teams.microsoft.us and *.botframework.azure.us, DoD "
            "smba.infra.dod.teams.microsoft.us and *.botframework.azure.us."),
    Setting(name="CHAT_STREAMING", default="on",
            description="on or off: stream replies in Teams personal chats (and the Agents "
            "Playground): the first words show while the model writes."),
    Setting(name="CHAT_STREAMING_INFORMATIVE", default="Thinking…",
            description="The informative update a streamed turn shows at once (at most 1,000 "
            "characters)."),
    Setting(name="CHAT_STREAMING_KEEPALIVE_SECONDS", default="30", deployed=False,
            description="While no text flows (the model thinks, tools run), a streamed turn "
            "sends an update at least this often, 2 to 40 seconds (Microsoft 365 Copilot ends a "
            "response silent for 45 s); it counts against the stream's two minutes."),
    Setting(name="CHAT_FEEDBACK", default="on",
            description="on or off: show Teams' like/dislike buttons on AI replies and store the "
            "ratings with the turn."),
    Setting(name="CHAT_TURN_MAX_ATTEMPTS", default="8",
            description="Attempts to commit one turn when another instance commits first, "
            "after a jittered backoff (0.05 s doubling, at most 1 s). The model is asked again "
            "once at most (not when the reply was streamed); later attempts commit the same "
            "answer after the turns that won."),
    # the turn queue (README "Two halves")
    Setting(name="CHAT_ANSWER_MODE", default="queue",
            description="queue or inline: queue answers a message from the turn queue (the "
            "webhook keeps it and returns 200 at once); inline answers it before the webhook "
            "responds (hosts without a queue). expectReplies and invoke are always inline."),
    Setting(name="CHAT_TURN_QUEUE", default="chat-turns",
            description="The storage queue of accepted messages the `answer` function reads "
            "(its poison queue is this name + -poison)."),
    # a conversation's order (docs/operate.md "One conversation, one order")
    Setting(name="CHAT_BURST", default="together",
            description="together or each: messages that arrive while a turn of the same "
            "conversation runs or waits are answered together in the next turn (one model call, "
            "one reply; each stored as its own message), or one by one, in order."),
    Setting(name="CHAT_HOLD_SECONDS", default="30",
            description="How long a worker's hold on a conversation lasts unless renewed (every "
            "third of it): what a crashed worker costs its conversation before another takes "
            "over (5-600)."),
    Setting(name="CHAT_DRAIN_SECONDS", default="60",
            description="A worker answering a conversation's waiting messages hands the rest to "
            "a fresh queue message after this long, to stay inside the function timeout "
            "(5-3600)."),
    Setting(name="CHAT_STORAGE_QUEUE_ENDPOINT",
            description="https://<account>.queue.core.windows.net: enqueue with Entra ID (the "
            "managed identity) instead of CHAT_STORAGE_CONNECTION_STRING; set with "
            "CHAT_STORAGE_TABLE_ENDPOINT."),
    # data: retention and spend limits (docs/operate.md)
    Setting(name="CHAT_RETENTION_DAYS",
            description="Delete conversations idle longer than this many days (1-36500), by the "
            "retention timer; unset: keep them for ever."),
    Setting(name="CHAT_RETENTION_SCHEDULE", default=RETENTION_SCHEDULE,
            description="NCRONTAB schedule (six fields, UTC) of the retention timer (retention); "
            "it does "
            "nothing while CHAT_RETENTION_DAYS is unset."),
    Setting(name="CHAT_MAX_TURNS_PER_MINUTE",
            description="At most this many answered turns per conversation per UTC minute; "
            "more get a short polite reply and no model call. Unset: no limit."),
    Setting(name="CHAT_DAILY_TOKEN_LIMIT",
            description="At most this many model tokens (prompt + completion) per conversation "
            "per UTC day; past it, a short polite reply and no model call. Unset: no limit."),
    Setting(name="CHAT_SPEND_COUNTS_SUMMARIES", default="off", deployed=False,
            description="on or off: the rolling summary's model tokens count toward the "
            "conversation's daily token limit too."),
    # budgets: per user and per tenant, across conversations (shared/budgets.py, docs/operate.md)
    Setting(name="CHAT_USER_DAILY_TOKEN_LIMIT",
            description="At most this many model tokens (prompt + completion) per user per UTC "
            "day, across all their conversations; each model call reserves its worst case first, "
            "and a turn with no room gets a short polite reply and no model call. Unset: no limit."),
    Setting(name="CHAT_USER_TURNS_PER_MINUTE",
            description="At most this many answered turns per user per UTC minute, across all "
            "their conversations; more get a short polite reply and no model call. Unset: no "
            "limit."),
    Setting(name="CHAT_TENANT_DAILY_TOKEN_LIMIT",
            description="At most this many model tokens per Entra tenant (the activity's tenant "
            "ID) per UTC day, all its users together, reserved like the user's. Unset: no limit."),
    Setting(name="CHAT_BUDGET_RESERVATION_SECONDS", default="300", deployed=False,
            description="How long a model call's reservation holds a user's or tenant's budget "
            "when its worker dies before settling it; more than CHAT_MODEL_TIMEOUT_SECONDS."),
    Setting(name="CHAT_MODEL_PRICES", deployed=False,
            description="JSON object of model name (or a prefix of it) -> {\"input\", "
            "\"cachedInput\", \"output\"} prices per million tokens, for the usage reports' "
            "estimated cost. Unset: no cost is shown."),
    # network
    Setting(name="HTTPS_PROXY", deployed=False,
            description="Standard proxy variable for outbound HTTPS. The model calls (the openai "
            "SDK's aiohttp client) always honour the proxy variables, NO_PROXY too; storage and "
            "the Bot Connector calls honour them only when one (this, HTTP_PROXY, ALL_PROXY, or a "
            "lower-case form) is set, since aiohttp then looks them up per request."),
    Setting(name="HTTP_PROXY", deployed=False,
            description="Standard proxy variable for outbound plain HTTP (see HTTPS_PROXY)."),
    # telemetry (standard names: the Azure Monitor distro's and OpenTelemetry's own)
    Setting(name="APPLICATIONINSIGHTS_CONNECTION_STRING",
            description="Application Insights connection string: traces and metrics go there "
            "through the Azure Monitor OpenTelemetry distro (the deployment sets it, with Entra ID "
            "auth in APPLICATIONINSIGHTS_AUTHENTICATION_STRING)."),
    Setting(name="OTEL_EXPORTER_OTLP_ENDPOINT", deployed=False,
            description="Base URL of an OTLP collector (http/protobuf), e.g. "
            "http://localhost:4318: traces and metrics go there too. Unset, with no "
            "APPLICATIONINSIGHTS_CONNECTION_STRING, nothing is recorded."),
    Setting(name="OTEL_SERVICE_NAME", default="chatstate", deployed=False,
            description="The service.name of the traces and metrics."),
    Setting(name="OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", default="false",
            deployed=False,
            description="true or false: record message text (prompts, replies, tool arguments "
            "and results) on the model and tool spans. Off, no text is recorded."),
    # tools from MCP servers (shared/mcp.py)
    Setting(name="CHAT_MCP_SERVERS", deployed=False,
            description="JSON list of remote MCP servers (streamable HTTP) whose tools the model "
            "may call: each {\"name\", \"url\", \"tools\": [allowed tool names, or \"*\"]}, "
            "optionally \"headers\" (header name -> the name of another app setting holding its "
            "value; never the secret itself), \"entraAudience\" (send an Entra ID token of the "
            "app's identity for it), \"trusted\" (true: believe the server's readOnlyHint and "
            "destructiveHint annotations; default false), \"policy\" (auto, ask or never: every "
            "tool of the server), \"toolPolicies\" (tool name -> auto, ask or never), "
            "\"timeoutSeconds\" (default 10), \"refreshSeconds\" (default 300). A tool asks a "
            "person first unless a policy says auto, or the server is trusted and marks it read-only "
            "or non-destructive. Unset: no MCP tools."),
    Setting(name="CHAT_TOOLS_TOKEN_BUDGET", default="4000", deployed=False,
            description="Tokens the tool definitions of one model request may take; they count "
            "against CHAT_HISTORY_TOKEN_BUDGET (the history window gets the rest), at most half of "
            "it. Tools past the budget are left out, with a warning."),
    # ask before acting: a person approves a tool call (shared/approvals.py)
    Setting(name="CHAT_APPROVAL_MINUTES", default="10", deployed=False,
            description="Minutes (fractions allowed) a person has to approve or deny a tool call "
            "that asks first; then the request expires, its card says so, and the call does not "
            "run."),
    Setting(name="CHAT_APPROVERS", default="requester", deployed=False,
            description="Who may answer an approval card: requester (the person whose message "
            "led to the call) or anyone (anyone in the conversation: a group chat's members)."),
    # hosting
    Setting(name="WEBSITE_SITE_NAME", deployed=False,
            description="Set by Azure App Service/Functions; its presence means 'running in "
            "Azure' (stricter start-up checks)."),
    Setting(name="PORT", default="7071", deployed=False,
            description="Local port of `make run` (dev host or func start)."),
    # the Teams app: suggested replies, welcome, files and images (issue 22)
    Setting(name="CHAT_SUGGESTED_REPLIES", default="on", deployed=False,
            description="on or off: the model ends each answer with up to three follow-ups (in "
            "the same call), shown as buttons under the reply; a tap sends one as a message."),
    Setting(name="CHAT_WELCOME", default="on", deployed=False,
            description="on, off or outside-teams: greet people added to a conversation. With "
            "the Teams app's prompt starters (appPackage/), outside-teams: Teams asks bots not "
            "to do both."),
    Setting(name="CHAT_MODEL_IMAGES", default="on", deployed=False,
            description="on or off: the model takes image input (gpt-4o, gpt-4o-mini do); off, "
            "an image gets a polite refusal and no model call."),
    Setting(name="CHAT_FILE_MAX_BYTES", default="4000000", deployed=False,
            description="The largest file or image a message may bring, in bytes (a larger "
            "one gets a polite refusal and no model call)."),
    Setting(name="CHAT_FILE_MAX_COUNT", default="4", deployed=False,
            description="At most this many files and images in one message."),
    Setting(name="CHAT_FILE_HOSTS", default=FILE_HOSTS, deployed=False,
            description="Hosts files may be downloaded from without the bot's token (Teams' "
            "file links point at SharePoint), written as in BOT_SERVICE_URL_HOSTS "
            "(whose hosts get downloads with the token). Any other host is refused."),
    Setting(name="CHAT_STRICT_SETTINGS", default="off", deployed=False,
            description="on or off: an unknown setting with one of our prefixes (CHAT_, OPENAI_, "
            "AZURE_OPENAI_, BOT_: a typo such as OPENAI_BASEURL) stops start-up instead of being "
            "warned about."),
)

_BY_NAME = {setting.name: setting for setting in SETTINGS}


class ModelProvider(StrEnum):
    OPENAI = "openai"
    AZURE = "azure"
    OFFLINE = "offline"


class AnswerMode(StrEnum):
    QUEUE = "queue"
    INLINE = "inline"


class BotAppType(StrEnum):
    MULTI_TENANT = "MultiTenant"
    SINGLE_TENANT = "SingleTenant"
    USER_ASSIGNED_MSI = "UserAssignedMSI"


@dataclass(frozen=True, kw_only=True)
class StorageSettings:
    connection_string: str
    table_endpoint: str | None
    table_name: str
    managed_identity_client_id: str | None
    queue_endpoint: str | None = None
    turn_queue: str = "chat-turns"


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    provider: ModelProvider
    model: str
    api_key: str | None
    base_url: str | None
    azure_endpoint: str | None
    api_version: str
    managed_identity_client_id: str | None
    instructions: str
    history_token_budget: int
    history_max_messages: int
    max_reply_tokens: int
    timeout_seconds: float
    max_retries: int
    max_tool_rounds: int
    tool_timeout_seconds: float
    #: Tokens the tool definitions of one request may take (out of `history_token_budget`).
    tools_token_budget: int = 4_000


@dataclass(frozen=True, kw_only=True)
class SummarySettings:
    enabled: bool
    #: The model or Azure OpenAI deployment that writes summaries.
    model: str
    token_budget: int


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    """Retention and spend limits; None: off."""

    retention_days: int | None = None
    max_turns_per_minute: int | None = None
    daily_token_limit: int | None = None
    #: The summary model's tokens count in the daily counter too.
    count_summary_tokens: bool = False


@dataclass(frozen=True, kw_only=True)
class ModelPrice:
    """What a model's tokens cost per million (CHAT_MODEL_PRICES): `model` is a name or a prefix."""

    model: str
    input: float
    cached_input: float
    output: float


@dataclass(frozen=True, kw_only=True)
class BudgetSettings:
    """Users' and tenants' budgets across conversations (`shared/budgets.py`); None: no limit."""

    user_daily_tokens: int | None = None
    user_turns_per_minute: int | None = None
    tenant_daily_tokens: int | None = None
    #: A reservation left by a worker that died holds the budget this long.
    reservation_seconds: float = 300.0
    prices: tuple[ModelPrice, ...] = ()


@dataclass(frozen=True, kw_only=True)
class OrderSettings:
    """A conversation's order through the turn queue (`shared/order.py`)."""

    #: Messages that wait behind a turn are answered together (False: one by one).
    burst: bool = True
    max_burst: int = 8
    hold_seconds: float = 30.0
    drain_seconds: float = 60.0


@dataclass(frozen=True, kw_only=True)
class ApprovalSettings:
    """Ask before acting (`shared/approvals.py`)."""

    #: How long a person has to answer.
    expiry_seconds: float = 600.0
    #: Only the requester may answer (False: anyone in the conversation).
    requester_only: bool = True


@dataclass(frozen=True, kw_only=True)
class TelemetrySettings:
    applicationinsights_connection_string: str | None = None
    otlp_endpoint: str | None = None
    service_name: str = "chatstate"
    capture_content: bool = False


@dataclass(frozen=True, kw_only=True)
class AttachmentSettings:
    """Files and images in messages (`shared/attachments.py`)."""

    max_files: int = 4
    max_bytes: int = 4_000_000
    #: Host patterns files may come from without the bot's token.
    file_hosts: tuple[str, ...] = (FILE_HOSTS,)
    #: The model takes image input.
    model_images: bool = True


@dataclass(frozen=True, kw_only=True)
class McpServerSettings:
    """One MCP server of CHAT_MCP_SERVERS."""

    name: str
    url: str
    #: Allowed tool names; ("*",): every tool the server lists.
    tools: tuple[str, ...]
    #: Header name and value; the values come from other settings (secrets), so never shown.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    #: The Entra ID scope (`<audience>/.default`) of a token of the app's identity, sent as Bearer.
    entra_scope: str | None = None
    #: Believe the server's annotations (`shared/policy.py`); otherwise every tool asks first
    #: unless `policy` or `tool_policies` says otherwise.
    trusted: bool = False
    #: The policy of every tool of the server (None: by annotations when trusted, else ask).
    policy: ToolPolicy | None = None
    #: Tool name and its policy, which wins over `policy` and the annotations.
    tool_policies: tuple[tuple[str, ToolPolicy], ...] = ()
    timeout_seconds: float = 10.0
    refresh_seconds: float = 300.0
    managed_identity_client_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class BotSettings:
    client_id: str | None
    client_secret: str | None
    tenant_id: str | None
    app_type: BotAppType
    openid_metadata_url: str
    authority_host: str
    managed_identity_client_id: str | None
    #: Host patterns (`name` or `*.name`, lower case) replies may go to when auth is on.
    service_url_hosts: tuple[str, ...] = ()

    @property
    def auth_enabled(self) -> bool:
        return self.client_id is not None


@dataclass(frozen=True, kw_only=True)
class Settings:
    storage: StorageSettings
    model: ModelSettings
    bot: BotSettings
    in_azure: bool
    summary: SummarySettings
    turn_max_attempts: int
    streaming: bool = True
    streaming_informative: str = "Thinking…"
    streaming_keepalive_seconds: float = 30.0
    feedback: bool = True
    #: A proxy variable is set: outbound clients must honour the environment's proxy settings.
    env_proxy: bool = False
    port: int
    data: DataSettings = field(default_factory=DataSettings)
    budgets: BudgetSettings = field(default_factory=BudgetSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    suggested_replies: bool = True
    #: on, off or outside-teams (no welcome in Teams, where the app's prompt starters greet).
    welcome: str = "on"
    attachments: AttachmentSettings = field(default_factory=AttachmentSettings)

    def welcomes(self, channel_id: str) -> bool:
        """Whether a conversation on `channel_id` gets the welcome message."""
        return self.welcome == "on" or (self.welcome == "outside-teams" and channel_id != "msteams")
    answer_mode: AnswerMode = AnswerMode.QUEUE
    mcp_servers: tuple[McpServerSettings, ...] = ()
    order: OrderSettings = field(default_factory=OrderSettings)
    approvals: ApprovalSettings = field(default_factory=ApprovalSettings)


class _Reader:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def given(self, name: str) -> bool:
        """Whether the environment sets `name` (a default does not count)."""
        return bool(self._environ.get(name, "").strip())

    def other(self, name: str) -> str | None:
        """A setting named by another one (an MCP header's value): not in SETTINGS."""
        return self._environ.get(name, "").strip() or None

    def text(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or _BY_NAME[name].default

    def required_text(self, name: str) -> str:
        value = self.text(name)
        if value is None:
            raise SettingsError(name, "is required")
        return value

    def number(self, name: str, *, minimum: float, maximum: float) -> float:
        raw = self.required_text(name)
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(name, f"must be a number, got {raw!r}") from None
        if not minimum <= value <= maximum:
            raise SettingsError(name, f"must be between {minimum:g} and {maximum:g}, got {raw!r}")
        return value

    def integer(self, name: str, *, minimum: int, maximum: int) -> int:
        raw = self.required_text(name)
        if not raw.lstrip("-").isdigit():
            raise SettingsError(name, f"must be a whole number, got {raw!r}")
        return int(self.number(name, minimum=minimum, maximum=maximum))

    def optional_integer(self, name: str, *, minimum: int, maximum: int) -> int | None:
        return self.integer(name, minimum=minimum, maximum=maximum) if self.text(name) else None

    def flag(self, name: str) -> bool:
        raw = self.required_text(name).lower()
        if raw not in _FLAGS:
            raise SettingsError(name, f"must be on or off, got {raw!r}")
        return _FLAGS[raw]

    def url(self, name: str, *, https_only: bool = False) -> str | None:
        value = self.text(name)
        if value is None:
            return None
        parsed = urlparse(value)
        schemes = ("https",) if https_only else ("http", "https")
        if parsed.scheme not in schemes or not parsed.netloc:
            raise SettingsError(name, f"must be an {' or '.join(schemes)} URL, got {value!r}")
        return value.rstrip("/")


def trigger_setting(name: str) -> str:
    """`%name%`, a trigger's app-setting expression, with the setting's default put into this
    process's environment when it is unset: the dev host resolves `%name%` from it. (In Azure the
    Functions host resolves it from the app settings, which the Bicep sets.)"""
    default = _BY_NAME[name].default
    if default is not None and not os.environ.get(name, "").strip():
        os.environ[name] = default
    return f"%{name}%"


#: Namespaces our setting names share with other software: their first word alone is not ours
#: (AZURE_TENANT_ID is azure-identity's, OTEL_TRACES_SAMPLER OpenTelemetry's).
_SHARED_NAMESPACES = ("AZURE", "OTEL", "WEBSITE", "APPLICATIONINSIGHTS", "HTTP", "HTTPS")
#: Variables within our prefixes that other libraries read themselves (the openai SDK's).
_NOT_OURS = frozenset({"OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_LOG", "OPENAI_WEBHOOK_SECRET",
                       "AZURE_OPENAI_AD_TOKEN"})


def _our_prefixes() -> tuple[str, ...]:
    """The name prefixes that are ours, from SETTINGS: a first word two settings share (CHAT_,
    OPENAI_, BOT_), or, in a shared namespace, first two words two settings share (AZURE_OPENAI_)."""
    counts: dict[str, int] = {}
    for setting in SETTINGS:
        words = setting.name.split("_")
        depth = 2 if words[0] in _SHARED_NAMESPACES else 1
        if len(words) > depth:
            prefix = "_".join(words[:depth]) + "_"
            counts[prefix] = counts.get(prefix, 0) + 1
    return tuple(sorted(prefix for prefix, count in counts.items() if count >= 2))


@dataclass(frozen=True, kw_only=True)
class UnknownSetting:
    """A variable with one of our prefixes that no setting has: most likely a typo."""

    name: str
    #: The closest real setting's name, if one is close.
    closest: str | None

    @property
    def hint(self) -> str:
        return f"did you mean {self.closest}?" if self.closest else "no setting has a similar name"

    def __str__(self) -> str:
        return f"{self.name} is not a chatstate setting ({self.hint}); it is ignored"


def unknown_settings(environ: Mapping[str, str]) -> list[UnknownSetting]:
    """The names in `environ` with our prefixes (CHAT_, OPENAI_, ...) that no setting has."""
    prefixes = _our_prefixes()
    names = [setting.name for setting in SETTINGS]
    return [UnknownSetting(name=name, closest=next(iter(difflib.get_close_matches(
                               name.upper(), names, n=1, cutoff=0.6)), None))
            for name in sorted(environ)
            if name.upper().startswith(prefixes) and name not in _BY_NAME and name not in _NOT_OURS]


def _check_names(read: _Reader, environ: Mapping[str, str]) -> None:
    """Warn about each unknown setting; with CHAT_STRICT_SETTINGS on, stop at the first."""
    strict = read.flag("CHAT_STRICT_SETTINGS")
    for unknown in unknown_settings(environ):
        if strict:
            raise SettingsError(unknown.name, f"is not a chatstate setting ({unknown.hint}); "
                                "CHAT_STRICT_SETTINGS is on")
        log.warning("warning: %s (CHAT_STRICT_SETTINGS=on makes this an error)", unknown)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting; raise `SettingsError` naming the first bad one.

    An unknown name with one of our prefixes (a typo) is logged as a warning naming the closest
    setting, or raises `SettingsError` when CHAT_STRICT_SETTINGS is on."""
    environ = os.environ if environ is None else environ
    read = _Reader(environ)
    _check_names(read, environ)
    in_azure = read.text("WEBSITE_SITE_NAME") is not None
    identity = read.text("AZURE_CLIENT_ID")
    model = _model(read, identity, in_azure=in_azure)
    return Settings(
        storage=_storage(read, identity),
        model=model,
        bot=_bot(read, identity),
        in_azure=in_azure,
        summary=_summary(read, model),
        turn_max_attempts=read.integer("CHAT_TURN_MAX_ATTEMPTS", minimum=1, maximum=20),
        streaming=read.flag("CHAT_STREAMING"),
        streaming_informative=_informative(read),
        streaming_keepalive_seconds=read.number("CHAT_STREAMING_KEEPALIVE_SECONDS", minimum=2,
                                                maximum=40),
        feedback=read.flag("CHAT_FEEDBACK"),
        env_proxy=any(read.given(name) for name in _PROXY_VARIABLES),
        port=read.integer("PORT", minimum=1, maximum=65535),
        data=DataSettings(
            retention_days=read.optional_integer("CHAT_RETENTION_DAYS", minimum=1, maximum=36_500),
            max_turns_per_minute=read.optional_integer("CHAT_MAX_TURNS_PER_MINUTE", minimum=1,
                                                       maximum=10_000),
            daily_token_limit=read.optional_integer("CHAT_DAILY_TOKEN_LIMIT", minimum=1,
                                                    maximum=10**12),
            count_summary_tokens=read.flag("CHAT_SPEND_COUNTS_SUMMARIES")),
        budgets=_budgets(read, model),
        telemetry=_telemetry(read),
        suggested_replies=read.flag("CHAT_SUGGESTED_REPLIES"),
        welcome=_welcome(read),
        attachments=AttachmentSettings(
            max_files=read.integer("CHAT_FILE_MAX_COUNT", minimum=1, maximum=20),
            max_bytes=read.integer("CHAT_FILE_MAX_BYTES", minimum=1_000, maximum=50_000_000),
            file_hosts=_host_patterns(read.required_text("CHAT_FILE_HOSTS"), name="CHAT_FILE_HOSTS"),
            model_images=read.flag("CHAT_MODEL_IMAGES")),
        answer_mode=_answer_mode(read),
        mcp_servers=_mcp_servers(read, identity, in_azure=in_azure),
        order=_order(read),
        approvals=_approvals(read),
    )


#: The after-reply summary's work ends within this many seconds (`shared/summary.py`).
SUMMARY_DEADLINE_SECONDS = 10.0


def _budgets(read: _Reader, model: ModelSettings) -> BudgetSettings:
    reservation = read.number("CHAT_BUDGET_RESERVATION_SECONDS", minimum=1, maximum=86_400)
    if reservation <= max(model.timeout_seconds, SUMMARY_DEADLINE_SECONDS):
        raise SettingsError("CHAT_BUDGET_RESERVATION_SECONDS", f"must be more than "
                            f"CHAT_MODEL_TIMEOUT_SECONDS ({model.timeout_seconds:g} s) and the "
                            f"summary's deadline ({SUMMARY_DEADLINE_SECONDS:g} s): a call still "
                            "running when its reservation expires could pass the budget")
    return BudgetSettings(
        user_daily_tokens=read.optional_integer("CHAT_USER_DAILY_TOKEN_LIMIT", minimum=1,
                                                maximum=10**12),
        user_turns_per_minute=read.optional_integer("CHAT_USER_TURNS_PER_MINUTE", minimum=1,
                                                    maximum=10_000),
        tenant_daily_tokens=read.optional_integer("CHAT_TENANT_DAILY_TOKEN_LIMIT", minimum=1,
                                                  maximum=10**13),
        reservation_seconds=reservation,
        prices=_prices(read))


def _prices(read: _Reader) -> tuple[ModelPrice, ...]:
    name = "CHAT_MODEL_PRICES"
    raw = read.text(name)
    if raw is None:
        return ()
    try:
        entries = json.loads(raw)
    except ValueError as exc:
        raise SettingsError(name, f"is not valid JSON: {exc}") from None
    if not isinstance(entries, dict):
        raise SettingsError(name, "must be a JSON object of model name -> prices")
    prices = []
    for model, price in entries.items():
        if not model or not isinstance(price, dict) or set(price) - {"input", "cachedInput", "output"} \
                or not {"input", "output"} <= set(price) or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 10_000
                    for v in price.values()):
            raise SettingsError(name, f"{model!r} must map to {{\"input\", \"output\"}} and "
                                "optionally \"cachedInput\": prices per million tokens (0-10000)")
        prices.append(ModelPrice(model=model, input=float(price["input"]),
                                 cached_input=float(price["cachedInput"] if "cachedInput" in price
                                                    else price["input"]),
                                 output=float(price["output"])))
    return tuple(prices)


def _order(read: _Reader) -> OrderSettings:
    burst = read.required_text("CHAT_BURST").lower()
    if burst not in ("together", "each"):
        raise SettingsError("CHAT_BURST", f"must be together or each, got {burst!r}")
    return OrderSettings(burst=burst == "together",
                         hold_seconds=read.number("CHAT_HOLD_SECONDS", minimum=5, maximum=600),
                         drain_seconds=read.number("CHAT_DRAIN_SECONDS", minimum=5, maximum=3600))


def _approvals(read: _Reader) -> ApprovalSettings:
    approvers = read.required_text("CHAT_APPROVERS").lower()
    if approvers not in ("requester", "anyone"):
        raise SettingsError("CHAT_APPROVERS", f"must be requester or anyone, got {approvers!r}")
    minutes = read.number("CHAT_APPROVAL_MINUTES", minimum=0.05, maximum=24 * 60)
    return ApprovalSettings(expiry_seconds=minutes * 60, requester_only=approvers == "requester")


def _welcome(read: _Reader) -> str:
    value = read.required_text("CHAT_WELCOME").lower()
    if value not in ("on", "off", "outside-teams"):
        raise SettingsError("CHAT_WELCOME", f"must be on, off or outside-teams, got {value!r}")
    return value


_MCP_KEYS = {"name", "url", "tools", "headers", "entraAudience", "trusted", "policy",
             "toolPolicies", "timeoutSeconds", "refreshSeconds"}
_MCP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _mcp_servers(read: _Reader, identity: str | None, *,
                 in_azure: bool) -> tuple[McpServerSettings, ...]:
    name = "CHAT_MCP_SERVERS"
    raw = read.text(name)
    if raw is None:
        return ()
    try:
        entries = json.loads(raw)
    except ValueError as exc:
        raise SettingsError(name, f"is not valid JSON: {exc}") from None
    if not isinstance(entries, list):
        raise SettingsError(name, "must be a JSON list of servers")
    servers = tuple(_mcp_server(read, entry, index, identity, in_azure=in_azure)
                    for index, entry in enumerate(entries))
    names = [server.name for server in servers]
    if len(set(names)) != len(names):
        raise SettingsError(name, f"names a server twice: {sorted(names)}")
    return servers


def _mcp_server(read: _Reader, entry: object, index: int, identity: str | None, *,
                in_azure: bool) -> McpServerSettings:
    where = f"server {index}"

    def bad(reason: str) -> SettingsError:
        return SettingsError("CHAT_MCP_SERVERS", f"{where}: {reason}")

    if not isinstance(entry, dict):
        raise bad("must be a JSON object")
    name = entry.get("name")
    if not isinstance(name, str) or not _MCP_NAME.match(name):
        raise bad("needs a \"name\" of 1-32 letters, digits, _ or -")
    where = f"server {name!r}"
    if "allowDestructive" in entry:
        raise bad(_ALLOW_DESTRUCTIVE_GONE.format(example=json.dumps(
            dict.fromkeys(_names(entry["allowDestructive"], "allowDestructive", bad), "auto"))))
    if unknown := sorted(set(entry) - _MCP_KEYS):
        raise bad(f"unknown key(s) {unknown}; the keys are {sorted(_MCP_KEYS)}")
    url = entry.get("url")
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise bad(f"\"url\" must be an http(s) URL, got {url!r}")
    if parsed.scheme == "http" and (in_azure or not is_loopback_host(parsed.hostname or "")):
        raise bad("\"url\" must be https (http only for a loopback server, locally)")
    tools = _names(entry.get("tools"), "tools", bad, required=True)
    trusted = entry.get("trusted", False)
    if not isinstance(trusted, bool):
        raise bad("\"trusted\" must be true or false")
    policy = None if entry.get("policy") is None else _policy(entry["policy"], "\"policy\"", bad)
    tool_policies = _tool_policies(entry.get("toolPolicies", {}), tools, bad)
    headers = entry.get("headers", {})
    if not isinstance(headers, dict):
        raise bad("\"headers\" must be an object of header name -> setting name")
    resolved: list[tuple[str, str]] = []
    for header, setting in headers.items():
        if not isinstance(setting, str) or not _SETTING_NAME.match(setting):
            raise bad(f"header {header!r} must name another app setting that holds its value "
                      "(never the value itself)")
        value = read.other(setting)
        if value is None:
            raise bad(f"header {header!r} names the setting {setting}, which is not set")
        resolved.append((str(header), value))
    audience = entry.get("entraAudience")
    if audience is not None and (not isinstance(audience, str) or not audience.strip()):
        raise bad("\"entraAudience\" must be an application ID URI or client ID")
    scope = None if audience is None else \
        audience.strip() if audience.strip().endswith("/.default") else f"{audience.strip()}/.default"
    return McpServerSettings(
        name=name, url=str(url), tools=tools, headers=tuple(resolved), entra_scope=scope,
        trusted=trusted, policy=policy, tool_policies=tool_policies,
        timeout_seconds=_seconds(entry.get("timeoutSeconds", 10), "timeoutSeconds", bad, 0.05, 120),
        refresh_seconds=_seconds(entry.get("refreshSeconds", 300), "refreshSeconds", bad, 1, 86_400),
        managed_identity_client_id=identity)


#: The start-up error for the key that policies replaced, with the entry's own names in it.
_ALLOW_DESTRUCTIVE_GONE = (
    "\"allowDestructive\" was replaced by tool policies (README, \"Ask before acting\"): write "
    "\"toolPolicies\": {example} to run those tools without asking, as before, or \"ask\" to "
    "have a person approve each call. Note that every tool of a server not marked \"trusted\": "
    "true now asks first unless a policy says \"auto\".")


def _policy(value: object, what: str, bad: Callable[[str], SettingsError]) -> ToolPolicy:
    if isinstance(value, str) and value in tuple(ToolPolicy):
        return ToolPolicy(value)
    raise bad(f"{what} must be auto, ask or never, got {value!r}")


def _tool_policies(value: object, tools: tuple[str, ...],
                   bad: Callable[[str], SettingsError]) -> tuple[tuple[str, ToolPolicy], ...]:
    if not isinstance(value, dict):
        raise bad("\"toolPolicies\" must be an object of tool name -> auto, ask or never")
    policies: list[tuple[str, ToolPolicy]] = []
    for tool, policy in value.items():
        if "*" not in tools and tool not in tools:
            raise bad(f"\"toolPolicies\" names {tool!r}, which \"tools\" does not allow")
        policies.append((tool, _policy(policy, f"the policy of {tool!r}", bad)))
    return tuple(policies)


def _names(value: object, key: str, bad: Callable[[str], SettingsError], *,
           required: bool = False) -> tuple[str, ...]:
    if value is None and required:
        raise bad(f"needs \"{key}\": the tool names allowed (or [\"*\"] for all)")
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise bad(f"\"{key}\" must be a list of tool names")
    return tuple(value)


def _seconds(value: object, key: str, bad: Callable[[str], SettingsError], minimum: float,
             maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not minimum <= value <= maximum:
        raise bad(f"\"{key}\" must be a number of seconds from {minimum:g} to {maximum:g}")
    return float(value)


def is_loopback_host(host: str) -> bool:
    """`localhost` or a loopback IP address (the hosts a local-only setting or reply may name)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _answer_mode(read: _Reader) -> AnswerMode:
    raw = read.required_text("CHAT_ANSWER_MODE").lower()
    try:
        return AnswerMode(raw)
    except ValueError:
        raise SettingsError("CHAT_ANSWER_MODE", f"must be queue or inline, got {raw!r}") from None


def _telemetry(read: _Reader) -> TelemetrySettings:
    connection_string = read.text("APPLICATIONINSIGHTS_CONNECTION_STRING")
    if connection_string is not None and "=" not in connection_string:
        raise SettingsError("APPLICATIONINSIGHTS_CONNECTION_STRING", "is not a connection string")
    return TelemetrySettings(
        applicationinsights_connection_string=connection_string,
        otlp_endpoint=read.url("OTEL_EXPORTER_OTLP_ENDPOINT"),
        service_name=read.required_text("OTEL_SERVICE_NAME"),
        capture_content=read.flag("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"),
    )


_FLAGS = {"on": True, "true": True, "1": True, "yes": True,
          "off": False, "false": False, "0": False, "no": False}


def _informative(read: _Reader) -> str:
    text = read.required_text("CHAT_STREAMING_INFORMATIVE")
    if len(text) > 1_000:
        raise SettingsError("CHAT_STREAMING_INFORMATIVE", f"holds at most 1,000 characters, got "
                            f"{len(text):,}")
    return text


#: The standard proxy variables (aiohttp and httpx read them themselves, lower case too).
_PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy",
                    "all_proxy")


def _storage(read: _Reader, identity: str | None) -> StorageSettings:
    table_name = read.required_text("CHAT_TABLE_NAME")
    if not (3 <= len(table_name) <= 63 and table_name.isalnum() and table_name[0].isalpha()):
        raise SettingsError("CHAT_TABLE_NAME", "must be 3-63 letters or digits, starting with a "
                            f"letter, got {table_name!r}")
    connection_string = read.required_text("CHAT_STORAGE_CONNECTION_STRING")
    if connection_string != DEVELOPMENT_STORAGE and "=" not in connection_string:
        raise SettingsError("CHAT_STORAGE_CONNECTION_STRING", "is not a connection string")
    table_endpoint = read.url("CHAT_STORAGE_TABLE_ENDPOINT")
    queue_endpoint = read.url("CHAT_STORAGE_QUEUE_ENDPOINT")
    if (table_endpoint is None) != (queue_endpoint is None) and \
            read.text("CHAT_ANSWER_MODE") == AnswerMode.QUEUE.value:
        raise SettingsError("CHAT_STORAGE_QUEUE_ENDPOINT", "and CHAT_STORAGE_TABLE_ENDPOINT go "
                            "together (both Entra ID, or neither: the connection string)")
    return StorageSettings(
        connection_string=connection_string,
        table_endpoint=table_endpoint,
        table_name=table_name,
        managed_identity_client_id=identity,
        queue_endpoint=queue_endpoint,
        turn_queue=_queue_name(read),
    )


def _queue_name(read: _Reader) -> str:
    """3-63 lower-case letters, digits and single hyphens; room left for `-poison`."""
    name = read.required_text("CHAT_TURN_QUEUE")
    if not re.fullmatch(r"[a-z0-9](?:-?[a-z0-9])+", name) or len(name) > 63 - len("-poison"):
        raise SettingsError("CHAT_TURN_QUEUE", "must be 2-56 lower-case letters, digits and "
                            f"single hyphens, not starting or ending with one, got {name!r}")
    return name


#: Any of these given turns the offline stand-in off (OPENAI_API_VERSION matters only with Azure).
_MODEL_SETTINGS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "AZURE_OPENAI_ENDPOINT",
                   "AZURE_OPENAI_DEPLOYMENT", "AZURE_OPENAI_API_KEY")


def _model(read: _Reader, identity: str | None, *, in_azure: bool) -> ModelSettings:
    azure_endpoint = read.url("AZURE_OPENAI_ENDPOINT")
    api_key: str | None
    if azure_endpoint is not None:
        provider = ModelProvider.AZURE
        model = read.text("AZURE_OPENAI_DEPLOYMENT")
        if model is None:
            raise SettingsError("AZURE_OPENAI_DEPLOYMENT", "is required with AZURE_OPENAI_ENDPOINT")
        api_key = read.text("AZURE_OPENAI_API_KEY")
    elif any(read.given(name) for name in _MODEL_SETTINGS):
        if read.text("AZURE_OPENAI_DEPLOYMENT") or read.text("AZURE_OPENAI_API_KEY"):
            raise SettingsError("AZURE_OPENAI_ENDPOINT", "is required with the other AZURE_OPENAI_ "
                                "settings")
        provider = ModelProvider.OPENAI
        model = read.required_text("OPENAI_MODEL")
        api_key = read.text("OPENAI_API_KEY")
        if api_key is None and read.text("OPENAI_BASE_URL") is None:
            raise SettingsError("OPENAI_API_KEY", "is required unless OPENAI_BASE_URL points at "
                                "a server that needs no key")
    else:
        if in_azure:
            raise SettingsError("AZURE_OPENAI_ENDPOINT", "no model is configured; in Azure set "
                                "AZURE_OPENAI_ENDPOINT (or OPENAI_API_KEY / OPENAI_BASE_URL)")
        provider, model, api_key = ModelProvider.OFFLINE, "offline-stand-in", None
    return ModelSettings(
        provider=provider,
        model=model,
        api_key=api_key,
        base_url=read.url("OPENAI_BASE_URL"),
        azure_endpoint=azure_endpoint,
        api_version=read.required_text("OPENAI_API_VERSION"),
        managed_identity_client_id=identity,
        instructions=read.required_text("CHAT_INSTRUCTIONS"),
        history_token_budget=read.integer("CHAT_HISTORY_TOKEN_BUDGET", minimum=16,
                                          maximum=2_000_000),
        history_max_messages=read.integer("CHAT_HISTORY_MAX_MESSAGES", minimum=1, maximum=5_000),
        max_reply_tokens=read.integer("CHAT_MAX_REPLY_TOKENS", minimum=1, maximum=1_000_000),
        timeout_seconds=read.number("CHAT_MODEL_TIMEOUT_SECONDS", minimum=0.05, maximum=600),
        max_retries=read.integer("CHAT_MODEL_MAX_RETRIES", minimum=0, maximum=10),
        max_tool_rounds=read.integer("CHAT_MAX_TOOL_ROUNDS", minimum=1, maximum=20),
        tool_timeout_seconds=read.number("CHAT_TOOL_TIMEOUT_SECONDS", minimum=0.01, maximum=600),
        tools_token_budget=_tools_token_budget(read),
    )


def _tools_token_budget(read: _Reader) -> int:
    """CHAT_TOOLS_TOKEN_BUDGET, at most half the history budget (the default is cut to fit)."""
    half = read.integer("CHAT_HISTORY_TOKEN_BUDGET", minimum=16, maximum=2_000_000) // 2
    budget = read.integer("CHAT_TOOLS_TOKEN_BUDGET", minimum=0, maximum=1_000_000)
    if budget > half and read.given("CHAT_TOOLS_TOKEN_BUDGET"):
        raise SettingsError("CHAT_TOOLS_TOKEN_BUDGET", f"must be at most half of "
                            f"CHAT_HISTORY_TOKEN_BUDGET ({half:,}), got {budget:,}")
    return min(budget, half)


def _summary(read: _Reader, model: ModelSettings) -> SummarySettings:
    switch = read.required_text("CHAT_SUMMARY").lower()
    if switch not in ("on", "off"):
        raise SettingsError("CHAT_SUMMARY", f"must be on or off, got {switch!r}")
    return SummarySettings(
        enabled=switch == "on",
        model=read.text("CHAT_SUMMARY_MODEL") or model.model,
        token_budget=read.integer("CHAT_SUMMARY_TOKEN_BUDGET", minimum=64, maximum=5_000),
    )


def _bot(read: _Reader, identity: str | None) -> BotSettings:
    raw_type = read.required_text("BOT_APP_TYPE")
    try:
        app_type = BotAppType(raw_type)
    except ValueError:
        choices = ", ".join(kind.value for kind in BotAppType)
        raise SettingsError("BOT_APP_TYPE", f"must be one of {choices}, got {raw_type!r}") from None
    client_id = read.text("CLIENT_ID")
    tenant_id = read.text("TENANT_ID")
    if app_type is not BotAppType.MULTI_TENANT and client_id and not tenant_id:
        raise SettingsError("TENANT_ID", f"is required when BOT_APP_TYPE is {app_type.value}")
    return BotSettings(
        client_id=client_id,
        client_secret=read.text("CLIENT_SECRET"),
        tenant_id=tenant_id,
        app_type=app_type,
        openid_metadata_url=read.url("BOT_OPENID_METADATA_URL") or BOTFRAMEWORK_OPENID_METADATA,
        authority_host=read.url("BOT_AUTHORITY_HOST") or "https://login.microsoftonline.com",
        managed_identity_client_id=identity,
        service_url_hosts=_host_patterns(read.required_text("BOT_SERVICE_URL_HOSTS")),
    )


def check_credential_settings(settings: BotSettings) -> None:
    """`SettingsError` when the bot's settings cannot make its credential (checked at start-up,
    before the connector and azure-identity are loaded)."""
    if settings.client_id and settings.app_type is not BotAppType.USER_ASSIGNED_MSI and \
            not settings.client_secret:
        raise SettingsError("CLIENT_SECRET", f"is required when BOT_APP_TYPE is "
                            f"{settings.app_type.value} (or use UserAssignedMSI)")


#: A host name of at least two labels (so `*.com` is refused): letters, digits, hyphens.
_HOST = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def _host_patterns(raw: str, *, name: str = "BOT_SERVICE_URL_HOSTS") -> tuple[str, ...]:
    patterns = tuple(part.strip().lower() for part in raw.split(",") if part.strip())
    for pattern in patterns:
        host = pattern.removeprefix("*.")
        if not (_HOST.match(host) or host == "localhost" or _is_ip(host)):
            raise SettingsError(name, f"{pattern!r} is not a host name, IP "
                                "address or *.domain pattern (no scheme, port or path)")
    if not patterns:
        raise SettingsError(name, "lists no host")
    return patterns


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
