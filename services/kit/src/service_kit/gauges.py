"""What a service's store says now, as gauges: each `Sample` reads the database every few seconds, in the service's
own event loop, and the metrics exporter (in a thread of its own, which cannot wait on that loop) reads the last
reading. Every service samples its outbox; the scheduler its jobs as well."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from assay_telemetry.metrics import OUTBOX_OLDEST, OUTBOX_PENDING, Meters, Metric, Reading
from contracts.envelope import aware, utcnow
from service_kit.outbox import waiting

log = logging.getLogger(__name__)
SAMPLE_EVERY_S = 5.0


@dataclass(frozen=True)
class Sample:
    """The gauges `read` gives values for, all read in one go."""

    metrics: tuple[Metric, ...]
    read: Callable[[AsyncConnection], Awaitable[dict[Metric, Reading]]]


async def outbox_backlog(connection: AsyncConnection) -> dict[Metric, Reading]:
    count, oldest = await waiting(connection)
    waited = (utcnow() - aware(oldest)).total_seconds() if oldest is not None else 0.0
    return {OUTBOX_PENDING: [(float(count), {})], OUTBOX_OLDEST: [(max(waited, 0.0), {})]}


OUTBOX = Sample((OUTBOX_PENDING, OUTBOX_OLDEST), outbox_backlog)


class Gauges:
    """The gauges of `samples`, observed in `meters`, and the readings they report."""

    def __init__(self, engine: object, meters: Meters, samples: Sequence[Sample]) -> None:
        self._engine = engine
        self._samples = tuple(samples)
        self._last: dict[Metric, Reading] = {}
        for sample in self._samples:
            for metric in sample.metrics:
                meters.observe(metric, lambda metric=metric: self._last.get(metric, []))  # type: ignore[misc]

    async def refresh(self) -> None:
        """Read every sample now (one connection, no transaction to wait for: a reading may be a moment old)."""
        async with self._engine.connect() as connection:  # type: ignore[attr-defined]
            readings: dict[Metric, Reading] = {}
            for sample in self._samples:
                readings |= await sample.read(connection)
        self._last = readings  # replaced whole: the exporter's thread sees the old or the new, never half

    async def run(self, every_s: float = SAMPLE_EVERY_S) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # the database may be briefly away: the last reading stands until the next
                log.warning("could not read the gauges from the database; trying again in %.0f s", every_s,
                            exc_info=True)
            await asyncio.sleep(every_s)
