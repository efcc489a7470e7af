"""Wires one service: its broker, database, declared subscribers and publishers, and outbox relay, into an app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from faststream import FastStream
from faststream.context import ContextRepo
from faststream.nats import NatsBroker
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter
from pydantic_settings import BaseSettings
from sqlalchemy import text

from assay_telemetry import Telemetry, telemetry
from assay_telemetry.metrics import OUTBOX_LAG
from contracts.catalog import SERVICES
from contracts.signing import KeyPair
from service_kit.actors import KnownActor, RetiredKey
from service_kit.alive import keep_alive
from service_kit.connection import connection_options, inbox_of, servers
from service_kit.db import Database, create_tables, make_engine
from service_kit.gauges import OUTBOX, Gauges, Sample
from service_kit.inbox import ProcessedMessage
from service_kit.outbox import OutboxMessage, Relay
from service_kit.replay import JetStreamMessages, Replays
from service_kit.trust import Trust
from service_kit.wiring import Wiring
from service_kit.work import Units

KIT_TABLES = [OutboxMessage.__table__, ProcessedMessage.__table__, KnownActor.__table__,  # type: ignore[attr-defined]
              RetiredKey.__table__]  # type: ignore[attr-defined]


class ServiceSettings(BaseSettings):
    nats_url: str = "nats://127.0.0.1:4222"  # tls://… for TLS
    nats_creds: Path | None = None  # its NATS credentials file (nkey or user JWT), where the URL carries none
    nats_ca: Path | None = None  # the CA bundle the server's TLS certificate is checked against (none: the system's)
    database_url: str = "sqlite+aiosqlite:///assay-service.db"
    alive_file: Path | None = None  # written every few seconds while the bus and the database answer (health check)
    otlp_endpoint: str | None = None
    key_file: Path | None = None  # the service's Ed25519 key: it signs every event it publishes
    service_keys: dict[str, str] = {}  # every service's public key, by name: who may have published each event

    def signer_and_trust(self) -> tuple[KeyPair, Trust]:
        """The service's key and the keys it checks events with; ValueError naming the setting that is missing."""
        prefix = str(self.model_config.get("env_prefix", ""))
        if self.key_file is None:
            raise ValueError(f"{prefix}KEY_FILE is not set: every service signs the events it publishes")
        if missing := sorted(set(SERVICES) - set(self.service_keys)):
            raise ValueError(f"{prefix}SERVICE_KEYS misses the public key of {missing}: a JSON object "
                             f"{{service: public key}} for each of {list(SERVICES)}")
        return KeyPair.load(self.key_file), Trust(self.service_keys)


class Deferred(Protocol):
    """Work a service owes and does a short while later, beside its relay, so that a burst is done once (the
    leaderboard's board announcements). What is owed is in its database, so nothing is lost with the process."""

    async def run(self) -> None:
        """Do what is owed as it comes, until `stop()`; never cancelled halfway."""

    def stop(self) -> None: ...

    async def settle(self) -> object:
        """Do now whatever is owed: at shutdown, before the relay's last flush, and when a test settles."""


class ServiceApp(FastStream):
    """A service's FastStream app, with the database and relay its tests and its hooks reach."""

    db: Database
    relay: Relay
    deferred: list[Deferred]
    wiring: Wiring
    units: Units
    replays: Replays  # its consumers' dead letters the operator replays, and where it reads their messages back
    telemetry: Telemetry
    gauges: Gauges


