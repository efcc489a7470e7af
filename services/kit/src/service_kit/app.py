"""Wires one service: its broker, database, outbox relay and router into a FastStream app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from faststream import FastStream
from faststream.nats import NatsBroker, NatsRouter
from pydantic_settings import BaseSettings

from assay_telemetry import nats_middlewares
from service_kit.actors import KnownActor
from service_kit.bus import Publisher
from service_kit.db import Database, create_tables, make_engine
from service_kit.inbox import ProcessedMessage
from service_kit.outbox import OutboxMessage, Relay

KIT_TABLES = [OutboxMessage.__table__, ProcessedMessage.__table__, KnownActor.__table__]  # type: ignore[attr-defined]


class ServiceSettings(BaseSettings):
    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str = "sqlite+aiosqlite:///assay-service.db"
    otlp_endpoint: str | None = None


@dataclass
class Service:
    name: str
    broker: NatsBroker
    db: Database
    publish: Publisher
    tables: list = field(default_factory=list)  # type: ignore[type-arg]
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @classmethod
    def create(cls, name: str, settings: ServiceSettings, tables: list, broker: NatsBroker | None = None) -> Service:  # type: ignore[type-arg]
        broker = broker or NatsBroker(settings.nats_url, middlewares=nats_middlewares(name, settings.otlp_endpoint),
                                      logger=None)
        db = Database(make_engine(settings.database_url))
        return cls(name=name, broker=broker, db=db, publish=Publisher(broker), tables=[*KIT_TABLES, *tables])

    def app(self, router: NatsRouter) -> FastStream:
        self.broker.include_router(router)
        app = FastStream(self.broker)
        relay = Relay(self.db, self.publish)
        tasks: list[asyncio.Task[None]] = []

        @app.on_startup
        async def prepare_database() -> None:
            await create_tables(self.db.engine, self.tables)

        @app.after_startup
        async def start_relay() -> None:
            for hook in self.on_start:
                await hook()
            tasks.append(asyncio.create_task(relay.run(), name=f"{self.name}-outbox-relay"))

        @app.on_shutdown
        async def stop_relay() -> None:
            relay.stop()
            for task in tasks:
                await task  # finishes the flush in progress, then returns
            with contextlib.suppress(Exception):  # the bus may be gone; rows stay for the next start
                await relay.flush()

        @app.after_shutdown
        async def close_database() -> None:
            await self.db.close()

        app.relay = relay  # type: ignore[attr-defined]
        return app
