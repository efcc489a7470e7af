"""A pulled batch in one unit of work: the messages of one fetch that reach a consumer's edge together are handled by
the handler's batch form in one transaction (one inbox query, one commit), where one per message would cost each its
own. The batch form must leave exactly what the handler would leave for each message in turn; where it cannot (it
raises, or the commit meets a racing replica's row), nothing of the batch stays and each message goes alone through
the handler, as any delivery does, so every outcome (ack, dead letter, a nack with its delay) is still the message's
own.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context

from contracts.envelope import Envelope, Payload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arrival:
    """One message of the batch: its checked envelope, the subject it came on, and the trace it came in (what its
    handling stages continues that trace, as it would alone)."""

    envelope: Envelope[Payload]
    body: bytes
    subject: str
    trace: otel_context.Context

    @contextlib.contextmanager
    def traced(self) -> Iterator[None]:
        """Within the trace the message came in: what its handling stages continues that trace, as it would alone
        (the batch itself runs in a context of its own)."""
        token = otel_context.attach(self.trace)
        try:
            yield
        finally:
            otel_context.detach(token)


# the batch form of a handler: every arrival handled in `unit` (the unit of work of the batch), `context` the app's
# (what the single form asks for by name); it raises rather than leave an arrival half done
BatchHandler = Callable[[Sequence[Arrival], Any, Any], Awaitable[None]]

ALONE = object()  # what becomes of a message its batch could not take: it is handled alone


class Together:
    """Gathers the arrivals at one consumer's edge and hands each gathering to `handle_all` in one unit of work."""

    def __init__(self, consumer: str, handle_all: BatchHandler, units: Any, *, most: int = 256) -> None:
        self._consumer, self._handle_all, self._units, self._most = consumer, handle_all, units, most
        self._waiting: list[tuple[Arrival, asyncio.Future[object]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, arrival: Arrival, context: Any) -> object:
        """None once the batch that took `arrival` committed; DUPLICATE for a message the consumer processed before;
        ALONE when the caller must handle it alone."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._waiting.append((arrival, future))
        if self._worker is None or self._worker.done():  # in a context of its own: no message's trace is the batch's
            self._worker = asyncio.create_task(self._work(context), context=contextvars.Context())
        return await future

    async def _work(self, context: Any) -> None:
        await asyncio.sleep(0)  # the rest of the pulled batch reaches the edge meanwhile (it was started at once)
        while self._waiting:
            gathered, self._waiting = self._waiting[:self._most], self._waiting[self._most:]
            outcomes: list[object] = [ALONE] * len(gathered)  # unless the batch says otherwise, each goes alone
            try:
                outcomes = await self._handle([arrival for arrival, _ in gathered], context)
            finally:
                for (_, future), outcome in zip(gathered, outcomes, strict=True):
                    if not future.done():  # a message whose handling was cancelled (a stopping app) comes again
                        future.set_result(outcome)

    async def _handle(self, arrivals: list[Arrival], context: Any) -> list[object]:
        from service_kit.edge import DUPLICATE

        try:
            async with self._units.transaction() as unit:
                fresh = await unit.first_times(self._consumer, [arrival.body for arrival in arrivals])
                await self._handle_all([a for a, new in zip(arrivals, fresh, strict=True) if new], unit, context)
        except Exception as exc:  # rolled back: each goes alone, and meets its own outcome
            log.warning("%s: a batch of %d was rolled back (%s: %s); each is handled alone", self._consumer,
                        len(arrivals), type(exc).__name__, exc)
            return [ALONE] * len(arrivals)
        return [None if new else DUPLICATE for new in fresh]
