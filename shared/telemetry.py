"""Traces and metrics (OpenTelemetry): which exporter the settings choose, and the turn's instruments.

`setup(settings)` runs once per worker: Application Insights through the Azure Monitor distro when
APPLICATIONINSIGHTS_CONNECTION_STRING is set, OTLP over http/protobuf when
OTEL_EXPORTER_OTLP_ENDPOINT is set (both may be), else nothing: then every helper here returns a
shared no-op at the cost of one attribute read, and the OpenTelemetry SDK is never imported.

The other modules open spans with the small context managers below; a turn's tree is

    chatstate.turn                     (gen_ai.conversation.id, attempts, conflicts, model calls)
    ├── chatstate.auth
    ├── chatstate.window.load          (rows read, round trips, messages; once per attempt)
    ├── chat {model}                   (GenAI semantic conventions; one per model call)
    ├── execute_tool {name}            (one per tool call, after the model call that asked for it;
    │                                   chatstate.tool.origin: python or mcp:<server>)
    ├── chatstate.mcp.discover         (an MCP server's tools listed: first use, then in the
    │                                   background after its refresh period)
    ├── chatstate.commit               (attempt; conflict)
    ├── chatstate.reply                (each message, typing or stream update sent)
    ├── chatstate.delivered
    └── chatstate.summary              (when one is due, after the reply: its own `chat` call)

Message text (prompts, replies, tool arguments and results) is recorded only with
OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true. Without it, a failed span's exception
event carries the exception's own message and frames only, not the chained causes (an SDK's
error quoting a provider's answer, which may quote the prompt).
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider

    from .settings import TelemetrySettings

__all__ = ["Telemetry", "TurnStats", "model_call", "setup", "span", "state", "turn"]

log = logging.getLogger(__name__)

SCOPE = "chatstate"


class _NoSpan:
    """What a helper yields when telemetry is off: every call is a no-op."""

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        pass


_NO_SPAN = _NoSpan()
_OFF: AbstractContextManager[Any] = nullcontext(_NO_SPAN)


@dataclass
class TurnStats:
    """What one turn's stages report to its span and metrics."""

    model_calls: int = 0
    commits: int = 0
    conflicts: int = 0
    status: int = 0


_turn: ContextVar[TurnStats | None] = ContextVar("chatstate_turn_stats", default=None)


@dataclass
class Telemetry:
    """The tracer and instruments in use; `enabled` False: nothing is recorded."""

    enabled: bool = False
    capture_content: bool = False
    exporters: tuple[str, ...] = ()
    tracer: Any = None
    instruments: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def using(cls, *, tracer_provider: TracerProvider, meter_provider: MeterProvider,
              capture_content: bool = False, exporters: Sequence[str] = ()) -> Telemetry:
        """Telemetry through these providers (setup's, or a test's in-memory ones)."""
        meter = meter_provider.get_meter(SCOPE)
        return cls(
            enabled=True, capture_content=capture_content, exporters=tuple(exporters),
            tracer=tracer_provider.get_tracer(SCOPE),
            instruments={
                "turns": meter.create_counter(
                    "chatstate.turns", unit="{turn}",
                    description="Activities handled, by activity type and HTTP status"),
                "turn_duration": meter.create_histogram(
                    "chatstate.turn.duration", unit="s",
                    description="Time to handle one activity, from parse to response"),
                "model_calls": meter.create_histogram(
                    "chatstate.turn.model_calls", unit="{call}",
                    description="Model calls one message turn made (retries after conflicts too)"),
                "tokens": meter.create_counter(
                    "chatstate.model.tokens", unit="{token}",
                    description="Model tokens by gen_ai.token.type: input, output, cache_read"),
                "conflicts": meter.create_counter(
                    "chatstate.commit.conflicts", unit="{conflict}",
                    description="Commits refused because another turn committed first"),
                "storage_duration": meter.create_histogram(
                    "chatstate.storage.duration", unit="s",
                    description="One Table Storage call (retries included), by operation"),
                "tool_duration": meter.create_histogram(
                    "chatstate.tool.duration", unit="s",
                    description="One tool call, by gen_ai.tool.name, chatstate.tool.origin "
                    "(python or mcp:<server>) and error.type"),
                "tool_decisions": meter.create_counter(
                    "chatstate.tool.decisions", unit="{call}",
                    description="Tool calls held back for a person, and what became of them, by "
                    "chatstate.decision.outcome (held, approved, denied, expired, superseded), "
                    "chatstate.decision.reason (approval), gen_ai.tool.name and "
                    "chatstate.tool.origin; never the arguments"),
                "spend_limit_reached": meter.create_counter(
                    "chatstate.spend_limit_reached", unit="{turn}",
                    description="Turns (or tool rounds) refused by a spend limit or budget, by "
                    "chatstate.limit and chatstate.tenant.id; no model call"),
                "budget_tokens": meter.create_counter(
                    "chatstate.budget.tokens", unit="{token}",
                    description="Model tokens counted against budgets, by chatstate.budget.level "
                    "(user, tenant), gen_ai.token.type and chatstate.tenant.id; never a user"),
            })


