"""Traces and metrics of a turn (no I/O): the real ChatBot on the in-memory store, the real openai
SDK over a mock transport, the OpenTelemetry SDK's in-memory span exporter and metric reader."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared import telemetry
from shared.auth import BotAuthenticator
from shared.bot import ChatBot
from shared.connector import BotConnector
from shared.errors import ConversationConflict
from shared.limits import Spend
from shared.messages import ChatMessage, StoredTurn
from shared.model import build_model
from shared.prompt import ChatPrompt
from shared.settings import TelemetrySettings, load_settings
from shared.store import ConversationWindow, InMemoryConversationStore
from shared.tools import tool

SECRET_QUESTION = "what is the launch code for project heron"
SECRET_REPLY = "the code is tangerine-42"
TOOL_SECRET = "vault-says-zebra"
HEADERS = {"Content-Type": "application/json"}


@tool
async def lookup_code(project: str) -> dict[str, str]:
    """Look up a project's code."""
    return {"project": project, "note": TOOL_SECRET}


class ToolThenAnswer:
    """The model at the transport: first a tool call, then the answer, each with usage."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.calls += 1
        body = json.loads(request.content)
        used_tool = any(message["role"] == "tool" for message in body["messages"])
        message: dict[str, Any] = {"role": "assistant", "content": SECRET_REPLY} if used_tool else {
            "role": "assistant", "content": None, "tool_calls": [{
                "id": f"call-{self.calls}", "type": "function",
                "function": {"name": "lookup_code", "arguments": '{"project": "heron"}'}}]}
        return httpx2.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": "m-2024",
            "choices": [{"index": 0, "finish_reason": "stop" if used_tool else "tool_calls",
                         "message": message}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110,
                      "prompt_tokens_details": {"cached_tokens": 64}}})


class RecordingConnector(BotConnector):
    """The Bot Connector with its HTTP call replaced: what was sent is kept."""

    def __init__(self) -> None:
        super().__init__(credential=None)
        self.sent: list[dict[str, Any]] = []

    async def _send(self, service_url: str, conversation_id: str,
                    activity: dict[str, Any]) -> str | None:
        self.sent.append(activity)
        return f"reply-{len(self.sent)}"


class ConflictOnce(InMemoryConversationStore):
    """Another worker commits first, once."""

    def __init__(self) -> None:
        super().__init__()
        self.conflicted = False

    async def _commit_turn(self, window: ConversationWindow, *, activity_id: str,
                           activity_ids: tuple[str, ...], messages: list[ChatMessage],
                           tokens: list[int], spend: Spend) -> StoredTurn:
        if not self.conflicted:
            self.conflicted = True
            raise ConversationConflict("someone else won")
        return await super()._commit_turn(window, activity_id=activity_id,
                                          activity_ids=activity_ids, messages=messages,
                                          tokens=tokens, spend=spend)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[InMemorySpanExporter,
                                                                 InMemoryMetricReader]]:
    """Telemetry on, into memory (the providers are this test's, not the process's)."""
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    monkeypatch.setattr(telemetry, "state", telemetry.Telemetry.using(
        tracer_provider=tracer_provider, meter_provider=MeterProvider(metric_readers=[reader])))
    yield spans, reader
    tracer_provider.shutdown()


def make_bot(store: InMemoryConversationStore, model: ToolThenAnswer,
             connector: BotConnector) -> ChatBot:
    settings = load_settings({"OPENAI_API_KEY": "sk-test", "OPENAI_MODEL": "m",
                              "CHAT_STREAMING": "off"})
    chat_model = build_model(settings.model,
                             http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(model)))
    return ChatBot(settings=settings, store=store,
                   prompt=ChatPrompt(chat_model, functions=[lookup_code]), connector=connector,
                   authenticator=BotAuthenticator(settings.bot, http=httpx2.AsyncClient(),
                                                  in_azure=False),
                   sleep=lambda _: asyncio.sleep(0))


def message(text: str, conversation: str = "c-1") -> bytes:
    return json.dumps({"type": "message", "id": uuid.uuid4().hex, "text": text,
                       "channelId": "test", "serviceUrl": "http://127.0.0.1:9",
                       "conversation": {"id": conversation}, "from": {"id": "user-1"},
                       "recipient": {"id": "bot"}}).encode()


def by_name(spans: tuple[ReadableSpan, ...] | list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    found: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        found.setdefault(span.name, []).append(span)
    return found


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    return {metric.name: list(metric.data.data_points)
            for resource in data.resource_metrics for scope in resource.scope_metrics
            for metric in scope.metrics}


def everything_recorded(spans: tuple[ReadableSpan, ...]) -> str:
    return json.dumps([{"name": span.name, "attributes": dict(span.attributes or {}),
                        "events": [dict(event.attributes or {}) for event in span.events]}
                       for span in spans], default=str)


async def test_a_turn_is_one_span_with_a_child_for_each_stage(recorded: Any) -> None:
    spans, reader = recorded
    # GIVEN a bot whose model calls a tool, then answers; replies go through the connector
    connector, model = RecordingConnector(), ToolThenAnswer()
    bot = make_bot(InMemoryConversationStore(), model, connector)
    # WHEN one message is handled
    response = await bot.handle(body=message(SECRET_QUESTION), headers=HEADERS)
    # THEN one turn span holds a child for each stage, in order
    assert response.status == 200 and model.calls == 2
    finished = spans.get_finished_spans()
    named = by_name(finished)
    (root,) = named["chatstate.turn"]
    assert root.parent is None
    children = sorted((s for s in finished if s.parent and s.parent.span_id == root.context.span_id),
                      key=lambda s: s.start_time or 0)
    stages = [s.name for s in children if s.name != "chatstate.reply"]
    assert stages == ["chatstate.auth", "chatstate.window.load", "chat m", "execute_tool lookup_code",
                      "chat m", "chatstate.commit", "chatstate.delivered"]
    assert sorted(s.attributes["chatstate.reply.kind"] for s in named["chatstate.reply"]) == \
        ["message", "typing"]
    assert all(s.parent and s.parent.span_id == root.context.span_id for s in named["chatstate.reply"])
    # AND the turn and each model call carry their attributes (GenAI semantic conventions)
    assert root.attributes is not None
    assert root.attributes["gen_ai.conversation.id"] == "c-1"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["chatstate.turn.attempts"] == 1
    assert root.attributes["chatstate.turn.conflicts"] == 0
    assert root.attributes["chatstate.turn.model_calls"] == 2
    call = named["chat m"][1].attributes
    assert call is not None
    assert {key: call[key] for key in (
        "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
        "gen_ai.response.model", "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
        "gen_ai.usage.cache_read.input_tokens")} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "m", "gen_ai.response.model": "m-2024",
        "gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 10,
        "gen_ai.usage.cache_read.input_tokens": 64}
    assert named["chat m"][0].attributes["gen_ai.response.finish_reasons"] == ("tool_calls",)  # type: ignore[index]
    tool_span = named["execute_tool lookup_code"][0].attributes
    assert tool_span is not None and tool_span["gen_ai.tool.name"] == "lookup_code"
    assert named["chatstate.window.load"][0].attributes["chatstate.window.round_trips"] >= 0  # type: ignore[index]
    # AND the metrics count the turn, its model calls and its tokens by kind
    points = metric_points(reader)
    assert [p.value for p in points["chatstate.turns"]] == [1]
    assert points["chatstate.turn.duration"][0].count == 1
    assert points["chatstate.turn.model_calls"][0].sum == 2
    tokens = {p.attributes["gen_ai.token.type"]: p.value for p in points["chatstate.model.tokens"]}
    assert tokens == {"input": 200, "output": 20, "cache_read": 128}


async def test_no_message_text_is_recorded_by_default(recorded: Any) -> None:
    spans, _ = recorded
    # GIVEN telemetry on with its default settings (message content not captured)
    bot = make_bot(InMemoryConversationStore(), ToolThenAnswer(), RecordingConnector())
    # WHEN a turn with a tool call is handled
    await bot.handle(body=message(SECRET_QUESTION), headers=HEADERS)
    # THEN neither the question, the reply, the tool's arguments nor its result is in any span
    recorded_text = everything_recorded(spans.get_finished_spans())
    assert "chat m" in recorded_text
    for secret in (SECRET_QUESTION, SECRET_REPLY, TOOL_SECRET, "heron"):
        assert secret not in recorded_text


async def test_message_text_is_recorded_when_capture_is_on(
        recorded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    spans, _ = recorded
    # GIVEN OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true
    monkeypatch.setattr(telemetry.state, "capture_content", True)
    bot = make_bot(InMemoryConversationStore(), ToolThenAnswer(), RecordingConnector())
    # WHEN a turn with a tool call is handled
    await bot.handle(body=message(SECRET_QUESTION), headers=HEADERS)
    # THEN the model spans hold the messages and the tool span its arguments and result
    named = by_name(spans.get_finished_spans())
    first, second = (s.attributes for s in named["chat m"])
    assert first is not None and second is not None
    assert SECRET_QUESTION in str(first["gen_ai.input.messages"])
    assert SECRET_REPLY in str(second["gen_ai.output.messages"])
    tool_span = named["execute_tool lookup_code"][0].attributes
    assert tool_span is not None and "heron" in str(tool_span["gen_ai.tool.call.arguments"])
    assert TOOL_SECRET in str(tool_span["gen_ai.tool.call.result"])


async def test_a_conflict_shows_as_a_second_commit_attempt(recorded: Any) -> None:
    spans, reader = recorded
    # GIVEN a store where another worker commits first once
    bot = make_bot(ConflictOnce(), ToolThenAnswer(), RecordingConnector())
    # WHEN a message is handled
    response = await bot.handle(body=message("hello"), headers=HEADERS)
    # THEN the turn shows two commit attempts, the first a conflict, and the metric counts it
    assert response.status == 200
    named = by_name(spans.get_finished_spans())
    commits = sorted(named["chatstate.commit"], key=lambda s: s.start_time or 0)
    assert [(c.attributes or {}).get("chatstate.commit.conflict") for c in commits] == [True, None]
    assert [(c.attributes or {})["chatstate.commit.attempt"] for c in commits] == [1, 2]
    assert all(c.status.is_ok for c in commits)  # a conflict is not a failure
    (root,) = named["chatstate.turn"]
    assert root.attributes is not None
    assert (root.attributes["chatstate.turn.attempts"], root.attributes["chatstate.turn.conflicts"],
            root.attributes["chatstate.turn.model_calls"]) == (2, 1, 4)
    assert len(named["chatstate.window.load"]) == 2
    assert [p.value for p in metric_points(reader)["chatstate.commit.conflicts"]] == [1]


async def test_a_failed_model_call_is_an_error_span() -> None:
    # GIVEN telemetry into memory and a model that answers 400
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(telemetry, "state", telemetry.Telemetry.using(
            tracer_provider=provider, meter_provider=MeterProvider()))

        async def refusing(request: httpx2.Request) -> httpx2.Response:
            return httpx2.Response(400, json={"error": {"message": "bad", "code": "bad_request"}})

        bot = make_bot(InMemoryConversationStore(), refusing, RecordingConnector())  # type: ignore[arg-type]
        # WHEN a message is handled
        await bot.handle(body=message("hello"), headers=HEADERS)
    # THEN the model span failed with the error's type, and the turn still answered (apology)
    (call,) = by_name(spans.get_finished_spans())["chat m"]
    assert not call.status.is_ok and call.attributes is not None
    assert call.attributes["error.type"] == "ModelRejected"


def test_with_no_exporter_configured_nothing_is_recorded() -> None:
    # GIVEN neither APPLICATIONINSIGHTS_CONNECTION_STRING nor OTEL_EXPORTER_OTLP_ENDPOINT
    settings = load_settings({}).telemetry
    assert settings == TelemetrySettings()
    # WHEN telemetry is set up
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(telemetry, "state", telemetry.state)
        chosen = telemetry.setup(settings)
        # THEN nothing is exported, and every helper is the shared no-op
        assert chosen.enabled is False and chosen.exporters == ()
        assert telemetry.span("x") is telemetry.span("y")
        with telemetry.span("chatstate.auth") as span:
            span.set_attribute("anything", 1)


def test_the_telemetry_settings_are_read_and_checked() -> None:
    # GIVEN an OTLP endpoint, content capture on, and a bad connection string
    read = load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318/",
                          "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"}).telemetry
    # WHEN they are read
    # THEN the endpoint and the switch are taken, and a bad value names its setting
    assert read.otlp_endpoint == "http://127.0.0.1:4318" and read.capture_content is True
    with pytest.raises(Exception, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
        load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4318"})
    with pytest.raises(Exception, match="APPLICATIONINSIGHTS_CONNECTION_STRING"):
        load_settings({"APPLICATIONINSIGHTS_CONNECTION_STRING": "not a connection string"})


async def test_a_turn_refused_by_a_spend_limit_is_counted_by_limit(recorded: Any) -> None:
    # GIVEN a bot allowing one turn a minute per conversation
    _, reader = recorded
    settings = load_settings({"OPENAI_API_KEY": "sk-test", "OPENAI_MODEL": "m",
                              "CHAT_STREAMING": "off", "CHAT_MAX_TURNS_PER_MINUTE": "1"})
    model = ToolThenAnswer()
    bot = ChatBot(settings=settings, store=InMemoryConversationStore(),
                  prompt=ChatPrompt(build_model(settings.model, http_client=httpx2.AsyncClient(
                      transport=httpx2.MockTransport(model))), functions=[lookup_code]),
                  connector=RecordingConnector(),
                  authenticator=BotAuthenticator(settings.bot, http=httpx2.AsyncClient(),
                                                 in_azure=False))
    # WHEN two messages arrive at once in one conversation
    for text in ("first", "second"):
        await bot.handle(body=message(text), headers=HEADERS)
    # THEN the second is counted as refused by the turns-per-minute limit
    (point,) = metric_points(reader)["chatstate.spend_limit_reached"]
    assert point.value == 1 and dict(point.attributes) == {"chatstate.limit": "turns_per_minute"}
