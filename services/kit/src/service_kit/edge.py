"""The one edge between the bus and every handler, in the services and at the sites: what a delivery is, and what
becomes of a message whose handler cannot do its work.

A handler is a typed function of its envelope and its dependencies (`UnitOfWork`, `Delivery`, ...). `Edge` is the
faststream middleware around all of them: it checks the message against the handler's payload type, runs the
handler inside the unit of work (the inbox check and the transaction), and turns the outcome into an ack, a nack
with a delay, a dead letter or a command's reply. Nothing is dropped silently and a failure always says why.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from faststream import BaseMiddleware, Depends
from faststream.exceptions import HandlerException, NackMessage
from faststream.message import StreamMessage
from faststream.nats.annotations import NatsMessage
from nats.errors import NotJSMessageError
from pydantic import ValidationError

from contracts.envelope import Envelope, Payload, describe
from contracts.messages import CommandReply, DeadLetter

log = logging.getLogger(__name__)


class Refused(Exception):
    """Must change nothing and will never succeed as sent: dead-lettered at once, or a command refused, with this
    message saying what is wrong and what to do."""


class NotYetKnown(Exception):
    """Refers to something this process has not heard of yet; it may exist and arrive with the next events."""


class Conflict(Exception):
    """A concurrent change (another replica, another command) touched the same rows; trying again will do."""


@dataclass(frozen=True)
class DeliveryInfo:
    attempt: int      # 1 for the first delivery; JetStream counts redeliveries, a core message has one
    subject: str      # the subject it was published on
    message_id: str   # its Nats-Msg-Id, else the id faststream gave it


def delivery_of(message: NatsMessage) -> DeliveryInfo:
    raw = message.raw_message
    try:
        attempt = raw.metadata.num_delivered or 1
    except NotJSMessageError:  # core NATS, and faststream's TestNatsBroker
        attempt = 1
    return DeliveryInfo(attempt, raw.subject, message.headers.get("Nats-Msg-Id", message.message_id))


Delivery = Annotated[DeliveryInfo, Depends(delivery_of)]


@dataclass(frozen=True)
class Retry:
    """How often a consumer tries: `failures` times for a handler that fails, `waits` times (with longer delays)
    for a message about something not known yet. The server allows one delivery more than that, so a process that
    dies during the last attempt is followed by one that dead-letters the message instead of the server dropping it.
    """

    failures: int = 10
    waits: int = 1000

    @property
    def attempts(self) -> int:
        return max(self.failures, self.waits)

    @property
    def max_deliver(self) -> int:
        return self.attempts + 1

    @staticmethod
    def backoff_s(attempt: int, cap_s: float = 15.0) -> float:
        return min(0.25 * 2 ** (min(attempt, 20) - 1), cap_s)


class Unit(Protocol):
    async def first_time(self, consumer: str, body: bytes) -> bool: ...


class Units(Protocol):
    """Where the edge opens a handler's unit of work: a transaction that commits when the handler returns."""

    def transaction(self) -> AbstractAsyncContextManager[Unit]: ...


class DeadLetters(Protocol):
    async def publish(self, message: Any, *, headers: dict[str, str]) -> Any: ...


@dataclass(frozen=True)
class Route:
    """One subscriber as the edge sees it: what it expects, and where it puts what it gives up on."""

    consumer: str                   # the durable's name, or the service that answers a request
    payload: type[Payload]
    answers: bool = False           # a request: every outcome is a reply
    inbox: bool = True              # False for queries, which change nothing
    dead_letters: DeadLetters | None = None

    def expect(self, body: bytes) -> None:
        """ValidationError unless `body` is an envelope of this route's payload."""
        Envelope[self.payload].model_validate_json(body)  # type: ignore[name-defined]


