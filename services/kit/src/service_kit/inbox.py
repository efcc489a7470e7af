"""Idempotent consumers: the ids a consumer has processed, recorded in the same transaction as its effects."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from contracts.envelope import utcnow
from service_kit.db import add_at_commit


class ProcessedMessage(SQLModel, table=True):
    __tablename__ = "inbox"
    consumer: str = Field(primary_key=True, max_length=128)
    message_id: str = Field(primary_key=True, max_length=128)
    processed_at: datetime = Field(default_factory=utcnow)


def digest(body: bytes) -> str:
    """How a message is known: the digest of its bytes, so a forgery that reuses a genuine envelope id blocks nothing
    (and every valid id fits the column)."""
    return hashlib.sha256(body).hexdigest()


async def seen(session: AsyncSession, consumer: str, body: bytes) -> bool:
    return await session.get(ProcessedMessage, (consumer, digest(body))) is not None


async def first_times(session: AsyncSession, consumer: str, bodies: Sequence[bytes]) -> list[bool]:
    """`first_time` for each of `bodies` at once, in one query: a body that comes twice among them is new once."""
    digests = [digest(body) for body in bodies]
    known = set((await session.exec(select(ProcessedMessage.message_id).where(
        ProcessedMessage.consumer == consumer, col(ProcessedMessage.message_id).in_(set(digests))))).all())
    fresh, now = [], utcnow()
    for message_id in digests:
        fresh.append(message_id not in known)
        if message_id not in known:
            known.add(message_id)
            # written with the batch's others at the commit, in one executemany (an ORM object per message cost a
            # batch of 256 more than the query); as in first_time, a replica that got there first makes it fail
            add_at_commit(session, ProcessedMessage.__table__,  # type: ignore[attr-defined]
                          {"consumer": consumer, "message_id": message_id, "processed_at": now})
    return fresh


async def first_time(session: AsyncSession, consumer: str, body: bytes) -> bool:
    """True (and remembered) the first time; False for a message this consumer already processed."""
    if await seen(session, consumer, body):
        return False
    session.add(ProcessedMessage(consumer=consumer, message_id=digest(body)))
    await session.flush()  # a concurrent replica that got here first makes this fail: the message is redelivered
    return True
