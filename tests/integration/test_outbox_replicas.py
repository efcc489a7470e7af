"""Two replicas of a service on one PostgreSQL database: their outbox relays publish each staged message once, in the
outbox's order, and neither waits for good on one that is stuck; the replicas can make their tables together."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from sqlmodel import select

from contracts import messages as m
from contracts.signing import KeyPair
from service_kit import outbox
from service_kit.app import KIT_TABLES
from service_kit.db import Database, create_tables, make_engine
from service_kit.outbox import OutboxMessage, Relay
from service_kit.wiring import Outlet, Wiring
from service_kit.work import Transaction
from tests.conftest import new_database

pytestmark = pytest.mark.postgres

WIRING = Wiring(owner="approval", source="service:approval", publishes=(Outlet.event(m.BenchmarkApproved),))
STAGED = 40
ACK_S = 0.2  # a slow server's acknowledgement: a relay that read the rows meanwhile would send them again


class Bus:
    """What the relays sent, in the order the server would have received it; each publish's ack takes a moment, as
    a round trip to a server does, so that the two relays' flushes would overlap. A relay whose server went away
    ("stuck") sends nothing and hears nothing back."""

    def __init__(self) -> None:
        self.published: list[str] = []
        self.stuck = asyncio.Event()  # a stuck relay has begun its flush

    def publisher(self, name: str):  # type: ignore[no-untyped-def]
        async def publish(subject: str, body: bytes, message_id: str) -> None:
            if name == "stuck":
                self.stuck.set()
                await asyncio.sleep(3600)
            self.published.append(message_id)
            await asyncio.sleep(ACK_S)
        return publish


async def replicas(postgres_server: str) -> tuple[Database, Database]:
    """Two processes' view of one database: an engine (a connection pool) each."""
    url = await new_database(postgres_server)
    one, two = Database(make_engine(url)), Database(make_engine(url))
    await create_tables(one.engine, KIT_TABLES)
    return one, two


async def stage(db: Database, count: int) -> list[str]:
    async with db.transaction() as session:
        unit = Transaction(session, WIRING, KeyPair.generate())
        ids = [unit.emit(m.BenchmarkApproved(benchmark_id=f"b{i}", approved_by="operator")).id for i in range(count)]
    return ids


async def test_two_relays_on_one_database_publish_each_message_once_in_the_outbox_order(
        postgres_server: str) -> None:
    one, two = await replicas(postgres_server)
    try:
        staged = await stage(one, STAGED)
        bus = Bus()
        first, second = Relay(one, bus.publisher("one")), Relay(two, bus.publisher("two"))
        counts = await asyncio.gather(first.flush(), second.flush(), first.flush(), second.flush())
        assert bus.published == staged, "each once, in order: one relay flushed at a time"
        assert sum(counts) == STAGED
        async with two.transaction() as session:
            rows = (await session.exec(select(OutboxMessage))).all()
        assert all(row.published_at is not None for row in rows)
    finally:
        await one.close()
        await two.close()


async def test_a_relay_does_not_wait_for_good_on_a_replica_stuck_in_its_flush(
        postgres_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox, "ALONE_WAIT_S", 0.3)
    one, two = await replicas(postgres_server)
    try:
        staged = await stage(one, 5)
        bus = Bus()
        stuck = asyncio.create_task(Relay(one, bus.publisher("stuck")).flush())
        await bus.stuck.wait()  # it holds the lock, and hangs on its publishes
        assert await asyncio.wait_for(Relay(two, bus.publisher("two")).flush(), 10) == 5
        assert bus.published == staged, "the other replica published them all, in order"
        stuck.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stuck
    finally:
        await one.close()
        await two.close()


async def test_replicas_that_start_together_make_their_tables_once(postgres_server: str) -> None:
    url = await new_database(postgres_server)
    engines = [make_engine(url) for _ in range(3)]
    try:
        await asyncio.gather(*(create_tables(engine, KIT_TABLES) for engine in engines))
        async with Database(engines[0]).transaction() as session:
            assert (await session.exec(select(OutboxMessage))).all() == []
    finally:
        for engine in engines:
            await engine.dispose()


async def test_two_leaderboard_replicas_announce_each_owed_board_once_and_at_most_once_a_window(
        postgres_server: str) -> None:
    """The announcers of two leaderboard replicas on one database: a board owed is announced by one of them; one owed
    again just after is left owed (a crash keeps it) until its own window has closed, whichever replica looks."""
    from contracts.messages import BenchmarkSpec, ImageRef, MetricSpec
    from leaderboard.announce import Announcer
    from leaderboard.current import Boards
    from leaderboard.handlers import WIRING as LEADERBOARD
    from leaderboard.models import TABLES, BoardDue, KnownBenchmark
    from leaderboard.store import Store
    from service_kit.work import Units

    url = await new_database(postgres_server)
    one, two = Database(make_engine(url)), Database(make_engine(url))
    await create_tables(one.engine, [*KIT_TABLES, *TABLES])
    image = ImageRef(digest="sha256:" + "1" * 64, name="img")
    spec = BenchmarkSpec(benchmark_id="bm", name="Benchmark", preparator=image, reference_model=image,
                         evaluator=image, metrics=(MetricSpec(name="auc"),), primary_metric="auc")
    first, second = (Announcer(Units(db, LEADERBOARD, KeyPair.generate()), Boards(), window_s=3600)
                     for db in (one, two))

    async def owe(db: Database, model_id: str) -> None:  # as an accepted result does, under the benchmark's row
        async with db.transaction() as session:
            await Store(session).benchmark("bm", lock=True)
            await Store(session).owe_board("bm", model_id)

    async def owed() -> list[str]:
        async with one.transaction() as session:
            return list((await session.exec(select(BoardDue.benchmark_id))).all())

    try:
        async with one.transaction() as session:
            session.add(KnownBenchmark(benchmark_id="bm", owner_id="owner", spec=spec.model_dump(mode="json")))
        await owe(one, "model-1")
        await asyncio.gather(first.settle(), second.settle())  # both replicas look at once: one announces it
        assert first.recomputed + second.recomputed == 1 and await owed() == []

        await owe(two, "model-2")  # owed again, within the window of the announcement just made
        for announcer in (first, second):  # as each replica's loop looks: it waits for that window to close
            await announcer.settle(owed_for_s=3600)
        assert first.recomputed + second.recomputed == 1 and await owed() == ["bm"]
        await second.settle(owed_for_s=0)  # that window has closed: announced, once
        await first.settle(owed_for_s=0)
        assert first.recomputed + second.recomputed == 2 and await owed() == []
    finally:
        await one.close()
        await two.close()
