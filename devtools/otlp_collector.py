"""An OTLP collector stand-in: takes OTLP/HTTP protobuf exports and keeps the spans it was sent.

    python -m devtools.otlp_collector [--port 4318]     (then OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318)

It answers `POST /v1/traces` and `POST /v1/metrics` as a collector does (200, an empty
protobuf response), decodes the traces with `opentelemetry-proto` and, run alone, prints one line
per span. Tests read `spans` and `metric_names`.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from devtools.local_server import LocalServer


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    duration_ms: float


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class OtlpCollector(LocalServer):
    def __init__(self, *, echo: bool = False) -> None:
        super().__init__()
        self.spans: list[ReceivedSpan] = []
        self.metric_names: set[str] = set()
        self._echo = echo

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)

    async def _traces(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415, text="OTLP/HTTP protobuf only")
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received = ReceivedSpan(
                        name=span.name, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes=_attributes(span.attributes), resource=resource,
                        duration_ms=(span.end_time_unix_nano - span.start_time_unix_nano) / 1e6)
                    self.spans.append(received)
                    if self._echo:
                        print(f"{received.trace_id[:8]} {received.name:<32} "
                              f"{received.duration_ms:8.2f} ms  {received.attributes}", flush=True)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def _metrics(self, request: web.Request) -> web.Response:
        export = ExportMetricsServiceRequest.FromString(await request.read())
        for resource_metrics in export.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                self.metric_names.update(metric.name for metric in scope_metrics.metrics)
        return web.Response(body=ExportMetricsServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")


async def _serve(port: int) -> None:
    collector = await OtlpCollector(echo=True).start(port)
    print(f"OTLP collector stand-in on {collector.url} (OTEL_EXPORTER_OTLP_ENDPOINT={collector.url}); "
          "Ctrl-C stops it", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
