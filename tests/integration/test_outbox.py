"""The outbox on a real nats-server and real databases: no event lost or doubled across a crash."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest
from faststream.nats import NatsBroker
from sqlmodel import select

from contracts import messages as m
from contracts.signing import KeyPair
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
        Transaction(session, WIRING, KeyPair.generate()).emit(EVENT)
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
        Transaction(session, WIRING, KeyPair.generate()).emit(EVENT)
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
            Transaction(session, WIRING, KeyPair.generate()).emit(EVENT)
            raise RuntimeError("the state change failed")
    async with db.transaction() as session:
        assert (await session.exec(select(OutboxMessage))).all() == []


async def test_a_message_the_server_can_never_take_is_set_aside_and_the_rest_still_leave(
        db: Database, nats_url: str) -> None:
    async with db.transaction() as session:
        session.add(OutboxMessage(message_id="too-big", subject="assay.v1.evt.benchmark.approved",
                                  body=b'{"x": "' + b"a" * (2 << 20) + b'"}'))  # 2 MiB: the server takes 1 MiB
        Transaction(session, WIRING, KeyPair.generate()).emit(EVENT)
    put_aside: list[tuple[str, str]] = []

    async def note(row: OutboxMessage, reason: str) -> None:
        put_aside.append((row.message_id, reason))

    broker = NatsBroker(nats_url, logger=None)
    outbox = Relay(db, WIRING.declare(broker, units=None).publish, set_aside=note)
    await broker.start()
    assert await outbox.flush() == 1
    assert await outbox.flush() == 0  # set aside for good: not tried again
    await broker.stop()
    assert await stored_events(nats_url) == 1
    [(message_id, reason)] = put_aside
    assert message_id == "too-big" and reason.startswith("the server refused it for good (MaxPayloadError")
    async with db.transaction() as session:
        row = (await session.exec(select(OutboxMessage).where(OutboxMessage.message_id == "too-big"))).one()
    assert row.published_at is None and row.set_aside == reason


async def test_what_was_published_a_week_ago_and_ids_processed_a_month_ago_are_forgotten(db: Database) -> None:
    from datetime import timedelta

    from contracts.envelope import utcnow
    from service_kit.inbox import ProcessedMessage, first_time

    now = utcnow()
    async with db.transaction() as session:
        Transaction(session, WIRING, KeyPair.generate()).emit(EVENT)  # still pending: kept however old
        session.add(OutboxMessage(message_id="old", subject="s", body=b"{}", published_at=now - timedelta(days=8)))
        session.add(OutboxMessage(message_id="recent", subject="s", body=b"{}", published_at=now - timedelta(days=1)))
        session.add(ProcessedMessage(consumer="c", message_id="old", processed_at=now - timedelta(days=31)))
        assert await first_time(session, "c", b"a message seen today")

    await Relay(db, WIRING.declare(NatsBroker("nats://127.0.0.1:1", logger=None), units=None).publish).prune(now)

    async with db.transaction() as session:
        kept = sorted(row.message_id for row in (await session.exec(select(OutboxMessage))).all())
        processed = [row.message_id for row in (await session.exec(select(ProcessedMessage))).all()]
    assert len(kept) == 2 and "old" not in kept and "recent" in kept
    assert processed and "old" not in processed


async def test_the_longest_valid_envelope_id_fits_the_outbox_and_the_inbox(db: Database) -> None:
    """varchar(128) on PostgreSQL refuses what is longer: the longest id an envelope may carry must fit both tables,
    as must the longest consumer name (`<consumer>-refused`, for the commands a consumer refused)."""
    from contracts.envelope import Envelope
    from contracts.subjects import durable, jobs
    from service_kit.inbox import ProcessedMessage, first_time

    longest = "i" * next(rule.max_length for rule in Envelope.model_fields["id"].metadata if hasattr(rule, "max_length"))
    envelope = Envelope.wrap(EVENT, source="service:approval", id=longest)
    site = "s" * 63  # the longest id the contracts allow
    consumer = durable(f"site-{site}", jobs(site)) + "-refused"
    async with db.transaction() as session:
        session.add(OutboxMessage(message_id=envelope.id, subject="assay.v1.evt.benchmark.approved",
                                  body=envelope.model_dump_json().encode()))
        assert await first_time(session, consumer, envelope.model_dump_json().encode())
    async with db.transaction() as session:
        assert (await session.exec(select(OutboxMessage.message_id))).one() == longest
        assert (await session.exec(select(ProcessedMessage.consumer))).one() == consumer
