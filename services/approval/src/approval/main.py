"""The approval service: `faststream run approval.main:create_app --factory`."""

from __future__ import annotations

from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter

from approval.config import Settings
from approval.handlers import WIRING
from approval.models import TABLES
from service_kit.app import ServiceApp, service_app


def create_app(settings: Settings | None = None, spans: SpanExporter | None = None,
               metric_reader: MetricReader | None = None) -> ServiceApp:
    """`spans`, `metric_reader`: where its telemetry goes (a test's; else OTLP where `otlp_endpoint` says)."""
    return service_app(WIRING, settings or Settings(), TABLES, spans=spans, metric_reader=metric_reader)
