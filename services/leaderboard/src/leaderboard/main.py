"""Wires the leaderboard; run it with `faststream run leaderboard.main:create_app --factory`."""

from __future__ import annotations

from faststream import FastStream
from faststream.nats import NatsBroker

from leaderboard.config import Settings
from leaderboard.handlers import SERVICE, build_router, delivered_subject
from leaderboard.models import TABLES
from service_kit.app import Service


def create_app(settings: Settings | None = None, broker: NatsBroker | None = None) -> FastStream:
    settings = settings or Settings()
    service = Service.create(SERVICE, settings, tables=TABLES, broker=broker)
    router = build_router(service.db, service.publish, delivered_subject(service.broker))
    return service.app(router)
