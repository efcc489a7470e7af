"""A service's SQLite file is queried on the event loop's own thread (`service_kit.db.InlineConnection`), and its
transactions still commit and roll back as they did through aiosqlite's thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import event, text

from service_kit.db import Database, make_engine


@pytest.mark.asyncio
async def test_a_query_runs_on_the_loops_thread_and_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'service.db'}")

    @event.listens_for(engine.sync_engine, "connect")
    def thread_of_the_query(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.create_function("answering_thread", 0, threading.get_ident)

    db = Database(engine)
    async with db.transaction(notify=False) as session:
        await session.exec(text("CREATE TABLE kept (n INTEGER)"))  # type: ignore[call-overload]
        answered = (await session.exec(text("SELECT answering_thread()"))).scalar()  # type: ignore[call-overload]
    assert answered == threading.get_ident()  # not aiosqlite's thread: no hop there and back for each call

    with pytest.raises(RuntimeError):
        async with db.transaction(notify=False) as session:
            await session.exec(text("INSERT INTO kept VALUES (1)"))  # type: ignore[call-overload]
            raise RuntimeError("the handler failed")
    async with db.transaction(notify=False) as session:
        await session.exec(text("INSERT INTO kept VALUES (2)"))  # type: ignore[call-overload]
    async with db.transaction(notify=False) as session:
        assert (await session.exec(text("SELECT n FROM kept"))).scalars().all() == [2]  # type: ignore[call-overload]
    await db.close()
