"""The scheduling service: `faststream run scheduling.main:create_app --factory`."""

from __future__ import annotations

from datetime import timedelta

from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter

from contracts.signing import KeyPair
from scheduling.config import Settings
from scheduling.gauges import JOBS_BY_STATE
from scheduling.handlers import WIRING, Dispatch
from scheduling.models import TABLES
from service_kit.app import ServiceApp, service_app


def create_app(settings: Settings | None = None, spans: SpanExporter | None = None,
               metric_reader: MetricReader | None = None) -> ServiceApp:
    """`spans`, `metric_reader`: where its telemetry goes (a test's; else OTLP where `otlp_endpoint` says)."""
    settings = settings or Settings()
    dispatch = Dispatch(KeyPair.load(settings.key_file), timedelta(days=settings.job_ttl_days))
    return service_app(WIRING, settings, TABLES, context={"dispatch": dispatch}, samples=[JOBS_BY_STATE], spans=spans,
                       metric_reader=metric_reader)
