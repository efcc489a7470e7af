"""The boards' announcements, coalesced: a burst of results makes one recompute of its benchmark's board and one
LeaderboardUpdated for each model whose results changed, a short window after the burst's first commit, never one per
result; the burst's last result is in it, since each commit wakes the announcer.

What is owed is a row written with each accepted result (`Store.owe_board`), so an announcement a process did not make
before it died is made by the next start, or by another replica; the announcement's transaction takes the row away and
stages its events in the outbox, so each owed announcement is made once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from contracts.messages import PublicView
from leaderboard.current import Boards
from leaderboard.handlers import current
from leaderboard.sharing import announcement
from leaderboard.store import Store
from service_kit.work import Units

log = logging.getLogger(__name__)


class Announcer:
    """Announces what is owed `window_s` after a commit woke it (the commits of that window are in the same
    announcement), and every `poll_s` whatever another process left owed."""

    def __init__(self, units: Units, boards: Boards, *, window_s: float, poll_s: float = 5.0) -> None:
        self._units, self._boards = units, boards
        self._window_s, self._poll_s = window_s, poll_s
        self._wake = asyncio.Event()
        self._wake.set()  # the first look, at the start: what a process before this one left owed
        self._announcing = asyncio.Lock()  # one announcement at a time: the loop, shutdown, a test
        self._stopping = asyncio.Event()
        self.recomputed = 0  # boards made to be announced (what the tests count)
        units.db.committed.append(self._wake.set)  # a commit may have owed a board

    async def run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_s)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):  # the rest of the burst commits meanwhile: one announcement
                await asyncio.wait_for(self._stopping.wait(), self._window_s)
            if self._stopping.is_set():
                return  # what is owed is announced by the app's settle() as it stops, or by the next start
            try:
                await self.settle()
            except Exception:  # the database may be briefly away: what is owed stays owed, and is tried again
                log.exception("could not announce the boards owed; will try again")

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def settle(self) -> int:
        """Announce every board owed now; how many LeaderboardUpdated were staged."""
        async with self._announcing:
            async with self._units.transaction() as uow:
                owed = await Store(uow.session).boards_due()
            return sum([await self._announce(benchmark_id) for benchmark_id in owed])

    async def _announce(self, benchmark_id: str) -> int:
        """One benchmark's announcement, in a transaction of its own: one that fails leaves the others to go; in a
        span of its own, the parent of the LeaderboardUpdated it stages (no message started this work)."""
        tracer = self._units.tracer
        with tracer.start_as_current_span("leaderboard announce") if tracer else contextlib.nullcontext() as span:
            if span is not None:
                span.set_attribute("assay.benchmark_id", benchmark_id)
            return await self._announce_in_span(benchmark_id)

    async def _announce_in_span(self, benchmark_id: str) -> int:
        async with self._units.transaction() as uow:
            store = Store(uow.session)
            benchmark = await store.benchmark(benchmark_id, lock=True)  # after the results accepted for it meanwhile
            models = await store.take_due(benchmark_id)
            if benchmark is None or not models:
                return 0  # another replica announced it meanwhile
            board, _ = await current(store, benchmark, self._boards)
            self.recomputed += 1
            if benchmark.sharing.public is not PublicView.POOLED:
                models = models[-1:]  # the announcement says only that the board changed: once is enough
            ranked = {row.model_id for row in board.rows}
            sent = [uow.emit(announcement(board, benchmark, model)) for model in models
                    if model in ranked or benchmark.sharing.public is not PublicView.POOLED]
            return len(sent)