@dataclass(frozen=True)
class Edge:
    """The middleware of one app (`router` middlewares): `routes` by subscribed subject, `units` None at a site."""

    routes: Mapping[str, Route]
    units: Units | None
    retry: Retry
    source: str

    def __call__(self, msg: Any, /, *, context: Any) -> BaseMiddleware:
        return _Scope(msg, context=context, edge=self)

    async def run(self, route: Route, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any],
                  context: Any) -> Any:
        """The handler, in its unit of work; the duplicate of a processed message is not handled again."""
        if self.units is None:
            return await call_next(msg)
        async with self.units.transaction() as unit:
            if route.inbox and not await unit.first_time(route.consumer, msg.body):
                return CommandReply(ok=True, message="already done (the same command)") if route.answers else None
            with context.scope("uow", unit):
                return await call_next(msg)

    async def consume(self, route: Route, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any],
                      context: Any) -> None:
        """Returning acks; NackMessage asks for a later delivery."""
        delivery = delivery_of(msg)  # type: ignore[arg-type]
        if delivery.attempt > self.retry.attempts:
            return await self.dead_letter(route, delivery, f"delivered {delivery.attempt} times, more than the "
                                          f"{self.retry.attempts} attempts allowed: a process stopped during the last")
        try:
            route.expect(msg.body)
        except ValidationError as exc:
            return await self.dead_letter(route, delivery, f"invalid {route.payload.__name__}: {describe(exc)}")
        try:
            await self.run(route, call_next, msg, context)
        except HandlerException:  # the handler settled the message itself (faststream's AckMessage and kin)
            raise
        except Refused as exc:
            await self.dead_letter(route, delivery, str(exc))
        except NotYetKnown as exc:
            self.again(route, delivery, exc, self.retry.waits, Retry.backoff_s(delivery.attempt, cap_s=60.0))
            await self.dead_letter(route, delivery, f"still unknown after {delivery.attempt} tries: {exc}")
        except Exception as exc:  # a failure that may pass: tried again with backoff, then dead-lettered
            log.warning("%s failed on %s (attempt %d)", route.consumer, delivery.message_id, delivery.attempt,
                        exc_info=exc)
            self.again(route, delivery, exc, self.retry.failures, Retry.backoff_s(delivery.attempt))
            await self.dead_letter(route, delivery, f"{type(exc).__name__}: {exc}")

    @staticmethod
    def again(route: Route, delivery: DeliveryInfo, exc: Exception, attempts: int, delay_s: float) -> None:
        """Nack for a later delivery, unless this was the last attempt."""
        if delivery.attempt < attempts:
            log.warning("%s: %s will be delivered again in %.2f s (attempt %d of %d): %s", route.consumer,
                        delivery.message_id, delay_s, delivery.attempt, attempts, exc)
            raise NackMessage(delay=delay_s)

    async def dead_letter(self, route: Route, delivery: DeliveryInfo, error: str) -> None:
        """Record the message and why on `assay.v1.dlq.<consumer>`; the caller then acks it."""
        log.error("dead-lettering %s on %s after %d deliveries: %s", delivery.message_id, delivery.subject,
                  delivery.attempt, error)
        letter = Envelope.wrap(DeadLetter(consumer=route.consumer, subject=delivery.subject,
                                          message_id=delivery.message_id, deliveries=delivery.attempt,
                                          error=error[:4000]), source=self.source)
        assert route.dead_letters is not None, f"{route.consumer} has no dead-letter publisher"
        await route.dead_letters.publish(letter.model_dump_json().encode(), headers={
            "Nats-Msg-Id": f"dlq:{route.consumer}:{delivery.message_id}", "content-type": "application/json"})

    async def answer(self, route: Route, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any],
                     context: Any) -> Payload:
        """A request's reply: what the handler returns, or why nothing was done."""
        try:
            route.expect(msg.body)
        except ValidationError as exc:
            return CommandReply(ok=False, message=f"invalid {route.payload.__name__}: {describe(exc)}")
        try:
            return await self.run(route, call_next, msg, context)  # type: ignore[no-any-return]
        except HandlerException:
            raise
        except NotYetKnown as exc:
            return CommandReply(ok=False, message=str(exc), retry=True)
        except Refused as exc:
            return CommandReply(ok=False, message=str(exc))
        except Conflict:
            return CommandReply(ok=False, message="a concurrent change conflicted; retrying", retry=True)
        except Exception:
            log.exception("%s failed to handle %s", route.consumer, route.payload.__name__)
            return CommandReply(ok=False, message=f"{route.consumer} failed to handle it; nothing was changed; "
                                "see the service log")


class _Scope(BaseMiddleware):
    def __init__(self, msg: Any, /, *, context: Any, edge: Edge) -> None:
        super().__init__(msg, context=context)
        self.edge = edge

    async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]) -> Any:
        route = self.edge.routes[self.context.get_local("handler_").subject.template]
        if route.answers:
            return await self.edge.answer(route, call_next, msg, self.context)
        return await self.edge.consume(route, call_next, msg, self.context)
