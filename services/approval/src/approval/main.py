"""The approval service: `faststream run approval.main:create_app --factory`."""

from __future__ import annotations

from faststream import FastStream
from faststream.nats import NatsBroker

from approval.config import Settings
from approval.handlers import build_router
from approval.models import TABLES
from service_kit.app import Service


def create_app(settings: Settings | None = None, broker: NatsBroker | None = None) -> FastStream:
    service = Service.create("approval", settings or Settings(), tables=TABLES, broker=broker)
    return service.app(build_router(service))
