"""Tracing for every Assay process: one TracerProvider per process, exported over OTLP when an endpoint is set."""

from __future__ import annotations

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter


def tracer_provider(service: str, otlp_endpoint: str | None = None, exporter: SpanExporter | None = None) -> TracerProvider:
    """A provider named after `service`; spans go to `exporter` (each as it ends: a test's), or in batches to
    OTLP/HTTP at `otlp_endpoint`, or nowhere."""
    provider = TracerProvider(resource=Resource.create({"service.name": service, "service.namespace": "assay"}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=otlp_endpoint.rstrip("/") + "/v1/traces")))
    return provider


def nats_middlewares(service: str, otlp_endpoint: str | None = None,
                     provider: TracerProvider | None = None) -> tuple[object, ...]:
    """faststream middlewares that open a span per message and carry the trace context in NATS headers (into
    `provider`, where the process opens spans of its own too)."""
    from faststream.nats.opentelemetry import NatsTelemetryMiddleware

    return (NatsTelemetryMiddleware(tracer_provider=provider or tracer_provider(service, otlp_endpoint)),)
