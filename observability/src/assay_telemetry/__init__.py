"""Tracing for every Assay process: one TracerProvider per process, exported over OTLP when an endpoint is set."""

from __future__ import annotations

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter


def tracer_provider(service: str, otlp_endpoint: str | None = None, exporter: SpanExporter | None = None) -> TracerProvider:
    """A provider named after `service`; spans go to `exporter`, or to OTLP/HTTP at `otlp_endpoint`, or nowhere."""
    provider = TracerProvider(resource=Resource.create({"service.name": service, "service.namespace": "assay"}))
    if exporter is None and otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/traces")
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def nats_middlewares(service: str, otlp_endpoint: str | None = None) -> tuple[object, ...]:
    """faststream middlewares that open a span per message and carry the trace context in NATS headers."""
    from faststream.nats.opentelemetry import NatsTelemetryMiddleware

    return (NatsTelemetryMiddleware(tracer_provider=tracer_provider(service, otlp_endpoint)),)
