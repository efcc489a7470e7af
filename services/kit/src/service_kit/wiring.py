"""How one app meets the bus, declared once: what it consumes, what it answers, what it publishes.

`Wiring.declare(broker, units)` makes a faststream subscriber for every consumed message and a named publisher for
every subject it sends on (so AsyncAPI and the test broker's mocks see them all), behind the one `Edge`; a service
answers the operator's replay of its own consumers' dead letters too (`service_kit.replay`). `assay up` reads the
durable consumers it waits for from the same declaration. A handler's payload type is read from its first
parameter, `Envelope[X]`: the signature is the declaration.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from faststream import AckPolicy
from faststream.nats import ConsumerConfig, JStream, NatsBroker, NatsRouter, PullSub
from faststream.nats.publisher.usecase import LogicPublisher

from assay_telemetry.metrics import CONSUMER, DEAD_LETTERS, Meters
from contracts import subjects
from contracts.catalog import EVENT_SUBJECTS, QUERY_SUBJECTS, REQUEST_SUBJECTS, replay_subject
from contracts.envelope import Envelope, Payload
from contracts.messages import DeadLetter, DeadLetterReplayed, ReplayDeadLetter
from contracts.streams import PUBLISH_TIMEOUT_S
from service_kit.edge import Checks, Edge, Retry, Route, Transactions, checked_body
from service_kit.replay import Replayable, Replays, replay_dead_letter
from service_kit.together import BatchHandler, Together

Handler = Callable[..., Awaitable[Any]]
ACK_WAIT_S = 30.0


def payload_of(handle: Handler) -> type[Payload]:
    """X, for a handler whose first parameter is annotated `Envelope[X]`."""
    first = next(iter(inspect.signature(handle).parameters))
    envelope = typing.get_type_hints(handle)[first]
    generic = getattr(envelope, "__pydantic_generic_metadata__", None) or {}
    if generic.get("origin") is not Envelope or not generic.get("args"):
        raise TypeError(f"{handle.__name__}: its first parameter must be annotated Envelope[<payload>]")
    return generic["args"][0]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Consumer:
    """A durable JetStream consumer: `handle` gets every message on `subject` (by default its event's subject)."""

    handle: Handler
    subject: str = ""
    ack_wait_s: float = ACK_WAIT_S
    batch: int = 16
    workers: int = 1  # messages handled at once (a site runs several jobs); 1: one after another, in order
    together: BatchHandler | None = None  # the handler's batch form: a fetch's messages in one unit of work

    @property
    def payload(self) -> type[Payload]:
        return payload_of(self.handle)

    @property
    def address(self) -> str:
        return self.subject or EVENT_SUBJECTS[self.payload]


@dataclass(frozen=True)
class Request:
    """A command or query on request/reply: `handle` returns the reply."""

    handle: Handler

    @property
    def payload(self) -> type[Payload]:
        return payload_of(self.handle)


@dataclass(frozen=True)
class Outlet:
    """A subject (or pattern, `assay.v1.jobs.*`) the app publishes on, and what travels there."""

    subject: str
    payload: type[Payload]

    @classmethod
    def event(cls, payload: type[Payload]) -> Outlet:
        return cls(EVENT_SUBJECTS[payload], payload)


def undeclared(owner: str, subject: str) -> LookupError:
    return LookupError(f"{owner} does not declare that it publishes on {subject}")


class Outlets:
    """The app's publishers by subject: the only way out, for the outbox relay, the site's results and the dead
    letters of every consumer alike."""

    def __init__(self, owner: str, source: str, publishers: dict[str, LogicPublisher],
                 meters: Meters | None = None) -> None:
        self._owner, self._source, self._publishers = owner, source, publishers
        self._meters = meters  # counts the dead letters

    def find(self, subject: str) -> LogicPublisher:
        for pattern, publisher in self._publishers.items():
            if subjects.matches(pattern, subject):
                return publisher
        raise undeclared(self._owner, subject)

    async def publish(self, subject: str, body: bytes, message_id: str) -> None:
        """Publish stored bytes with `Nats-Msg-Id`, so a resend inside the duplicate window is dropped."""
        await self.find(subject).publish(body, subject=subject, timeout=PUBLISH_TIMEOUT_S, headers={
            "Nats-Msg-Id": message_id, "content-type": "application/json"})

    async def dead_letter(self, consumer: str, subject: str, message_id: str, deliveries: int, error: str, *,
                          stream: str | None = None, sequence: int | None = None) -> None:
        """What `consumer` gave up on, and why, on `assay.v1.dlq.<consumer>`: one letter per message, saying where
        its stream keeps it (for a replay)."""
        letter = Envelope.wrap(DeadLetter(consumer=consumer, subject=subject, message_id=message_id,
                                          deliveries=deliveries, error=error[:4000], stream=stream,
                                          sequence=sequence), source=self._source)
        await self.publish(subjects.dead_letter(consumer), letter.model_dump_json().encode(),
                           f"dlq:{consumer}:{message_id}")
        if self._meters is not None:
            self._meters.add(DEAD_LETTERS, attributes={CONSUMER: consumer})


@dataclass(frozen=True)
class Wiring:
    owner: str                        # names its durables, its command queue group and its dead letters
    source: str                       # the CloudEvents source of what it publishes
    consumers: tuple[Consumer, ...] = ()
    requests: tuple[Request, ...] = ()
    publishes: tuple[Outlet, ...] = ()
    retry: Retry = Retry()
    outbox: bool = True               # it relays an outbox, and dead-letters what the server refuses for good

    @property
    def outbox_consumer(self) -> str:
        return f"{self.owner}-outbox"

    def durables(self) -> dict[str, str]:
        """Each durable consumer's name and its stream: the app is up once they all exist."""
        return {subjects.durable(self.owner, c.address): subjects.stream_of(c.address) for c in self.consumers}

    @property
    def answers_replays(self) -> bool:
        """A service (its consumers keep an inbox in its database) answers the operator's replays of the messages its
        consumers gave up on; a site's jobs are run again by `assay job retry` instead."""
        return self.outbox and bool(self.consumers)

    @property
    def outlets(self) -> tuple[Outlet, ...]:
        """Every subject it publishes on: those it declares, and the kit's for it (what became of each replay)."""
        return self.publishes + ((Outlet.event(DeadLetterReplayed),) if self.answers_replays else ())

    def require(self, subject: str) -> None:
        """LookupError unless the app declares that it publishes on `subject`."""
        if not any(subjects.matches(outlet.subject, subject) for outlet in self.outlets):
            raise undeclared(self.owner, subject)

    def declare(self, broker: NatsBroker, units: Transactions | None, trust: Checks | None = None,
                inbox: str = "_INBOX", meters: Meters | None = None, replays: Replays | None = None) -> Outlets:
        """A subscriber for each consumer and request, each behind its own Edge, and the declared publishers.
        `trust` checks who signed each event a consumer gets (none at a site, which trusts only the scheduler's
        signature on its jobs); `inbox` is where the server delivers what a consumer pulls (its user's own);
        `meters` counts the dead letters; `replays` learns each consumer's subscriber, through which a replayed
        message goes as a delivery does."""
        addresses = [c.address for c in self.consumers] + [REQUEST_SUBJECTS[r.payload] for r in self.requests]
        if len(set(addresses)) != len(addresses):
            raise ValueError(f"{self.owner} subscribes to a subject twice; one subject, one handler: {addresses}")
        publishers = {o.subject: self._publisher(broker, o.subject, o.payload) for o in self.outlets}
        letters = [subjects.durable(self.owner, c.address) for c in self.consumers]
        for consumer in letters + ([self.outbox_consumer] if self.outbox else []):
            publishers[subjects.dead_letter(consumer)] = self._publisher(
                broker, subjects.dead_letter(consumer), DeadLetter, title=f"{consumer}:DeadLetter")
        outlets = Outlets(self.owner, self.source, publishers, meters)
        for consumer, name in zip(self.consumers, letters, strict=True):
            stream = subjects.stream_of(consumer.address)
            together = Together(name, consumer.together, units) if consumer.together and units else None
            subscriber = self._subscribe(
                broker, Edge(Route(name, consumer.payload), units, self.retry, outlets, trust, together),
                consumer.address, consumer.handle, stream=JStream(stream, declare=False),
                durable=name, title=name, pull_sub=PullSub(batch_size=consumer.batch, timeout=1.0),
                inbox_prefix=f"{inbox}.".encode(),
                config=ConsumerConfig(max_deliver=self.retry.max_deliver, ack_wait=consumer.ack_wait_s),
                ack_policy=AckPolicy.NACK_ON_ERROR,
                **({"max_workers": consumer.workers} if consumer.workers > 1 else {}))
            if replays is not None:
                replays.add(Replayable(name, consumer.address, stream, subscriber))
        for request in self.requests:
            route = Route(self.owner, request.payload, answers=True, inbox=request.payload not in QUERY_SUBJECTS)
            self._subscribe(broker, Edge(route, units, self.retry, outlets), REQUEST_SUBJECTS[request.payload],
                            request.handle, queue=self.owner, title=f"{self.owner}:{request.payload.__name__}")
        if self.answers_replays:  # its handler opens the consumer's units itself, after checking who sent it
            route = Route(self.owner, ReplayDeadLetter, answers=True, unit=False)
            self._subscribe(broker, Edge(route, units, self.retry, outlets), replay_subject(self.owner),
                            replay_dead_letter, queue=self.owner, title=f"{self.owner}:ReplayDeadLetter")
        return outlets

    @staticmethod
    def _subscribe(broker: NatsBroker, edge: Edge, subject: str, handle: Handler, **options: Any) -> Any:
        """One subscriber; a router of its own carries its Edge, so the edge knows its route without asking."""
        router = NatsRouter()
        subscriber = router.subscriber(subject, decoder=checked_body, **options)
        subscriber(handle)
        broker.include_router(router, middlewares=[edge])
        return subscriber

    def _publisher(self, broker: NatsBroker, subject: str, payload: type[Payload], title: str = "") -> LogicPublisher:
        return broker.publisher(subject, stream=JStream(subjects.stream_of(subject), declare=False),
                                schema=Envelope[payload],  # type: ignore[valid-type]
                                title=title or f"{self.owner}:{payload.__name__}", timeout=PUBLISH_TIMEOUT_S)
