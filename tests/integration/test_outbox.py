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



async def stream_in_order(nats_url: str) -> list[tuple[str, str, str]]:
    """(subject, envelope id, Nats-Msg-Id) of every message in EVENTS, in the order the stream keeps them."""
    import json

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    last = (await js.stream_info("EVENTS")).state.last_seq
    kept = []
    for seq in range(1, last + 1):
        msg = await js.get_msg("EVENTS", seq)
        kept.append((msg.subject, json.loads(msg.data)["id"], (msg.headers or {}).get("Nats-Msg-Id", "")))
    await nc.close()
    return kept


def two_subjects() -> Wiring:
    return Wiring(owner="approval", source="service:approval",
                  publishes=(Outlet.event(m.BenchmarkApproved), Outlet.event(m.EntityArchived)))


def archived(n: int) -> m.EntityArchived:
    return m.EntityArchived(kind=m.EntityType.MODEL, entity_id=f"model-{n}", archived_by="owner", reason="old")


async def test_a_flush_has_its_whole_batch_in_flight_and_each_subject_keeps_the_outbox_order(
        db: Database, nats_url: str) -> None:
    wiring, key = two_subjects(), KeyPair.generate()
    staged = []
    async with db.transaction() as session:
        uow = Transaction(session, wiring, key)
        for n in range(300):  # two batches of the relay's 256, the subjects interleaved
            event = m.BenchmarkApproved(benchmark_id=f"b{n}", approved_by="operator") if n % 3 else archived(n)
            staged.append(uow.emit(event, id=f"event-{n:03d}").id)
    broker = NatsBroker(nats_url, logger=None)
    publish = wiring.declare(broker, units=None).publish
    in_flight, most = 0, 0

    async def counting(subject: str, body: bytes, message_id: str) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await publish(subject, body, message_id)
        finally:
            in_flight -= 1

    await broker.start()
    try:
        assert await Relay(db, counting).flush() == 300
    finally:
        await broker.stop()

    assert most == 256  # a batch's acks are awaited together, not one publish after another
    kept = await stream_in_order(nats_url)
    assert [envelope_id for _, envelope_id, _ in kept] == staged  # the stream has the outbox's order
    assert all(msg_id == envelope_id for _, envelope_id, msg_id in kept)  # each with its Nats-Msg-Id
    async with db.transaction() as session:
        assert all(row.published_at is not None for row in (await session.exec(select(OutboxMessage))).all())


async def test_a_row_whose_publish_the_server_refused_stays_pending_and_leaves_in_its_turn_later(
        db: Database, nats_url: str) -> None:
    """The server takes one message per subject here, so the second approval is refused (for now: not for good);
    the rows around it that the server acknowledged are marked, it alone stays, and it leaves once the server takes
    it, still after the first approval."""
    import dataclasses

    from contracts.streams import STREAMS

    [events] = [c for c in STREAMS if c.name == "EVENTS"]
    nc = await nats.connect(nats_url)
    await nc.jetstream().update_stream(config=dataclasses.replace(events, max_msgs_per_subject=1,
                                                                  discard_new_per_subject=True))
    wiring, key = two_subjects(), KeyPair.generate()
    async with db.transaction() as session:
        uow = Transaction(session, wiring, key)
        first = uow.emit(m.BenchmarkApproved(benchmark_id="b1", approved_by="operator")).id
        other = uow.emit(archived(1)).id
        second = uow.emit(m.BenchmarkApproved(benchmark_id="b2", approved_by="operator")).id
    broker = NatsBroker(nats_url, logger=None)
    outbox = Relay(db, wiring.declare(broker, units=None).publish)
    await broker.start()
    try:
        with pytest.raises(Exception, match="maximum messages per subject"):
            await outbox.flush()
        async with db.transaction() as session:
            pending = {row.message_id: row.published_at for row in (await session.exec(select(OutboxMessage))).all()}
        assert pending[first] is not None and pending[other] is not None and pending[second] is None

        await nc.jetstream().update_stream(config=events)  # the server takes it now
        assert await outbox.flush() == 1
    finally:
        await broker.stop()
        await nc.close()
    assert [(subject, envelope_id) for subject, envelope_id, _ in await stream_in_order(nats_url)] == [
        ("assay.v1.evt.benchmark.approved", first), ("assay.v1.evt.entity.archived", other),
        ("assay.v1.evt.benchmark.approved", second)]


async def test_a_relay_that_cannot_publish_says_so_once_with_its_traceback_not_at_every_commit(
        db: Database, nats_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A server refusing for a while (as a cluster electing a stream's leader does): the commits that keep waking the
    relay meanwhile add no traceback; it says once that it failed and once that it publishes again."""
    import asyncio
    import dataclasses
    import logging

    from contracts.streams import STREAMS

    [events] = [c for c in STREAMS if c.name == "EVENTS"]
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.update_stream(config=dataclasses.replace(events, max_msgs_per_subject=1, discard_new_per_subject=True))
    wiring, key = two_subjects(), KeyPair.generate()
    async with db.transaction() as session:
        uow = Transaction(session, wiring, key)
        uow.emit(m.BenchmarkApproved(benchmark_id="b1", approved_by="operator"))
        uow.emit(m.BenchmarkApproved(benchmark_id="b2", approved_by="operator"))  # refused while the limit holds
    broker = NatsBroker(nats_url, logger=None)
    outbox = Relay(db, wiring.declare(broker, units=None).publish, poll_s=0.05)
    await broker.start()
    caplog.set_level(logging.WARNING, logger="service_kit.outbox")
    running = asyncio.create_task(outbox.run())
    try:
        for n in range(20):  # each commit wakes the relay, which tries the refused row again
            async with db.transaction() as session:
                Transaction(session, wiring, key).emit(archived(n))
            await asyncio.sleep(0.02)
        await js.update_stream(config=events)  # the server takes it now
        for _ in range(100):
            if (await js.stream_info("EVENTS")).state.messages == 22:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the flush after the one that succeeded
    finally:
        outbox.stop()
        await running
        await broker.stop()
        await nc.close()
    said = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records]
    failed = [s for s in said if s[1].startswith("outbox relay could not publish")]
    assert len(failed) == 1 and failed[0][2], said  # once, with its traceback
    assert not [s for s in said if s[1].startswith("outbox relay still cannot publish")], said  # within 10 s
    [(level, again, _)] = [s for s in said if s[1].startswith("outbox relay publishing again")]
    assert level == "WARNING" and "failed attempts" in again
    assert [s for s in said if s[2]] == failed  # no other traceback
