"""Telemetry for every Assay process: one TracerProvider and one MeterProvider per process, exported over OTLP when an
endpoint is set (or to what a test passes), and the NATS middleware that traces and measures every message."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

from assay_telemetry.messaging import AssayTelemetryMiddleware
from assay_telemetry.metrics import CATALOG, Kind, Meters

EXPORT_EVERY_S = 15.0  # how often metrics leave for the collector (Prometheus scrapes the collector as often)


@dataclass(frozen=True)
class OtlpTls:
    """How an exporter proves who it is to an authenticated collector endpoint (mutual TLS): the CA the collector's
    certificate is checked against, and this process's client certificate and key, which the collector checks against
    the CA that issued them (a site exporting to the centre's collector)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate (otlp_cert, otlp_key)")
        for path in (self.ca, self.cert, self.key):
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"the OTLP TLS file {path} does not exist")

    def exporter_options(self) -> dict[str, Any]:
        return {"certificate_file": str(self.ca) if self.ca else None,
                "client_certificate_file": str(self.cert) if self.cert else None,
                "client_key_file": str(self.key) if self.key else None, "session": _pinned_session()}


def _pinned_session() -> Any:
    """A requests session that keeps the CA it is given: requests lets REQUESTS_CA_BUNDLE (or CURL_CA_BUNDLE) in the
    environment replace a session's own `verify` on every request, and the collector's certificate would then be
    checked against the wrong CAs."""
    import requests

    class Pinned(requests.Session):
        def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            settings["verify"] = self.verify
            return settings

    return Pinned()


def resource(service: str) -> Resource:
    """Who is speaking: the service (Prometheus's `job` becomes `assay/<service>`) and this run of it (`instance`),
    so two replicas' counters are two series, not one that jumps."""
    return Resource.create({"service.name": service, "service.namespace": "assay",
                            "service.instance.id": uuid.uuid4().hex[:12]})


def tracer_provider(service: str, otlp_endpoint: str | None = None, exporter: SpanExporter | None = None,
                    *, named: Resource | None = None, tls: OtlpTls | None = None) -> TracerProvider:
    """A provider named after `service`; spans go to `exporter` (each as it ends: a test's), or in batches to
    OTLP/HTTP at `otlp_endpoint`, or nowhere."""
    provider = TracerProvider(resource=named or resource(service))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=otlp_endpoint.rstrip("/") + "/v1/traces", **(tls.exporter_options() if tls else {}))))
    return provider


def meter_provider(service: str, otlp_endpoint: str | None = None, reader: MetricReader | None = None, *,
                   named: Resource | None = None, every_s: float = EXPORT_EVERY_S,
                   tls: OtlpTls | None = None) -> MeterProvider:
    """A provider named after `service`; metrics are read by `reader` (a test's), or sent every `every_s` to
    OTLP/HTTP at `otlp_endpoint`, or nowhere. Each histogram has the buckets its catalogue entry gives."""
    readers: list[MetricReader] = []
    if reader is not None:
        readers.append(reader)
    elif otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/metrics",
                               **(tls.exporter_options() if tls else {})),
            export_interval_millis=every_s * 1000))
    views = [View(instrument_name=m.name, aggregation=ExplicitBucketHistogramAggregation(m.buckets))
             for m in CATALOG if m.kind is Kind.HISTOGRAM]
    return MeterProvider(metric_readers=readers, resource=named or resource(service), views=views)


@dataclass(frozen=True)
class Telemetry:
    """One process's tracing and metrics: the providers its parts use, and the instruments of the catalogue."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    meters: Meters
    measured: bool  # something reads the metrics: only then is it worth sampling the store for gauges

    def middlewares(self) -> tuple[object, ...]:
        return (AssayTelemetryMiddleware(tracer_provider=self.tracer_provider, meter_provider=self.meter_provider),)

    def shutdown(self) -> None:
        """Send what is left (the last metrics, the spans still batched) and stop: the process is ending."""
        self.meter_provider.shutdown()
        self.tracer_provider.shutdown()


def telemetry(service: str, otlp_endpoint: str | None = None, *, spans: SpanExporter | None = None,
              metric_reader: MetricReader | None = None, every_s: float = EXPORT_EVERY_S,
              tls: OtlpTls | None = None) -> Telemetry:
    """The process's telemetry: to `spans` and `metric_reader` where a test gives them, else to OTLP/HTTP at
    `otlp_endpoint` (as `tls` proves who it is, where given), else nowhere (the default: nothing leaves the process
    unless configured)."""
    named = resource(service)
    meters = meter_provider(service, otlp_endpoint, metric_reader, named=named, every_s=every_s, tls=tls)
    return Telemetry(tracer_provider(service, otlp_endpoint, spans, named=named, tls=tls), meters, Meters(meters),
                     measured=metric_reader is not None or bool(otlp_endpoint))


def nats_middlewares(service: str, otlp_endpoint: str | None = None,
                     provider: TracerProvider | None = None) -> tuple[object, ...]:
    """faststream middlewares that open a span per message and carry the trace context in NATS headers (into
    `provider`, where the process opens spans of its own too)."""
    return (AssayTelemetryMiddleware(tracer_provider=provider or tracer_provider(service, otlp_endpoint)),)