state = Telemetry()


def setup(settings: TelemetrySettings) -> Telemetry:
    """Choose the exporters from the settings and install them (once per process)."""
    global state
    exporters: list[str] = []
    if settings.applicationinsights_connection_string:
        exporters.append("azure-monitor")
    if settings.otlp_endpoint:
        exporters.append("otlp")
    if not exporters:
        state = Telemetry(capture_content=settings.capture_content)
        return state
    from opentelemetry import metrics, trace

    span_processors, metric_readers = _otlp(settings.otlp_endpoint)
    if settings.applicationinsights_connection_string:
        from azure.monitor.opentelemetry import configure_azure_monitor

        # Logs keep going through the Functions host (its OpenTelemetry mode correlates them
        # with the invocation's trace): exporting them here too would store each line twice.
        configure_azure_monitor(connection_string=settings.applicationinsights_connection_string,
                                disable_logging=True, span_processors=span_processors,
                                metric_readers=metric_readers, resource=_resource(settings))
    else:
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

        tracer_provider = SdkTracerProvider(resource=_resource(settings))
        for processor in span_processors:
            tracer_provider.add_span_processor(processor)
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(SdkMeterProvider(resource=_resource(settings),
                                                    metric_readers=metric_readers))
    state = Telemetry.using(tracer_provider=trace.get_tracer_provider(),
                            meter_provider=metrics.get_meter_provider(),
                            capture_content=settings.capture_content, exporters=exporters)
    log.info("telemetry: traces and metrics to %s%s", " and ".join(exporters),
             "; message content captured" if settings.capture_content else "")
    return state


def _resource(settings: TelemetrySettings) -> Any:
    from opentelemetry.sdk.resources import Resource

    return Resource.create({"service.name": settings.service_name})


