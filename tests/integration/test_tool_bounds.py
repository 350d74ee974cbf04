"""Tools that cost too much or say too much (from the attack-and-fault review): a huge schema, more
tool definitions than a request may carry, a name two servers claim, a name the model invented.
The MCP servers are the demo server over real HTTP; the model is faked at HTTP."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Annotated, Any

import pytest
from pydantic import Field

from devtools.fake_model import FakeModelServer, Scripted, tool_call
from devtools.mcp_server import DemoMcpServer
from shared import telemetry
from shared.mcp import McpTools
from shared.prompt import ChatPrompt
from shared.settings import McpServerSettings
from shared.tools import MAX_TOOL_SPEC_CHARS, Function, tool
from tests.integration.tool_model import model_for

pytestmark = pytest.mark.usefixtures("models_closed")


@tool
async def add(a: int, b: int) -> int:
    """Add two whole numbers."""
    return a + b


def demo(url: str, name: str = "demo") -> McpServerSettings:
    return McpServerSettings(name=name, url=url, tools=("*",), trusted=True, timeout_seconds=5.0)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    """Telemetry on, into memory, message capture off."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    monkeypatch.setattr(telemetry, "state", telemetry.Telemetry.using(
        tracer_provider=provider, meter_provider=MeterProvider(metric_readers=[reader])))
    yield spans, reader
    provider.shutdown()


def offered(request: dict) -> list[str]:
    return [spec["function"]["name"] for spec in request.get("tools") or []]


async def test_a_tool_with_a_huge_schema_is_left_out_and_the_request_stays_small(
        model_server: FakeModelServer, mcp_server: DemoMcpServer,
        caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN a server tool whose input schema is about 380 KB
    @mcp_server.mcp.tool(annotations={"readOnlyHint": True})
    async def bloated(query: Annotated[str, Field(description="x" * 380_000)]) -> str:
        """A tool with a huge schema."""
        return query

    tools = McpTools([demo(mcp_server.url)])
    try:
        # WHEN a turn runs
        with caplog.at_level(logging.WARNING):
            await ChatPrompt(model_for(model_server), functions=[add], tool_sources=[tools]).send("hi")
    finally:
        await tools.close()
    # THEN the model was offered the others, not it, and the request stayed small
    assert offered(model_server.requests[0]) == ["add", "search_docs", "delete_notes"]
    assert len(json.dumps(model_server.requests[0])) < 10_000
    # AND the log says why, with the size
    assert "tool 'bloated' left out: its input schema is 380," in caplog.text


def test_a_python_tool_with_a_huge_schema_is_refused_where_it_is_defined() -> None:
    # GIVEN a schema longer than a tool's definition may be
    async def handler(**arguments: object) -> str:
        return ""

    schema = {"type": "object", "properties": {"q": {"type": "string",
                                                     "description": "x" * MAX_TOOL_SPEC_CHARS}}}
    # WHEN the tool is defined THEN it is refused, naming the limit
    with pytest.raises(ValueError, match=r"schema is 16,0\d\d characters"):
        Function("big", "A big one.", handler, schema)


async def test_tools_past_the_requests_token_budget_are_left_out_and_counted(
        model_server: FakeModelServer, caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN twenty tools with a long description each, and a budget that holds about five
    tools = [Function(f"tool_{n}", "Does something. " * 20, add.handler) for n in range(20)]
    prompt = ChatPrompt(model_for(model_server), functions=tools, tools_token_budget=600)
    # WHEN a turn runs
    with caplog.at_level(logging.WARNING):
        await prompt.send("hi")
    # THEN only the first ones that fit were offered, and they take at most the budget
    names = offered(model_server.requests[0])
    assert names == [f"tool_{n}" for n in range(len(names))] and 1 < len(names) < 20
    spent = await prompt.tools_tokens()
    assert 0 < spent <= 600
    assert "tool tool_19 (python) left out: the tools of a request may take 600 tokens" in caplog.text


async def test_a_name_two_servers_list_is_warned_once_per_discovery(
        model_server: FakeModelServer, mcp_server: DemoMcpServer,
        caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN two servers listing the same tools (the second's are left out: the names are taken)
    tools = McpTools([demo(mcp_server.url, "first"), demo(mcp_server.url, "second")])
    prompt = ChatPrompt(model_for(model_server), tool_sources=[tools])
    try:
        # WHEN five turns run on one discovery
        with caplog.at_level(logging.WARNING):
            for n in range(5):
                await prompt.send(f"turn {n}")
    finally:
        await tools.close()
    # THEN each taken name was warned of once, and every turn offered the first server's tools
    warnings = [r.getMessage() for r in caplog.records if "the name is taken" in r.getMessage()]
    assert warnings == ["tool search_docs (mcp:second) left out: the name is taken",
                        "tool delete_notes (mcp:second) left out: the name is taken"]
    assert all(offered(r) == ["search_docs", "delete_notes"] for r in model_server.requests)


async def test_a_tool_name_the_model_invented_reaches_no_span_or_log_line(
        model_server: FakeModelServer, recorded: tuple[Any, Any], caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN telemetry into memory with capture off, and a model that calls a tool nobody has
    invented = "exfiltrate_secret_plans"
    model_server.then(Scripted(tool_calls=[tool_call(invented, {}, "x1")]),
                      Scripted(content="No such tool."))
    # WHEN the turn runs
    with caplog.at_level(logging.DEBUG):
        result = await ChatPrompt(model_for(model_server), functions=[add]).send("go")
    # THEN the model was told there is no such tool (by its name), and answered
    assert result.response.content == "No such tool."
    assert invented in json.loads(model_server.requests[-1]["messages"][-1]["content"])["error"]
    # AND the span, the metric and the log call it "unknown"
    spans, reader = recorded
    names = [span.name for span in spans.get_finished_spans()]
    assert "execute_tool unknown" in names
    everything = json.dumps([dict(s.attributes or {}) for s in spans.get_finished_spans()]) + \
        " ".join(names) + caplog.text + str(reader.get_metrics_data())
    assert invented not in everything
