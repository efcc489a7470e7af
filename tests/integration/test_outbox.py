"""The outbox on a real nats-server and real databases: no event lost or doubled across a crash."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest
from faststream.nats import NatsBroker
from sqlmodel import select

from contracts import messages as m
from service_kit.app import KIT_TABLES
from service_kit.db import Database, create_tables, make_engine
from service_kit.outbox import OutboxMessage, Relay
from service_kit.wiring import Outlet, Wiring
from service_kit.work import Transaction
from tests.conftest import new_database

EVENT = m.BenchmarkApproved(benchmark_id="b1", approved_by="operator")
WIRING = Wiring(owner="approval", source="service:approval", publishes=(Outlet.event(m.BenchmarkApproved),))


def relay(db: Database, broker: NatsBroker) -> Relay:
    return Relay(db, WIRING.declare(broker, units=None).publish)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    url = (await new_database(request.getfixturevalue("postgres_server")) if request.param == "postgres"
           else f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}")
    database = Database(make_engine(url))
    await create_tables(database.engine, KIT_TABLES)
    yield database
    await database.close()


async def stored_events(nats_url: str) -> int:
    nc = await nats.connect(nats_url)
    info = await nc.jetstream().stream_info("EVENTS")
    await nc.close()
    return info.state.messages


async def test_an_event_committed_before_a_crash_is_published_by_the_next_relay(db: Database, nats_url: str) -> None:
    async with db.transaction() as session:
        Transaction(session, WIRING).emit(EVENT)
    # the process died here: committed, never published
    assert await stored_events(nats_url) == 0
    broker = NatsBroker(nats_url, logger=None)
    outbox = relay(db, broker)
    await broker.start()
    assert await outbox.flush() == 1
    await broker.stop()
    assert await stored_events(nats_url) == 1


async def test_a_publish_repeated_after_a_crash_is_stored_once(db: Database, nats_url: str) -> None:
    async with db.transaction() as session:
        Transaction(session, WIRING).emit(EVENT)
    broker = NatsBroker(nats_url, logger=None)
    outbox = relay(db, broker)
    await broker.start()
    await outbox.flush()
    async with db.transaction() as session:  # the process died after publishing, before marking the row
        row = (await session.exec(select(OutboxMessage))).one()
        row.published_at = None
        session.add(row)
    assert await outbox.flush() == 1
    await broker.stop()
    assert await stored_events(nats_url) == 1


async def test_a_rolled_back_change_stages_no_event(db: Database) -> None:
    with pytest.raises(RuntimeError):
        async with db.transaction() as session:
            Transaction(session, WIRING).emit(EVENT)
            raise RuntimeError("the state change failed")
    async with db.transaction() as session:
        assert (await session.exec(select(OutboxMessage))).all() == []