def _otlp(endpoint: str | None) -> tuple[list[Any], list[Any]]:
    if not endpoint:
        return [], []
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    base = endpoint.rstrip("/")
    return ([BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces"))],
            [PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{base}/v1/metrics"))])


# -- spans ------------------------------------------------------------------------------------------


def span(name: str, attributes: dict[str, Any] | None = None, *, kind: str = "internal",
         failures: tuple[type[BaseException], ...] = (Exception,),
         expected: tuple[type[BaseException], ...] = ()) -> AbstractContextManager[Any]:
    """A child span of the current one. An exception of `failures` (but not of `expected`) marks
    it failed; others end it as it is (the caller sets what they mean)."""
    if not state.enabled:
        return _OFF
    return _span(name, attributes, kind, failures, expected)


@contextmanager
def _span(name: str, attributes: dict[str, Any] | None, kind: str,
          failures: tuple[type[BaseException], ...],
          expected: tuple[type[BaseException], ...]) -> Iterator[Span]:
    from opentelemetry.trace import SpanKind, Status, StatusCode

    with state.tracer.start_as_current_span(
            name, kind=SpanKind.CLIENT if kind == "client" else SpanKind.INTERNAL,
            attributes=attributes, record_exception=False,
            set_status_on_exception=False) as current:
        try:
            yield current
        except BaseException as exc:
            if isinstance(exc, failures) and not isinstance(exc, expected):
                _record(current, exc)
                current.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))
                current.set_attribute("error.type", type(exc).__name__)
            raise


def _record(current: Span, exc: BaseException) -> None:
    """The exception event; with capture off, without the chained causes' messages."""
    if state.capture_content:
        current.record_exception(exc)
        return
    stack = "".join(traceback.format_exception(exc, chain=False))
    current.record_exception(exc, attributes={"exception.stacktrace": stack})


@contextmanager
def turn(activity_type: str, conversation_id: str) -> Iterator[TurnStats]:
    """The span of one handled activity, and its metrics when it ends."""
    if not state.enabled:
        yield TurnStats()
        return
    stats = TurnStats()
    token = _turn.set(stats)
    started = time.perf_counter()
    try:
        with _span("chatstate.turn", {"chatstate.activity.type": activity_type,
                                      "gen_ai.conversation.id": conversation_id},
                   "internal", (Exception,), ()) as current:
            try:
                yield stats
            finally:
                current.set_attributes({"http.response.status_code": stats.status,
                                        "chatstate.turn.attempts": stats.commits,
                                        "chatstate.turn.conflicts": stats.conflicts,
                                        "chatstate.turn.model_calls": stats.model_calls})
    finally:
        _turn.reset(token)
        measured = {"chatstate.activity.type": activity_type,
                    "http.response.status_code": stats.status}
        state.instruments["turns"].add(1, measured)
        state.instruments["turn_duration"].record(time.perf_counter() - started, measured)
        if activity_type == "message" and stats.model_calls:
            state.instruments["model_calls"].record(stats.model_calls)


def outside_turn() -> AbstractContextManager[Any]:
    """Work a turn starts that is not the turn's (the rolling summary): its model calls are not
    counted as the turn's."""
    if not state.enabled:
        return _OFF
    return _outside_turn()


@contextmanager
def _outside_turn() -> Iterator[None]:
    token = _turn.set(None)
    try:
        yield
    finally:
        _turn.reset(token)


@contextmanager
def commit() -> Iterator[Any]:
    """The commit span; a conflict is counted, on the turn and in the metric."""
    if not state.enabled:
        yield _NO_SPAN
        return
    from .errors import ConversationConflict, DuplicateActivity

    stats = _turn.get()
    if stats is not None:
        stats.commits += 1
    with _span("chatstate.commit", {"chatstate.commit.attempt": stats.commits if stats else 1},
               "internal", (Exception,), (ConversationConflict, DuplicateActivity)) as current:
        try:
            yield current
        except ConversationConflict:
            current.set_attribute("chatstate.commit.conflict", True)
            state.instruments["conflicts"].add(1)
            if stats is not None:
                stats.conflicts += 1
            raise
        except DuplicateActivity:
            current.set_attribute("chatstate.commit.duplicate", True)
            raise


def model_call(*, model: str, provider: str, max_tokens: int | None,
               messages: list[dict[str, Any]], failures: tuple[type[BaseException], ...]
               ) -> AbstractContextManager[Any]:
    """A GenAI `chat {model}` span (CLIENT); the caller reports the answer with `completed`."""
    if not state.enabled:
        return _OFF
    stats = _turn.get()
    if stats is not None:
        stats.model_calls += 1
    attributes: dict[str, Any] = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": provider,
                                  "gen_ai.request.model": model}
    if max_tokens:
        attributes["gen_ai.request.max_tokens"] = max_tokens
    if state.capture_content:
        attributes["gen_ai.input.messages"] = json.dumps(messages, ensure_ascii=False)
    return _span(f"chat {model}", attributes, "client", failures, ())


