"""A small OTLP/HTTP receiver for tests, standing in for the collector (none can be installed here): it takes what
OTLP exporters send to `<url>/v1/traces` and `<url>/v1/metrics` as protobuf (opentelemetry-proto, as the collector
parses it) and keeps every span and metric point, with the service that sent it."""

from __future__ import annotations

import gzip
import ssl
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: str              # SERVER, CONSUMER, PRODUCER, INTERNAL, ...
    trace_id: str
    span_id: str
    parent_id: str         # "" for a trace's root
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: str            # UNSET, OK, ERROR
    status_message: str


@dataclass(frozen=True)
class Point:
    service: str
    metric: str
    kind: str              # gauge, sum, histogram
    unit: str
    monotonic: bool        # a sum that only goes up: a counter
    attributes: dict[str, Any]
    value: float           # a gauge's or a sum's value; a histogram's count
    sum: float = 0.0       # a histogram's sum


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def attributes_of(pairs: Any) -> dict[str, Any]:
    return {pair.key: value_of(pair.value) for pair in pairs}


def service_of(resource: Any) -> str:
    return str(attributes_of(resource.attributes).get("service.name", ""))


def spans_in(request: ExportTraceServiceRequest) -> list[ReceivedSpan]:
    return [ReceivedSpan(service_of(group.resource), span.name,
                         Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                         span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                         span.start_time_unix_nano, span.end_time_unix_nano, attributes_of(span.attributes),
                         Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"), span.status.message)
            for group in request.resource_spans for scope in group.scope_spans for span in scope.spans]


def points_in(request: ExportMetricsServiceRequest) -> list[Point]:
    points: list[Point] = []
    for group in request.resource_metrics:
        service = service_of(group.resource)
        for scope in group.scope_metrics:
            for metric in scope.metrics:
                kind = metric.WhichOneof("data")
                data = getattr(metric, kind)
                for point in data.data_points:
                    found = attributes_of(point.attributes)
                    if kind == "histogram":
                        points.append(Point(service, metric.name, kind, metric.unit, False, found, float(point.count),
                                            point.sum))
                    else:
                        number = point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
                        points.append(Point(service, metric.name, kind, metric.unit,
                                            kind == "sum" and data.is_monotonic, found, float(number)))
    return points


class Receiver:
    """What was received, in order; `url` is the endpoint to configure (`…_OTLP_ENDPOINT`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.spans: list[ReceivedSpan] = []
        self.points: list[Point] = []
        self.refused: list[str] = []  # requests it could not read, and why
        self._lock = threading.Lock()

    def take(self, path: str, body: bytes) -> bytes:
        if path == "/v1/traces":
            spans = spans_in(ExportTraceServiceRequest.FromString(body))
            with self._lock:
                self.spans += spans
            return ExportTraceServiceResponse().SerializeToString()
        if path == "/v1/metrics":
            points = points_in(ExportMetricsServiceRequest.FromString(body))
            with self._lock:
                self.points += points
            return ExportMetricsServiceResponse().SerializeToString()
        raise LookupError(f"no OTLP signal at {path}")

    def latest(self, metric: str) -> dict[tuple[str, tuple[tuple[str, Any], ...]], Point]:
        """Each series' last point (service, sorted attributes): exports are cumulative, the last one says it all."""
        with self._lock:
            return {(p.service, tuple(sorted(p.attributes.items()))): p for p in self.points if p.metric == metric}


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            encoding = self.headers.get("Content-Encoding", "")
            try:
                if self.headers.get_content_type() != "application/x-protobuf":
                    raise ValueError(f"content type {self.headers.get_content_type()}: only protobuf is read here")
                body = gzip.decompress(body) if encoding == "gzip" else zlib.decompress(body) if encoding == "deflate" \
                    else body
                answer = receiver.take(self.path, body)
            except Exception as exc:  # said back to the exporter, and kept for the test to see
                receiver.refused.append(f"{self.path}: {exc}")
                self.send_response(400)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the test reads what was received
            pass

    return Handler


@contextmanager
def receiving(tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    """A receiver on a random loopback port, serving in a thread until the block ends; with `tls`, over HTTPS (the
    context says whether a client certificate is required, as a collector's authenticated endpoint does)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(receiver := Receiver("")))
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    receiver.url = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)

