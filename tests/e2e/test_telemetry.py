"""Telemetry end to end: the dev host (as `make run` serves the app) exports a turn's spans and the
metrics to an OTLP collector stand-in when OTEL_EXPORTER_OTLP_ENDPOINT is set."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from devtools.otlp_collector import OtlpCollector, ReceivedSpan
from tests.e2e.channel import Bench, bench, otlp_collector


@pytest.fixture(scope="module")
def collector() -> Iterator[OtlpCollector]:
    with otlp_collector() as running:
        yield running


@pytest.fixture(scope="module")
def channel(azurite_connection_string: str, collector: OtlpCollector) -> Iterator[Bench]:
    # The SDK's own knobs: export every 200 ms rather than every 5 s (spans) and 60 s (metrics).
    with bench(azurite_connection_string, extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_METRIC_EXPORT_INTERVAL": "500", "CHAT_STREAMING": "off"}) as running:
        yield running


def wait_for(collector: OtlpCollector, conversation: str, *, names: set[str],
             seconds: float = 20) -> list[ReceivedSpan]:
    deadline = time.monotonic() + seconds
    while True:
        roots = [s for s in collector.spans if s.name == "chatstate.turn"
                 and s.attributes.get("gen_ai.conversation.id") == conversation]
        trace = [s for s in collector.spans if roots and s.trace_id == roots[0].trace_id]
        if names <= {s.name for s in trace} or time.monotonic() > deadline:
            return trace
        time.sleep(0.1)


def test_a_turn_s_spans_reach_the_otlp_collector(channel: Bench, collector: OtlpCollector) -> None:
    # GIVEN the dev host with OTEL_EXPORTER_OTLP_ENDPOINT pointing at the collector stand-in
    conversation = f"a:{uuid.uuid4().hex}"
    secret = f"my secret words {uuid.uuid4().hex}"
    # WHEN one message is answered
    response = channel.post(channel.message(secret, conversation_id=conversation))
    assert response.status_code == 200
    # THEN the turn's spans arrive as one trace: the turn, and a child for each stage
    stages = {"chatstate.auth", "chatstate.window.load", "chat bench-model", "chatstate.commit",
              "chatstate.reply", "chatstate.delivered"}
    trace = wait_for(collector, conversation, names=stages | {"chatstate.turn"})
    (root,) = [s for s in trace if s.name == "chatstate.turn"]
    children = {s.name for s in trace if s.parent_span_id == root.span_id}
    assert stages <= children, f"missing: {stages - children}"
    assert root.resource["service.name"] == "chatstate"
    assert root.attributes["http.response.status_code"] == 200
    (call,) = [s for s in trace if s.name == "chat bench-model"]
    assert call.attributes["gen_ai.operation.name"] == "chat"
    assert call.attributes["gen_ai.usage.input_tokens"] > 0
    # AND no message text was exported
    assert all(secret not in str(s.attributes) for s in trace)
    # AND the metrics arrive too
    deadline = time.monotonic() + 10
    while "chatstate.turns" not in collector.metric_names and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {"chatstate.turns", "chatstate.turn.duration", "chatstate.model.tokens",
            "chatstate.storage.duration"} <= collector.metric_names
