"""The database edge every service shares: an async engine from a URL (SQLite file or PostgreSQL) and a unit of work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from service_kit.edge import Conflict

log = logging.getLogger(__name__)


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_async_engine(url, pool_pre_ping=True)


async def create_tables(engine: AsyncEngine, tables: list) -> None:  # type: ignore[type-arg]
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: SQLModel.metadata.create_all(sync, tables=tables))


class Database:
    """One engine and a `transaction()` that commits on success and rolls back on any error."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # SQLite has one writer: queueing here is fair and cheap, where its busy-wait lock starves handlers
        self._serial = asyncio.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        self._sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
        self.committed: list[object] = []  # hooks called after each commit (the outbox relay's wake-up)

    @asynccontextmanager
    async def transaction(self, *, notify: bool = True) -> AsyncIterator[AsyncSession]:
        """Commit on success, roll back on any error; `notify` wakes the outbox relay after the commit.

        A unique key another transaction took first (a replica handling the same message, a racing command) is
        a Conflict: the state is as before, and trying again will see the other's rows.
        """
        try:
            async with self._serial, self._sessions() as session:
                async with session.begin():
                    yield session
        except IntegrityError as exc:
            log.warning("a transaction was rolled back on a constraint (a racing replica or command, or a bug): %s",
                        exc.orig)
            raise Conflict(f"a concurrent change took the same key: {exc.orig}") from exc
        if notify:
            for hook in self.committed:
                hook()  # type: ignore[operator]

    async def close(self) -> None:
        await self.engine.dispose()