def service_app(wiring: Wiring, settings: ServiceSettings, tables: list[Any], *,
                context: Mapping[str, Any] | None = None,
                on_start: Callable[[Units], Awaitable[None]] | None = None, samples: Sequence[Sample] = (),
                spans: SpanExporter | None = None, metric_reader: MetricReader | None = None,
                deferred: Sequence[Callable[[Units], Deferred]] = ()) -> ServiceApp:
    """`context` holds what handlers ask for by name (the job terms, say); `on_start` runs once the tables exist;
    `samples` are the gauges read from its store besides its outbox's. Spans and metrics go to `spans` and
    `metric_reader` where given (a test's), else over OTLP where `otlp_endpoint` says, else nowhere. `deferred`
    makes, from its units of work, what it does a short while later beside the relay (see `Deferred`)."""
    signer, trust = settings.signer_and_trust()
    told = telemetry(wiring.owner, settings.otlp_endpoint, spans=spans, metric_reader=metric_reader)
    broker = NatsBroker(servers(settings.nats_url), middlewares=told.middlewares(),
                        logger=None, context=ContextRepo({"trust": trust, **(context or {})}),
                        **connection_options(wiring.owner, settings.nats_url, settings.nats_creds, settings.nats_ca))
    db = Database(make_engine(settings.database_url))
    units = Units(db, wiring, signer, told.meters, told.tracer_provider.get_tracer(wiring.owner))
    replays = Replays(wiring.owner, units, JetStreamMessages(broker), trust)
    broker.context.set_global("replays", replays)
    outlets = wiring.declare(broker, units, trust, inbox=inbox_of(settings.nats_url, settings.nats_creds),
                             meters=told.meters, replays=replays)

    async def set_aside(row: OutboxMessage, reason: str) -> None:
        await outlets.dead_letter(wiring.outbox_consumer, row.subject, row.message_id, 1, reason)

    relay = Relay(db, outlets.publish, set_aside=set_aside,
                  waited=lambda seconds: told.meters.record(OUTBOX_LAG, seconds))
    gauges = Gauges(db.engine, told.meters, [OUTBOX, *samples])
    app = ServiceApp(broker)
    app.db, app.relay, app.wiring, app.units, app.telemetry, app.gauges = db, relay, wiring, units, told, gauges
    app.replays = replays
    app.deferred = [make(units) for make in deferred]
    tasks: list[asyncio.Task[None]] = []

    @app.on_startup
    async def prepare_database() -> None:
        await create_tables(db.engine, [*KIT_TABLES, *tables])

    @app.after_startup
    async def start_relay() -> None:
        if on_start is not None:  # in a span of its own: what it stages is published as part of its trace
            with told.tracer_provider.get_tracer("service_kit").start_as_current_span(f"{wiring.owner} start"):
                await on_start(units)
        tasks.append(asyncio.create_task(relay.run(), name=f"{wiring.owner}-outbox-relay"))
        tasks.extend(asyncio.create_task(later.run(), name=f"{wiring.owner}-deferred") for later in app.deferred)
        if told.measured:  # nothing reads the gauges otherwise: the store is not sampled for nothing
            tasks.append(asyncio.create_task(gauges.run(), name=f"{wiring.owner}-gauges"))
        if settings.alive_file is not None:

            async def bus() -> bool:
                return await broker.ping(timeout=2.0)

            async def database() -> bool:
                async with db.engine.connect() as connection:
                    await connection.execute(text("SELECT 1"))
                return True

            well = asyncio.create_task(keep_alive(settings.alive_file, [bus, database]), name=f"{wiring.owner}-alive")
            tasks.append(well)

    @app.on_shutdown
    async def stop_relay() -> None:
        for later in app.deferred:
            later.stop()
        relay.stop()
        for task in tasks:
            if task.get_name().endswith(("-alive", "-gauges")):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # the relay finishes the flush in progress, then returns
        for later in app.deferred:
            with contextlib.suppress(Exception):  # what stays owed is done by the next start
                await later.settle()
        with contextlib.suppress(Exception):  # the bus may be gone; rows stay for the next start
            # not when it is gone already (a supervisor killed with its nats-server: SIGTERM reaches every child at
            # once): each publish would wait out its timeout, and the relay's own flush has waited one already
            if await broker.ping(timeout=1.0):
                await relay.flush()
        if told.measured:
            with contextlib.suppress(Exception):  # the gauges' last word, for the last export
                await gauges.refresh()

    @app.after_shutdown
    async def close_database() -> None:
        await db.close()
        await asyncio.to_thread(told.shutdown)  # the last metrics and spans leave (a blocking HTTP call)

    return app
