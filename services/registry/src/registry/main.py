"""The registry: `faststream run registry.main:create_app --factory`."""

from __future__ import annotations

from faststream import FastStream
from faststream.nats import NatsBroker

from contracts import messages as m
from contracts.signing import check_public_key
from registry.config import Settings
from registry.handlers import build_router, enrol
from registry.models import TABLES
from service_kit.actors import KnownActor
from service_kit.app import Service


def create_app(settings: Settings | None = None, broker: NatsBroker | None = None) -> FastStream:
    settings = settings or Settings()
    if not settings.operator_public_key:
        raise ValueError("ASSAY_REGISTRY_OPERATOR_PUBLIC_KEY is not set: the registry needs the operator's public key")
    service = Service.create("registry", settings, tables=TABLES, broker=broker)

    async def enrol_operator() -> None:
        """The operator is the root of trust: registered from configuration, announced like any actor."""
        async with service.db.transaction() as session:
            if await session.get(KnownActor, settings.operator_id) is None:
                enrol(session, settings.operator_id, m.Role.OPERATOR, check_public_key(settings.operator_public_key),
                      "Operator", event_id=f"actor-registered-{settings.operator_id}")

    service.on_start.append(enrol_operator)
    return service.app(build_router(service))
