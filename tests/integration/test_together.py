"""A pulled batch in one unit of work (`service_kit.together`), on a real nats-server: what one fetch brings is handled
by the handler's batch form in one transaction; a batch that fails leaves nothing and each of its messages is handled
alone, once; a message processed before is not handled again, in a batch or alone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import nats
from faststream import Context, TestApp
from sqlmodel import Field, SQLModel, select

from contracts import messages as m
from contracts.catalog import EVENT_SUBJECTS
from contracts.envelope import Envelope
from service_kit.app import ServiceApp, ServiceSettings, service_app
from service_kit.together import Arrival
from service_kit.wiring import Consumer, Outlet, Wiring
from service_kit.work import Transaction, UnitOfWork
from tests.support.service import Actors

SUBJECT = EVENT_SUBJECTS[m.BenchmarkApproved]
WAIT_S = 30.0  # an upper bound for what is awaited, never a pause


class NotedRow(SQLModel, table=True):
    __tablename__ = "noted_row"
    key: str = Field(primary_key=True)


@dataclass
class Notes:
    """What the probe's handlers did: the size of each batch its batch form took, each message handled alone, and
    whether the batch form is told to fail."""

    batches: list[int] = field(default_factory=list)
    alone: list[str] = field(default_factory=list)
    fail_batches: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 0

    def check(self, rows: int) -> None:
        if rows >= self.expected:
            self.done.set()


NotesDep = Annotated[Notes, Context("notes")]


async def note_one(approved: Envelope[m.BenchmarkApproved], uow: UnitOfWork, notes: NotesDep) -> None:
    uow.session.add(NotedRow(key=approved.data.benchmark_id))
    uow.emit(m.AssociationRequested(benchmark_id=approved.data.benchmark_id, kind=m.EntityKind.MODEL,
                                    entity_id="model-1", requested_by="probe"))
    notes.alone.append(approved.data.benchmark_id)


async def note_all(arrivals: Sequence[Arrival], uow: Transaction, context: Any) -> None:
    notes: Notes = context.get("notes")
    for arrival in arrivals:
        benchmark_id = arrival.envelope.data.benchmark_id  # type: ignore[attr-defined]
        uow.session.add(NotedRow(key=benchmark_id))
        uow.emit(m.AssociationRequested(benchmark_id=benchmark_id, kind=m.EntityKind.MODEL, entity_id="model-1",
                                        requested_by="probe"))
    notes.batches.append(len(arrivals))
    if notes.fail_batches:
        raise RuntimeError("the batch form failed halfway")


WIRING = Wiring(owner="probe", source="service:probe",
                consumers=(Consumer(note_one, batch=64, together=note_all),),
                publishes=(Outlet.event(m.AssociationRequested),))
ACTORS = Actors()


async def publish_approvals(nats_url: str, count: int, prefix: str = "b") -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    for n in range(count):
        envelope = ACTORS.announce(m.BenchmarkApproved(benchmark_id=f"{prefix}{n}", approved_by="operator"))
        await js.publish(SUBJECT, envelope.model_dump_json().encode(), headers={"Nats-Msg-Id": envelope.id})
    await nc.close()


def probe(nats_url: str, tmp_path: Path, notes: Notes) -> ServiceApp:
    settings = ServiceSettings(nats_url=nats_url, database_url=f"sqlite+aiosqlite:///{tmp_path / 'probe.db'}",
                               **ACTORS.service_settings("probe", tmp_path))
    return service_app(WIRING, settings, [NotedRow.__table__], context={"notes": notes})


async def handled(app: ServiceApp, notes: Notes, count: int) -> list[str]:
    """Wait until `count` rows are stored; the stored keys."""
    notes.expected = count
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        async with app.db.transaction(notify=False) as session:
            keys = sorted((await session.exec(select(NotedRow.key))).all())
        if len(keys) >= count or loop.time() > deadline:
            return keys
        await asyncio.sleep(0.05)


async def staged(app: ServiceApp) -> int:
    from service_kit.outbox import OutboxMessage

    async with app.db.transaction(notify=False) as session:
        return len((await session.exec(select(OutboxMessage))).all())


async def test_what_one_fetch_brings_is_handled_in_one_unit_of_work(nats_url: str, tmp_path: Path) -> None:
    await publish_approvals(nats_url, 40)  # waiting in the stream before the consumer starts: one fetch takes all
    notes = Notes()
    app = probe(nats_url, tmp_path, notes)
    async with TestApp(app):
        keys = await handled(app, notes, 40)
        assert await staged(app) == 40

    assert keys == sorted(f"b{n}" for n in range(40))
    assert notes.alone == [] and sum(notes.batches) == 40 and max(notes.batches) > 1


async def test_a_batch_that_fails_leaves_nothing_and_each_message_is_then_handled_alone_once(
        nats_url: str, tmp_path: Path) -> None:
    await publish_approvals(nats_url, 20)
    notes = Notes(fail_batches=True)
    app = probe(nats_url, tmp_path, notes)
    async with TestApp(app):
        keys = await handled(app, notes, 20)
        assert await staged(app) == 20  # the failed batch's events were rolled back with its rows

    assert keys == sorted(f"b{n}" for n in range(20))
    assert sorted(notes.alone) == keys and notes.batches  # each once, alone, after its batch failed


async def test_a_message_processed_before_is_not_handled_again_in_a_batch(nats_url: str, tmp_path: Path) -> None:
    await publish_approvals(nats_url, 10)
    notes = Notes()
    app = probe(nats_url, tmp_path, notes)
    async with TestApp(app):
        await handled(app, notes, 10)
    # the same messages delivered again (a new consumer of the stream, as after a lost acknowledgement), with new ones
    nc = await nats.connect(nats_url)
    await nc.jetstream().delete_consumer("EVENTS", next(iter(WIRING.durables())))
    await nc.close()
    await publish_approvals(nats_url, 5, prefix="c")
    again = Notes()
    app = probe(nats_url, tmp_path, again)
    async with TestApp(app):
        keys = await handled(app, again, 15)
        await all_acknowledged(nats_url, 15)
        assert await staged(app) == 15  # ten before, five now: none of the ten staged twice

    assert len(keys) == 15 and again.alone == []
    assert sum(again.batches) == 5  # the ten delivered again were known to the inbox: not handed to the batch form


async def all_acknowledged(nats_url: str, count: int) -> None:
    """Until the probe's consumer has been delivered `count` messages and acknowledged them all."""
    nc = await nats.connect(nats_url)
    js, durable = nc.jetstream(), next(iter(WIRING.durables()))
    try:
        for _ in range(int(WAIT_S / 0.05)):
            info = await js.consumer_info("EVENTS", durable)
            if info.delivered.stream_seq >= count and info.num_ack_pending == 0:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{durable} did not acknowledge {count} messages")
    finally:
        await nc.close()
