"""The registry: `faststream run registry.main:create_app --factory`."""

from __future__ import annotations

from faststream import FastStream
from faststream.nats import NatsBroker

from contracts import messages as m
from contracts.signing import key_id_of
from registry.config import Settings
from registry.handlers import SOURCE, build_router
from registry.models import TABLES
from service_kit.actors import KnownActor
from service_kit.app import Service
from service_kit.outbox import stage_event


def create_app(settings: Settings | None = None, broker: NatsBroker | None = None) -> FastStream:
    settings = settings or Settings()
    if not settings.operator_public_key:
        raise ValueError("ASSAY_REGISTRY_OPERATOR_PUBLIC_KEY is not set: the registry needs the operator's public key")
    service = Service.create("registry", settings, tables=TABLES, broker=broker)

    async def enrol_operator() -> None:
        """The operator is the root of trust: registered from configuration, announced like any actor."""
        async with service.db.transaction() as session:
            if await session.get(KnownActor, settings.operator_id) is None:
                event = m.ActorRegistered(actor_id=settings.operator_id, role=m.Role.OPERATOR,
                                          public_key=settings.operator_public_key,
                                          key_id=key_id_of(settings.operator_public_key), display_name="Operator")
                session.add(KnownActor(**event.model_dump(mode="json")))
                stage_event(session, SOURCE, event, id=f"actor-registered-{settings.operator_id}")

    service.on_start.append(enrol_operator)
    return service.app(build_router(service))