def completed(current: Any, *, model: str, input_tokens: int, output_tokens: int,
              cached_tokens: int, finish_reason: str, output: dict[str, Any] | None) -> None:
    """Report a model call's answer on its span and in the token metric."""
    if not state.enabled:
        return
    current.set_attributes({"gen_ai.response.model": model,
                            "gen_ai.usage.input_tokens": input_tokens,
                            "gen_ai.usage.output_tokens": output_tokens,
                            "gen_ai.usage.cache_read.input_tokens": cached_tokens,
                            "gen_ai.response.finish_reasons": [finish_reason]})
    if state.capture_content and output is not None:
        current.set_attribute("gen_ai.output.messages", json.dumps([output], ensure_ascii=False))
    tokens = state.instruments["tokens"]
    for kind, count in (("input", input_tokens), ("output", output_tokens),
                        ("cache_read", cached_tokens)):
        if count:
            tokens.add(count, {"gen_ai.token.type": kind, "gen_ai.response.model": model})


def tool_call(*, name: str, call_id: str, arguments: str,
              origin: str = "python") -> AbstractContextManager[Any]:
    """An `execute_tool {name}` span; the result is recorded only when content is captured."""
    if not state.enabled:
        return _OFF
    attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name,
                  "gen_ai.tool.call.id": call_id, "chatstate.tool.origin": origin}
    if state.capture_content:
        attributes["gen_ai.tool.call.arguments"] = arguments
    return _span(f"execute_tool {name}", attributes, "internal", (Exception,), ())


def tool_result(current: Any, result: str, *, name: str = "", origin: str = "python",
                failed: bool = False) -> None:
    """A tool call's end: its duration in the metric; its text only when content is captured."""
    if not state.enabled:
        return
    if state.capture_content:
        current.set_attribute("gen_ai.tool.call.result", result)
    started = getattr(current, "start_time", None)  # the SDK span's, in ns since the epoch
    measured = {"gen_ai.tool.name": name, "chatstate.tool.origin": origin}
    if failed:
        measured["error.type"] = "tool_error"
    if isinstance(started, int):
        state.instruments["tool_duration"].record((time.time_ns() - started) / 1e9, measured)


def tool_decided(*, name: str, origin: str, reason: str, outcome: str) -> None:
    """A tool call held back for a person (`held`), or what became of it."""
    if state.enabled:
        state.instruments["tool_decisions"].add(1, {
            "gen_ai.tool.name": name, "chatstate.tool.origin": origin,
            "chatstate.decision.reason": reason, "chatstate.decision.outcome": outcome})


def spend_limit_reached(limit: str, *, tenant: str | None = None) -> None:
    """A turn refused by a spend limit (`CHAT_MAX_TURNS_PER_MINUTE`, `CHAT_DAILY_TOKEN_LIMIT`) or
    a budget (`user_daily_tokens`, `user_turns_per_minute`, `tenant_daily_tokens`)."""
    if state.enabled:
        attributes = {"chatstate.limit": limit}
        if tenant:
            attributes["chatstate.tenant.id"] = tenant
        state.instruments["spend_limit_reached"].add(1, attributes)


def budget_tokens(input_tokens: int, output_tokens: int, *, level: str,
                  tenant: str | None) -> None:
    """Tokens counted against a user's or a tenant's budget (`shared/budgets.py`). The tenant is
    an attribute; the user never is (a person's ID is not a metric's)."""
    if not state.enabled:
        return
    for kind, count in (("input", input_tokens), ("output", output_tokens)):
        if count:
            state.instruments["budget_tokens"].add(count, {
                "chatstate.budget.level": level, "gen_ai.token.type": kind,
                "chatstate.tenant.id": tenant or "none"})


def storage_call(operation: str, seconds: float) -> None:
    """One store call's duration (the metric only: Azure's SDK traces the calls themselves)."""
    if state.enabled:
        state.instruments["storage_duration"].record(seconds, {"chatstate.storage.operation":
                                                               operation})
