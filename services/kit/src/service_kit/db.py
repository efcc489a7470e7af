"""The database edge every service shares: an async engine from a URL (SQLite file or PostgreSQL) and a unit of work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import aiosqlite
from sqlalchemy import Table, event, insert, make_url, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from service_kit.edge import Conflict

log = logging.getLogger(__name__)


class InlineConnection(aiosqlite.Connection):
    """aiosqlite's connection with each call made on the event loop's own thread, not handed to the connection's
    thread and its result handed back: a query cost 0.4 ms of round trip where SQLite takes a few microseconds to
    answer it, and several times that on a busy machine (each hop waits for its thread to run). The commit alone,
    which waits for the disk, still goes to the thread.

    A call blocks the loop for as long as SQLite takes. That is short here: a service's file is its own process's
    alone, its transactions take turns (`Database`), and WAL readers never wait for the writer. The connection is
    still opened (and closed) on aiosqlite's thread, which SQLAlchemy also uses to set an isolation level; hence
    `check_same_thread=False`."""

    async def _execute(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self._running or not self._connection:
            raise ValueError("Connection closed")
        return fn(*args, **kwargs)

    async def commit(self) -> None:
        """On aiosqlite's thread, as before: a commit waits for the disk (FULL sync), and the loop goes on meanwhile
        (in the scheduler the commits were a seventh of its time on the loop's thread). The session holds this
        connection until the commit returns, so no other call meets it on the loop's thread meanwhile."""
        await aiosqlite.Connection._execute(self, self._conn.commit)


def inline_sqlite(path: str) -> Callable[[], Awaitable[aiosqlite.Connection]]:
    async def connect() -> aiosqlite.Connection:
        connection = InlineConnection(partial(sqlite3.connect, path, timeout=30, check_same_thread=False),
                                      iter_chunk_size=64)
        connection._thread.daemon = True  # as SQLAlchemy makes aiosqlite's: it never holds the process at its exit
        return await connection

    return connect


def make_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, async_creator=inline_sqlite(make_url(url).database or ""))

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_async_engine(url, pool_pre_ping=True)


STAGED = "assay_staged"  # in a session's info: the rows `add_at_commit` keeps for its commit, by table


def add_at_commit(session: AsyncSession, table: Table, row: dict[str, Any]) -> None:
    """Insert `row` into `table` as the transaction commits, with the others staged for that table in one executemany
    (in the order they were staged): for rows nothing reads back before the commit (the outbox's, a batch's inbox
    rows, the leaderboard batch's accepted results). An ORM object per row cost more to build and flush than the
    insert itself, a quarter of what a service did per message."""
    session.info.setdefault(STAGED, {}).setdefault(table, []).append(row)


async def insert_staged(session: AsyncSession) -> None:
    for table, rows in session.info.pop(STAGED, {}).items():
        await session.exec(insert(table), params=rows)  # type: ignore[call-overload]


SCHEMA_LOCK = 0x617373617901  # advisory lock keys, one per purpose: creating the tables, and the outbox relay
OUTBOX_LOCK = 0x617373617902


async def create_tables(engine: AsyncEngine, tables: list) -> None:  # type: ignore[type-arg]
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # replicas that start together: one creates the tables (two would
            # both find them missing, and one fail on the catalogue's unique keys); the others wait, then find them
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
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
                    await insert_staged(session)  # a racing replica's row fails here too: a Conflict
        except IntegrityError as exc:
            log.warning("a transaction was rolled back on a constraint (a racing replica or command, or a bug): %s",
                        exc.orig)
            raise Conflict(f"a concurrent change took the same key: {exc.orig}") from exc
        if notify:
            for hook in self.committed:
                hook()  # type: ignore[operator]

    @asynccontextmanager
    async def alone(self, key: int, wait_s: float) -> AsyncIterator[bool]:
        """Run the block in one process at a time of those that share this database (replicas on PostgreSQL): it
        holds the advisory lock `key` on a connection of its own, which locks no row and blocks no writer, and goes
        when the block ends or its process dies. A process that has waited `wait_s` for another (stuck on a server
        that went away) runs the block anyway, and yields False: what it guards must be correct twice at once, and
        is only cheaper once. SQLite's file is one process's: nothing to hold."""
        if self.engine.dialect.name != "postgresql":
            yield True
            return
        async with self.engine.connect() as connection:
            holding = await connection.begin()
            try:
                await connection.execute(text(f"SET LOCAL lock_timeout = '{max(1, round(wait_s * 1000))}ms'"))
                await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
                held = True
            except DBAPIError as exc:  # lock_timeout (55P03): the holder is taking longer than anyone should wait
                await holding.rollback()
                log.warning("went on without lock %#x after %.1f s: %s", key, wait_s, exc.orig)
                held = False
            try:
                yield held
            finally:
                if held:
                    with contextlib.suppress(DBAPIError):  # a broken connection's lock went with its session
                        await holding.rollback()  # the lock is released; nothing was written on this connection

    async def close(self) -> None:
        await self.engine.dispose()
