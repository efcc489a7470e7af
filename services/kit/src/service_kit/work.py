"""The unit of work a handler is given: its transaction's session, and the outbox its events go to in the same
transaction, on subjects the app declares it publishes on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Annotated, TypeVar

from faststream import Context
from sqlmodel.ext.asyncio.session import AsyncSession

from assay_telemetry.metrics import Meters, Metric
from contracts.catalog import event_subject
from contracts.envelope import Envelope, Payload
from contracts.signing import KeyPair
from service_kit.db import Database
from service_kit.inbox import first_time, first_times, seen
from service_kit.outbox import stage
from service_kit.wiring import Wiring

P = TypeVar("P", bound=Payload)


class Transaction:
    """One message's unit of work: what `session` changes and what `emit` and `send` stage commit together."""

    def __init__(self, session: AsyncSession, wiring: Wiring, signer: KeyPair, meters: Meters | None = None) -> None:
        self.session = session
        self._wiring = wiring
        self._signer = signer
        self._meters = meters
        self._counts: list[tuple[Metric, dict[str, str]]] = []

    def count(self, metric: Metric, attributes: dict[str, str]) -> None:
        """Add one to a counter once the transaction commits: what was rolled back (and will be handled again) is
        never counted."""
        self._counts.append((metric, attributes))

    def committed(self) -> None:
        if self._meters is not None:
            for metric, attributes in self._counts:
                self._meters.add(metric, attributes=attributes)
        self._counts.clear()

    async def first_time(self, consumer: str, body: bytes) -> bool:
        return await first_time(self.session, consumer, body)

    async def first_times(self, consumer: str, bodies: Sequence[bytes]) -> list[bool]:
        return await first_times(self.session, consumer, bodies)

    async def seen(self, consumer: str, body: bytes) -> bool:
        return await seen(self.session, consumer, body)

    def emit(self, payload: P, *, id: str | None = None) -> Envelope[P]:
        """Stage an event on its subject, signed with the service's key; it is published once the transaction
        commits, and every consumer checks the signature before it changes anything."""
        envelope = self.signed(payload, id=id)
        self.send(event_subject(payload), envelope)
        return envelope

    def unsealed(self, sealed: str) -> bytes:
        """What another service sealed to this one (SealError when it is not sealed to this service's key)."""
        from contracts.sealing import unseal

        return unseal(sealed, self._signer, f"it is not sealed to the key of {self._wiring.owner}")

    def signed(self, payload: P, *, id: str | None = None) -> Envelope[P]:
        """`payload` in an envelope from this service, signed with its key (to `send` on a subject of its own)."""
        return self._signer.sign(Envelope.wrap(payload, source=self._wiring.source, id=id))

    def send(self, subject: str, envelope: Envelope[P]) -> None:
        """Stage any message (a signed job, say) on a declared subject."""
        self._wiring.require(subject)
        stage(self.session, subject, envelope)


UnitOfWork = Annotated[Transaction, Context("uow")]


class Units:
    """Opens a Transaction per message, for the edge."""

    def __init__(self, db: Database, wiring: Wiring, signer: KeyPair, meters: Meters | None = None,
                 tracer: Any = None) -> None:
        self.db, self.wiring, self.signer, self.meters = db, wiring, signer, meters
        self.tracer = tracer  # for work a service starts itself (no message): its span is what it stages' parent

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        async with self.db.transaction() as session:
            unit = Transaction(session, self.wiring, self.signer, self.meters)
            yield unit
        unit.committed()
