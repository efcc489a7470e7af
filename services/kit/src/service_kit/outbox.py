"""Transactional outbox: events are written with the state change, then a relay publishes them with Nats-Msg-Id."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from nats.errors import MaxPayloadError
from nats.js.errors import BadRequestError
from opentelemetry import context as otel_context
from opentelemetry import propagate
from sqlalchemy import delete, func, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from contracts.envelope import Envelope, Payload, aware, utcnow
from service_kit.db import OUTBOX_LOCK, add_at_commit
from service_kit.inbox import ProcessedMessage

log = logging.getLogger(__name__)
P = TypeVar("P", bound=Payload)


class OutboxMessage(SQLModel, table=True):
    __tablename__ = "outbox"
    seq: int | None = Field(default=None, primary_key=True)
    message_id: str = Field(unique=True, max_length=128)
    subject: str = Field(max_length=256)
    body: bytes
    trace_headers: str = "{}"  # the trace context of the transaction that staged it, so the trace goes on
    created_at: datetime = Field(default_factory=utcnow)
    published_at: datetime | None = Field(default=None, index=True)
    set_aside: str | None = Field(default=None, max_length=1000)  # why the server can never take it: not retried


def stage(session: AsyncSession, subject: str, envelope: Envelope[P]) -> None:
    """Add a message to the outbox inside the caller's transaction (handlers do it through their UnitOfWork): its row
    is written as the transaction commits."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    add_at_commit(session, OutboxMessage.__table__, {  # type: ignore[attr-defined]
        "message_id": envelope.id, "subject": subject, "body": envelope.model_dump_json().encode(),
        "trace_headers": json.dumps(carrier), "created_at": utcnow()})


async def waiting(connection: AsyncConnection) -> tuple[int, datetime | None]:
    """How many staged messages wait to be published, and when the oldest of them was staged (None: none waits)."""
    pending = (col(OutboxMessage.published_at).is_(None), col(OutboxMessage.set_aside).is_(None))
    count, oldest = (await connection.execute(
        select(func.count(), func.min(OutboxMessage.created_at)).where(*pending))).one()
    return int(count), oldest


SetAside = Callable[[OutboxMessage, str], Awaitable[None]]
KEEP_PUBLISHED = timedelta(days=7)
KEEP_PROCESSED = timedelta(days=30)
# how long a replica's relay waits for another's flush before it publishes too: longer than a flush takes, shorter
# than a publish to a server that died takes to time out (the replicas' events do not wait on the stuck one for that)
ALONE_WAIT_S = 2.0
PRUNE_EVERY_S = 3600.0
STILL_FAILING_EVERY_S = 10.0
TOO_LARGE_FOR_THE_STREAM = 10054  # JetStream's "message size exceeds maximum allowed"


def refused_for_good(exc: Exception) -> bool:
    """The server can never store this message (too large for it or its stream): set it aside, do not retry it.
    A full stream (10077) or an absent server is not this: those are retried, and the relay says so."""
    return isinstance(exc, MaxPayloadError) or (isinstance(exc, BadRequestError)
                                                and exc.err_code == TOO_LARGE_FOR_THE_STREAM)


