"""Tracing: the trace context rides in NATS headers, so a publisher's and its consumers' spans form one trace."""

from __future__ import annotations

import asyncio

from faststream.nats import NatsBroker, TestNatsBroker
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from assay_telemetry import nats_middlewares, tracer_provider


def traced_broker(service: str, spans: InMemorySpanExporter,
                  url: str = "nats://127.0.0.1:4222") -> tuple[NatsBroker, TracerProvider]:
    provider = tracer_provider(service, exporter=spans)
    return NatsBroker(url, middlewares=(NatsTelemetryMiddleware(tracer_provider=provider),), logger=None), provider


def finished(spans: InMemorySpanExporter, *providers: TracerProvider) -> list[ReadableSpan]:
    for provider in providers:
        provider.force_flush()  # spans leave in batches
    return list(spans.get_finished_spans())


def test_a_provider_names_its_process_in_the_assay_namespace() -> None:
    resource = tracer_provider("scheduling").resource.attributes
    assert (resource["service.name"], resource["service.namespace"]) == ("scheduling", "assay")


def test_the_middlewares_every_process_uses_trace_nats_messages() -> None:
    [middleware] = nats_middlewares("registry")
    assert isinstance(middleware, NatsTelemetryMiddleware)


async def test_a_published_message_and_its_handling_share_one_trace() -> None:
    spans = InMemorySpanExporter()
    broker, provider = traced_broker("registry", spans)
    handled = asyncio.get_running_loop().create_future()

    @broker.subscriber("assay.v1.evt.model.registered")
    async def learn(body: str) -> None:
        handled.set_result(body)

    async with TestNatsBroker(broker) as test_broker:
        await test_broker.publish("model-1", "assay.v1.evt.model.registered")
    assert handled.result() == "model-1"

    recorded = finished(spans, provider)
    [created] = [s for s in recorded if s.kind is SpanKind.PRODUCER and s.name.endswith(" create")]
    [consumed] = [s for s in recorded if s.kind is SpanKind.CONSUMER]
    assert {s.context.trace_id for s in recorded} == {created.context.trace_id}
    assert consumed.parent is not None and consumed.parent.span_id == created.context.span_id
    assert consumed.attributes["messaging.destination_publish.name"] == "assay.v1.evt.model.registered"
