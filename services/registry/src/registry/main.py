"""The registry: `faststream run registry.main:create_app --factory`."""

from __future__ import annotations

from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter

from contracts import messages as m
from contracts.signing import check_public_key
from registry.config import Settings
from registry.handlers import WIRING, enrol
from registry.models import TABLES
from service_kit.actors import KnownActor
from service_kit.app import ServiceApp, service_app
from service_kit.edge import Conflict
from service_kit.work import Units


def create_app(settings: Settings | None = None, spans: SpanExporter | None = None,
               metric_reader: MetricReader | None = None) -> ServiceApp:
    """`spans`, `metric_reader`: where its telemetry goes (a test's; else OTLP where `otlp_endpoint` says)."""
    settings = settings or Settings()
    if not settings.operator_public_key:
        raise ValueError("ASSAY_REGISTRY_OPERATOR_PUBLIC_KEY is not set: the registry needs the operator's public key")
    operator_key = check_public_key(settings.operator_public_key)

    async def enrol_operator(units: Units) -> None:
        """The operator is the root of trust: registered from configuration, announced like any actor."""
        try:
            async with units.transaction() as uow:
                if await uow.session.get(KnownActor, settings.operator_id) is None:
                    enrol(uow, settings.operator_id, m.Role.OPERATOR, operator_key, "Operator",
                          event_id=f"actor-registered-{settings.operator_id}")
        except Conflict:  # a replica starting at the same moment enrolled it first: the same row, the same event
            pass

    return service_app(WIRING, settings, TABLES, on_start=enrol_operator, spans=spans, metric_reader=metric_reader)