class Failing:
    """The relay's failures to publish, said once per streak and then every few seconds. Every commit wakes the
    relay, so a bus away for a while (a cluster electing a stream's leader) would otherwise log a traceback several
    times a second."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.attempts, self.said = 0, 0.0

    def again(self, exc: Exception) -> None:
        now, self.attempts = time.monotonic(), self.attempts + 1
        if self.since is None:
            self.since = self.said = now
            log.error("outbox relay could not publish; will retry", exc_info=exc)
        elif now - self.said >= STILL_FAILING_EVERY_S:
            self.said = now
            log.warning("outbox relay still cannot publish (%d attempts over %.0f s; %s: %s); will retry",
                        self.attempts, now - self.since, type(exc).__name__, exc)

    def over(self) -> None:
        if self.since is not None:
            log.warning("outbox relay publishing again, after %d failed attempts over %.1f s", self.attempts,
                        time.monotonic() - self.since)
            self.since, self.attempts = None, 0


class Relay:
    """Publishes staged messages in order; safe to run in several replicas. Replicas that share a database flush one
    at a time (`Database.alone`), so each message is normally published once and the stream keeps the order of the
    outbox; where two do publish the same rows (one stuck past ALONE_WAIT_S), the server drops the second copy by its
    Nats-Msg-Id, and the first copy of each id still comes in the outbox's order (each relay publishes in that order).

    A message the server refuses for good is set aside with the reason (`set_aside` says so, a dead letter in a
    service), so the messages behind it still leave.
    """

    def __init__(self, db: Any, publish: Callable[[str, bytes, str], Awaitable[None]], *,
                 set_aside: SetAside | None = None, poll_s: float = 1.0, batch: int = 256,
                 waited: Callable[[float], None] | None = None) -> None:
        self._db = db
        self._publish = publish  # Outlets.publish: subject, body, Nats-Msg-Id
        self._set_aside = set_aside
        self._waited = waited  # told how long each published message waited since it was staged (the lag metric)
        self._poll_s = poll_s
        self._batch = batch
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()  # one flush at a time in a process: the run loop, shutdown, a test
        self._stopping = False
        db.committed.append(self._wake.set)

    async def flush(self) -> int:
        """Publish everything pending, in order; return how many were published.

        Rows are read in one short transaction and marked in another: no database lock is held while
        waiting for the server. A crash in between publishes them again, and the server drops them by id.
        """
        async with self._flushing, self._db.alone(OUTBOX_LOCK, ALONE_WAIT_S):
            return await self._flush()

    async def _flush(self) -> int:
        total = 0
        while True:
            async with self._db.transaction(notify=False) as session:  # notify would wake the relay itself
                rows = (await session.exec(
                    select(OutboxMessage).where(col(OutboxMessage.published_at).is_(None),
                                                col(OutboxMessage.set_aside).is_(None))
                    .order_by(col(OutboxMessage.seq)).limit(self._batch)
                )).all()
            published: list[int] = []
            failed: BaseException | None = None
            try:
                for row, outcome in zip(rows, await self._send(rows), strict=True):
                    if outcome is None:
                        published.append(row.seq)  # type: ignore[arg-type]
                    elif isinstance(outcome, Exception) and refused_for_good(outcome):
                        await self._put_aside(row, f"the server refused it for good ({type(outcome).__name__}: "
                                                   f"{outcome}); {len(row.body)} bytes on {row.subject}")
                    elif failed is None:  # stays pending, and is sent again on the next flush
                        failed = outcome
            finally:
                if published:
                    now = utcnow()
                    async with self._db.transaction(notify=False) as session:
                        await session.exec(update(OutboxMessage).where(col(OutboxMessage.seq).in_(published))
                                           .values(published_at=now))
                    if self._waited is not None:
                        done = set(published)
                        for row in rows:
                            if row.seq in done:
                                self._waited((now - aware(row.created_at)).total_seconds())
            if failed is not None:
                raise failed
            total += len(published)
            if len(rows) < self._batch:
                return total

    async def _send(self, rows: Sequence[OutboxMessage]) -> list[BaseException | None]:
        """Publish every row at once and await their acks together: what each publish came to (None: acked).

        The publishes are written to the one connection in the rows' order, before any ack is awaited, and the server
        stores a connection's messages in the order they arrive: each subject keeps the outbox's order. A row whose
        ack failed stays pending and is sent again, by its Nats-Msg-Id, after the rows that followed it.
        """
        sending = []
        for row in rows:
            token = otel_context.attach(propagate.extract(json.loads(row.trace_headers)))
            try:  # the task takes the trace that staged the row: published as part of it, not as a new one
                sending.append(asyncio.ensure_future(self._publish(row.subject, row.body, row.message_id)))
            finally:
                otel_context.detach(token)
        return list(await asyncio.gather(*sending, return_exceptions=True))

    async def _put_aside(self, row: OutboxMessage, reason: str) -> None:
        log.error("outbox: %s (%s) set aside: %s", row.message_id, row.subject, reason)
        async with self._db.transaction(notify=False) as session:
            await session.exec(update(OutboxMessage).where(col(OutboxMessage.seq) == row.seq)
                               .values(set_aside=reason[:1000]))
        if self._set_aside is not None:
            await self._set_aside(row, reason)

    async def prune(self, now: datetime) -> None:
        """Forget what no longer matters: published rows after a week, processed ids after KEEP_PROCESSED (a
        redelivery comes within hours; a command older than its window is refused by its time anyway)."""
        async with self._db.transaction(notify=False) as session:
            await session.exec(delete(OutboxMessage).where(col(OutboxMessage.published_at) < now - KEEP_PUBLISHED))
            await session.exec(delete(ProcessedMessage).where(
                col(ProcessedMessage.processed_at) < now - KEEP_PROCESSED))

    async def run(self) -> None:
        """Publish until stop(); a flush is never cancelled halfway (that would strand a database transaction)."""
        pruned = 0.0
        failing = Failing()
        while not self._stopping:
            self._wake.clear()
            try:
                await self.flush()
                if time.monotonic() - pruned > PRUNE_EVERY_S:
                    await self.prune(utcnow())
                    pruned = time.monotonic()
                failing.over()
            except Exception as exc:  # the bus may be briefly away: rows stay pending and are retried
                failing.again(exc)
            if self._stopping:
                return
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            except TimeoutError:
                pass

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
