"""The boards' announcements, coalesced: a burst of results makes one recompute of its benchmark's board and one
LeaderboardUpdated for each model whose results changed, a short window after the burst's first commit, never one per
result; the burst's last result is in it, since each commit wakes the announcer.

What is owed is a row written with each accepted result (`Store.owe_board`), so an announcement a process did not make
before it died is made by the next start, or by another replica; the announcement's transaction takes the row away and
stages its events in the outbox, so each owed announcement is made once. Replicas sharing the database wake on their
own commits, so the loop announces only a board owed for a whole window already: one whose window is still open is left
to the announcement that closes it (at whichever replica comes first), and a benchmark's boards are announced at most
once a window across all the replicas, not once a window by each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from contracts.envelope import aware, utcnow
from contracts.messages import PublicView
from leaderboard.current import Boards
from leaderboard.handlers import current
from leaderboard.sharing import announcement
from leaderboard.store import Store
from service_kit.work import Units

log = logging.getLogger(__name__)


class Announcer:
    """Announces what is owed `window_s` after a commit woke it (the commits of that window are in the same
    announcement), a board owed for less than that once it has been owed `window_s`, and every `poll_s` whatever
    another process left owed."""

    def __init__(self, units: Units, boards: Boards, *, window_s: float, poll_s: float = 5.0) -> None:
        self._units, self._boards = units, boards
        self._window_s, self._poll_s = window_s, poll_s
        self._wake = asyncio.Event()
        self._wake.set()  # the first look, at the start: what a process before this one left owed
        self._announcing = asyncio.Lock()  # one announcement at a time: the loop, shutdown, a test
        self._stopping = asyncio.Event()
        self.recomputed = 0  # boards made to be announced (what the tests count)
        self._ripens_s: float | None = None  # in how long the first board the loop left owed has been owed a window
        units.db.committed.append(self._wake.set)  # a commit may have owed a board

    async def run(self) -> None:
        while not self._stopping.is_set():
            pause_s = self._window_s  # the rest of the burst commits meanwhile: one announcement
            if self._ripens_s is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_s)
            else:  # a board left owed is announced as its window closes; what commits meanwhile is in it
                pause_s = min(self._ripens_s, self._poll_s)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause_s)
            if self._stopping.is_set():
                return  # what is owed is announced by the app's settle() as it stops, or by the next start
            try:
                await self.settle(owed_for_s=self._window_s)
            except Exception:  # the database may be briefly away: what is owed stays owed, and is tried again
                log.exception("could not announce the boards owed; will try again")

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def settle(self, *, owed_for_s: float = 0.0) -> int:
        """Announce every board owed now (the loop: those owed `owed_for_s` already); how many LeaderboardUpdated
        were staged."""
        async with self._announcing:
            async with self._units.transaction() as uow:
                owed = await Store(uow.session).boards_due()
            ripe = utcnow() - timedelta(seconds=owed_for_s)  # owed since then or before: its window has closed
            young = [aware(since) for _, since in owed if aware(since) > ripe]
            self._ripens_s = min(((since - ripe).total_seconds() for since in young), default=None)
            return sum([await self._announce(benchmark_id, ripe) for benchmark_id, since in owed
                        if aware(since) <= ripe])

    async def _announce(self, benchmark_id: str, ripe: datetime) -> int:
        """One benchmark's announcement, in a transaction of its own: one that fails leaves the others to go; in a
        span of its own, the parent of the LeaderboardUpdated it stages (no message started this work)."""
        tracer = self._units.tracer
        with tracer.start_as_current_span("leaderboard announce") if tracer else contextlib.nullcontext() as span:
            if span is not None:
                span.set_attribute("assay.benchmark_id", benchmark_id)
            return await self._announce_in_span(benchmark_id, ripe)

    async def _announce_in_span(self, benchmark_id: str, ripe: datetime) -> int:
        async with self._units.transaction() as uow:
            store = Store(uow.session)
            benchmark = await store.benchmark(benchmark_id, lock=True)  # after the results accepted for it meanwhile
            models = await store.take_due(benchmark_id, owed_since=ripe)
            if benchmark is None or not models:
                return 0  # another replica announced it meanwhile (what was owed after is for the next window)
            board, _ = await current(store, benchmark, self._boards)
            self.recomputed += 1
            if benchmark.sharing.public is not PublicView.POOLED:
                models = models[-1:]  # the announcement says only that the board changed: once is enough
            ranked = {row.model_id for row in board.rows}
            sent = [uow.emit(announcement(board, benchmark, model)) for model in models
                    if model in ranked or benchmark.sharing.public is not PublicView.POOLED]
            return len(sent)
