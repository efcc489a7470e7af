"""How one app meets the bus, declared once: what it consumes, what it answers, what it publishes.

`Wiring.declare(broker, units)` makes a faststream subscriber for every consumed message and a named publisher for
every subject it sends on (so AsyncAPI and the test broker's mocks see them all), behind the one `Edge`. `assay up`
reads the durable consumers it waits for from the same declaration. A handler's payload type is read from its first
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

from contracts import subjects
from contracts.catalog import EVENT_SUBJECTS, QUERY_SUBJECTS, REQUEST_SUBJECTS
from contracts.envelope import Envelope, Payload
from contracts.messages import DeadLetter
from contracts.streams import PUBLISH_TIMEOUT_S
from service_kit.edge import Edge, Retry, Route, Units

Handler = Callable[..., Awaitable[Any]]
ACK_WAIT_S = 30.0


def payload_of(handle: Handler) -> type[Payload]:
    """X, for a handler whose first parameter is annotated `Envelope[X]`."""
    first = next(iter(inspect.signature(handle).parameters))
    envelope = typing.get_type_hints(handle)[first]
    args = getattr(envelope, "__pydantic_generic_metadata__", {}).get("args", ())
    if getattr(envelope, "__pydantic_generic_metadata__", {}).get("origin") is not Envelope or not args:
        raise TypeError(f"{handle.__name__}: its first parameter must be annotated Envelope[<payload>]")
    return args[0]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Consumer:
    """A durable JetStream consumer: `handle` gets every message on `subject` (by default its event's subject)."""

    handle: Handler
    subject: str = ""
    ack_wait_s: float = ACK_WAIT_S
    batch: int = 16

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


class Outlets:
    """The app's publishers by subject: the only way out, for the outbox relay and the site's results alike."""

    def __init__(self, owner: str, publishers: dict[str, LogicPublisher]) -> None:
        self._owner, self._publishers = owner, publishers

    def find(self, subject: str) -> LogicPublisher:
        for pattern, publisher in self._publishers.items():
            if subjects.matches(pattern, subject):
                return publisher
        raise LookupError(f"{self._owner} does not declare that it publishes on {subject}")

    async def publish(self, subject: str, body: bytes, message_id: str) -> None:
        """Publish stored bytes with `Nats-Msg-Id`, so a resend inside the duplicate window is dropped."""
        await self.find(subject).publish(body, subject=subject, timeout=PUBLISH_TIMEOUT_S, headers={
            "Nats-Msg-Id": message_id, "content-type": "application/json"})


@dataclass(frozen=True)
class Wiring:
    owner: str                        # names its durables, its command queue group and its dead letters
    source: str                       # the CloudEvents source of what it publishes
    consumers: tuple[Consumer, ...] = ()
    requests: tuple[Request, ...] = ()
    publishes: tuple[Outlet, ...] = ()
    retry: Retry = Retry()

    def durables(self) -> dict[str, str]:
        """Each durable consumer's name and its stream: the app is up once they all exist."""
        return {subjects.durable(self.owner, c.address): subjects.stream_of(c.address) for c in self.consumers}

    def declares(self, subject: str) -> bool:
        return any(subjects.matches(outlet.subject, subject) for outlet in self.publishes)

    def declare(self, broker: NatsBroker, units: Units | None) -> Outlets:
        router = NatsRouter()
        publishers = {o.subject: self._publisher(router, o.subject, o.payload) for o in self.publishes}
        routes: dict[str, Route] = {}
        for consumer in self.consumers:
            name = subjects.durable(self.owner, consumer.address)
            letters = self._publisher(router, subjects.dead_letter(name), DeadLetter, title=f"{name}:DeadLetter")
            routes[consumer.address] = Route(name, consumer.payload, dead_letters=letters)
            router.subscriber(
                consumer.address, stream=JStream(subjects.stream_of(consumer.address), declare=False), durable=name,
                pull_sub=PullSub(batch_size=consumer.batch, timeout=1.0), title=name,
                config=ConsumerConfig(max_deliver=self.retry.max_deliver, ack_wait=consumer.ack_wait_s),
                ack_policy=AckPolicy.NACK_ON_ERROR,
            )(consumer.handle)
        for request in self.requests:
            subject = REQUEST_SUBJECTS[request.payload]
            routes[subject] = Route(self.owner, request.payload, answers=True,
                                    inbox=request.payload not in QUERY_SUBJECTS)
            router.subscriber(subject, queue=self.owner, title=f"{self.owner}:{request.payload.__name__}")(
                request.handle)
        broker.include_router(router, middlewares=[Edge(routes, units, self.retry, self.source)])
        return Outlets(self.owner, publishers)

    def _publisher(self, router: NatsRouter, subject: str, payload: type[Payload], title: str = "") -> LogicPublisher:
        return router.publisher(subject, stream=JStream(subjects.stream_of(subject), declare=False),
                                schema=Envelope[payload],  # type: ignore[valid-type]
                                title=title or f"{self.owner}:{payload.__name__}", timeout=PUBLISH_TIMEOUT_S)
