"""The scheduling service: `faststream run scheduling.main:create_app --factory`."""

from __future__ import annotations

from faststream import FastStream
from faststream.nats import NatsBroker

from contracts.signing import KeyPair
from scheduling.config import Settings
from scheduling.handlers import build_router
from scheduling.models import TABLES
from service_kit.app import Service


def create_app(settings: Settings | None = None, broker: NatsBroker | None = None) -> FastStream:
    settings = settings or Settings()
    signer = KeyPair.load(settings.key_file)
    service = Service.create("scheduling", settings, tables=TABLES, broker=broker)
    return service.app(build_router(service, signer))
