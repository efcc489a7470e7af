"""The one edge between the bus and every handler, in the services and at the sites: what a delivery is, and what
becomes of a message whose handler cannot do its work.

A handler is a typed function of its envelope and its dependencies (`UnitOfWork`, `Delivery`, ...). `Edge` is the
faststream middleware around all of them: it checks the message against the handler's payload type, runs the
handler inside the unit of work (the inbox check and the transaction), and turns the outcome into an ack, a nack
with a delay, a dead letter or a command's reply (or, for a dead letter's message the operator replays, what became
of it). Nothing is dropped silently and a failure always says why.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Protocol

from faststream import BaseMiddleware, Depends
from faststream.exceptions import NackMessage
from faststream.message import StreamMessage
from faststream.nats.annotations import NatsMessage
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError
from opentelemetry import context as otel_context
from pydantic import ValidationError

from contracts.envelope import Envelope, Payload, describe, utcnow
from contracts.messages import CommandReply, ReplayOutcome
from service_kit.spans import annotate, failed
from service_kit.together import ALONE, Arrival, Together

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
    stream: str | None = None    # the stream that keeps it, and its sequence there: where a replay reads it back
    sequence: int | None = None


def delivery_of(message: NatsMessage) -> DeliveryInfo:
    raw = message.raw_message
    try:
        metadata = raw.metadata
        attempt, stream, sequence = metadata.num_delivered or 1, metadata.stream, metadata.sequence.stream
    except NotJSMessageError:  # a request on core NATS; a test broker's message without a JetStream ack subject; a
        attempt, stream, sequence = 1, None, None  # replay
    return DeliveryInfo(attempt, raw.subject, message.headers.get("Nats-Msg-Id", message.message_id), stream, sequence)


Delivery = Annotated[DeliveryInfo, Depends(delivery_of)]


@dataclass(frozen=True)
class Retry:
    """How often a consumer tries: `failures` times for a handler that fails (waiting `base_s`, then twice as long
    each time, up to `cap_s`), `waits` times for a message about something not known yet (up to `wait_cap_s`). The
    server allows one delivery more than that, so a process that dies during the last attempt is followed by one
    that dead-letters the message instead of the server dropping it.
    """

    failures: int = 10
    waits: int = 1000
    base_s: float = 0.25
    cap_s: float = 15.0
    wait_cap_s: float = 60.0

    @property
    def attempts(self) -> int:
        return max(self.failures, self.waits)

    @property
    def max_deliver(self) -> int:
        return self.attempts + 1

    def delay_s(self, attempt: int, *, waiting: bool = False) -> float:
        return min(self.base_s * 2 ** (min(attempt, 20) - 1), self.wait_cap_s if waiting else self.cap_s)


class Inbox(Protocol):
    async def first_time(self, consumer: str, body: bytes) -> bool: ...

    async def first_times(self, consumer: str, bodies: Sequence[bytes]) -> list[bool]: ...

    async def seen(self, consumer: str, body: bytes) -> bool: ...


class Transactions(Protocol):
    """Where the edge opens a handler's unit of work: a transaction that commits when the handler returns."""

    def transaction(self) -> AbstractAsyncContextManager[Inbox]: ...


class Checks(Protocol):
    """Who may have sent a message (`service_kit.trust.Trust`): Refused when it is not who it must be."""

    def check(self, envelope: Envelope[Payload]) -> None: ...


class DeadLetters(Protocol):
    """Where what a consumer gives up on goes: `assay.v1.dlq.<consumer>`, with the reason."""

    async def dead_letter(self, consumer: str, subject: str, message_id: str, deliveries: int, error: str, *,
                          stream: str | None = None, sequence: int | None = None) -> None: ...


class Replay(Msg):
    """A dead letter's message read back from its stream for the operator, handed to its consumer's subscriber as if
    delivered: the edge runs it as it runs a delivery and says here what became of it. It is no delivery of the
    server's, so nothing acknowledges it, delivers it again later or dead-letters it again."""

    outcome: ReplayOutcome | None = None
    reason: str = ""

    @classmethod
    def of(cls, subject: str, data: bytes, headers: dict[str, str]) -> Replay:
        """The message as its stream keeps it; acknowledged already, so faststream's acknowledgement does nothing."""
        return cls(_client=None, subject=subject, data=data, headers=headers, _ackd=True)  # type: ignore[arg-type]

    def settle(self, outcome: ReplayOutcome, reason: str = "") -> None:
        self.outcome, self.reason = outcome, reason


DUPLICATE = object()  # what the edge's run gives for a message its consumer processed already


@dataclass(frozen=True)
class Route:
    """One subscriber as the edge sees it: what it expects, and where it puts what it gives up on."""

    consumer: str                   # the durable's name, or the service that answers a request
    payload: type[Payload]
    answers: bool = False           # a request: every outcome is a reply
    inbox: bool = True              # False for queries, which change nothing
    unit: bool = True               # False: the handler opens its own units of work (a replay runs its consumer's
    # handler in the consumer's own, and the consumer's inbox, not the command's, makes it happen once)

    def expect(self, body: bytes) -> Envelope[Payload]:
        """The envelope in `body`, or ValidationError unless it is one of this route's payload. faststream validates
        the handler's arguments again; checking here first tells a malformed message from a handler's own error."""
        return Envelope[self.payload].model_validate_json(body)  # type: ignore[name-defined, no-any-return]

    @property
    def refusals(self) -> str:
        """Where the commands it refused are remembered, so none is applied later than it was first seen."""
        return f"{self.consumer}-refused"


CHECKED = "assay_checked"  # where a message keeps its envelope once the edge has checked it


async def checked_body(msg: StreamMessage[Any], decode: Callable[[StreamMessage[Any]], Awaitable[Any]]) -> Any:
    """Every subscriber's decoder: the envelope the edge validated from this very body (the handler's argument then
    passes as it is: an instance of its type), else faststream's own decoding."""
    envelope = msg.__dict__.get(CHECKED)
    return envelope if envelope is not None else await decode(msg)


@dataclass(frozen=True)
class Edge:
    """The middleware of one subscriber (its router's): `units` is None where there is no database (a site).

    Handlers never settle a message themselves: whatever they raise is an outcome the edge decides.
    """

    route: Route
    units: Transactions | None
    retry: Retry
    letters: DeadLetters
    trust: Checks | None = None
    together: Together | None = None  # the consumer's handler has a batch form: what one fetch brings goes together

    def __call__(self, msg: Any, /, *, context: Any) -> BaseMiddleware:
        return _Scope(msg, context=context, edge=self)

    def expect(self, msg: StreamMessage[Any]) -> Envelope[Payload]:
        """The route's envelope in the message (ValidationError if it is none), kept with the message for the handler
        (`checked_body`): a body is parsed and validated once, not again for the handler's arguments."""
        envelope = self.route.expect(msg.body)
        msg.__dict__[CHECKED] = envelope
        return envelope

    async def run(self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any], context: Any,
                  envelope: Envelope[Payload] | None = None) -> Any:
        """The handler, in its unit of work; the duplicate of a processed message is not handled again (DUPLICATE). A
        handler that opens its own units runs after its command is checked not to have been refused before. A
        delivery (its checked `envelope` given) of a consumer whose handler has a batch form goes with the others of
        its fetch, and alone only where their batch could not take it."""
        if self.units is None:
            return await call_next(msg)
        if self.together is not None and envelope is not None:
            arrival = Arrival(envelope, msg.body, msg.raw_message.subject, otel_context.get_current())
            if (done := await self.together.submit(arrival, context)) is not ALONE:
                return done
        async with self.units.transaction() as unit:
            if self.route.inbox and self.route.unit and not await unit.first_time(self.route.consumer, msg.body):
                return (CommandReply(ok=True, message="already done (the same command)") if self.route.answers
                        else DUPLICATE)
            if self.route.answers and self.route.inbox and await unit.seen(self.route.refusals, msg.body):
                raise Refused("this command was refused when it was first sent, and a command is never applied "
                              "later than it was first seen; sign and send a new one")
            if self.route.unit:
                with context.scope("uow", unit):
                    return await call_next(msg)
        return await call_next(msg)

    async def consume(self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any], context: Any) -> None:
        """Returning acks; NackMessage asks for a later delivery."""
        if isinstance(msg.raw_message, Replay):
            return await self.replay(call_next, msg, context, msg.raw_message)
        delivery, name = delivery_of(msg), self.route.payload.__name__  # type: ignore[arg-type]
        if delivery.attempt > self.retry.attempts:
            return await self.dead_letter(delivery, f"delivered {delivery.attempt} times, more than the "
                                          f"{self.retry.attempts} attempts allowed: a process stopped during the last")
        try:
            envelope = self.expect(msg)
        except ValidationError as exc:
            return await self.dead_letter(delivery, f"invalid {name}: {describe(exc)}")
        annotate(envelope)
        try:
            if self.trust is not None:
                self.trust.check(envelope)  # before anything changes: a forged event is never applied
            await self.run(call_next, msg, context, envelope)
        except Refused as exc:
            await self.dead_letter(delivery, str(exc))
        except NotYetKnown as exc:
            if delivery.attempt < self.retry.waits:
                raise self.later(delivery, exc, self.retry.waits, self.retry.delay_s(delivery.attempt, waiting=True))
            await self.dead_letter(delivery, f"still unknown after {delivery.attempt} tries: {exc}")
        except Exception as exc:  # a failure that may pass: tried again with backoff, then dead-lettered
            if delivery.attempt < self.retry.failures:
                raise self.later(delivery, exc, self.retry.failures, self.retry.delay_s(delivery.attempt), trace=True)
            await self.dead_letter(delivery, f"{type(exc).__name__}: {exc}", exc)

    async def replay(self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any], context: Any,
                     replay: Replay) -> None:
        """A dead letter's message, run again for the operator once its cause is fixed: the same checks, inbox and
        unit of work as any delivery of it, so it is processed once however often it is replayed. What became of it
        is said on `replay`; a failure is the operator's to read, never delivered again nor dead-lettered anew."""
        try:
            envelope = self.expect(msg)
        except ValidationError as exc:
            return self.replayed(replay, f"invalid {self.route.payload.__name__}: {describe(exc)}")
        annotate(envelope)
        try:
            if self.trust is not None:
                self.trust.check(envelope)
            done = await self.run(call_next, msg, context)
        except NotYetKnown as exc:
            self.replayed(replay, f"still unknown: {exc}")
        except Refused as exc:
            self.replayed(replay, str(exc))
        except Exception as exc:
            log.warning("%s: the replay of %s failed again", self.route.consumer, envelope.id, exc_info=exc)
            self.replayed(replay, f"{type(exc).__name__}: {exc}")
        else:
            replay.settle(ReplayOutcome.ALREADY_PROCESSED if done is DUPLICATE else ReplayOutcome.PROCESSED)

    @staticmethod
    def replayed(replay: Replay, reason: str) -> None:
        failed("replay failed", reason)
        replay.settle(ReplayOutcome.FAILED, reason)

    def later(self, delivery: DeliveryInfo, exc: Exception, attempts: int, delay_s: float, *,
              trace: bool = False) -> NackMessage:
        """The nack that has the server deliver the message again after `delay_s`, said in the log once."""
        log.warning("%s: %s will be delivered again in %.2f s (attempt %d of %d): %s", self.route.consumer,
                    delivery.message_id, delay_s, delivery.attempt, attempts, exc, exc_info=exc if trace else None)
        return NackMessage(delay=delay_s)

    async def dead_letter(self, delivery: DeliveryInfo, error: str, exc: Exception | None = None) -> None:
        """Record the message and why on `assay.v1.dlq.<consumer>`; the caller then acks it."""
        log.error("dead-lettering %s on %s after %d deliveries: %s", delivery.message_id, delivery.subject,
                  delivery.attempt, error, exc_info=exc)
        failed("dead-lettered", error)
        await self.letters.dead_letter(self.route.consumer, delivery.subject, delivery.message_id, delivery.attempt,
                                       error, stream=delivery.stream, sequence=delivery.sequence)

    async def answer(self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any], context: Any) -> Payload:
        """A request's reply: what the handler returns, or why nothing was done. A command is refused outside its
        time window, and one that is refused is remembered as such: it can never succeed later."""
        try:
            envelope = self.expect(msg)
        except ValidationError as exc:
            failed("refused", reply := f"invalid {self.route.payload.__name__}: {describe(exc)}")
            return CommandReply(ok=False, message=reply)
        annotate(envelope)
        command = self.route.inbox
        if command and (late := outside_window(envelope, utcnow())):
            return CommandReply(ok=False, message=late)
        try:
            return await self.run(call_next, msg, context)  # type: ignore[no-any-return]
        except NotYetKnown as exc:
            reply = CommandReply(ok=False, message=str(exc), retry=True)
        except Refused as exc:
            reply = CommandReply(ok=False, message=str(exc))
        except Conflict:
            reply = CommandReply(ok=False, message="a concurrent change conflicted; retrying", retry=True)
        except Exception:
            log.exception("%s failed to handle %s", self.route.consumer, self.route.payload.__name__)
            reply = CommandReply(ok=False, message=f"{self.route.consumer} failed to handle it; nothing was changed; "
                                 "see the service log")
        failed("refused", reply.message)
        if command and self.units is not None:
            async with self.units.transaction() as unit:
                await unit.first_time(self.route.refusals, msg.body)
        return reply


COMMAND_WINDOW = timedelta(minutes=5)  # how far a command's signed time may be from this service's clock


def outside_window(envelope: Envelope[Payload], now: datetime) -> str | None:
    """Why a command signed at `envelope.time` is too old (a replay) or too far ahead (a wrong clock), if it is."""
    signed = envelope.time if envelope.time.tzinfo else envelope.time.replace(tzinfo=UTC)
    if abs(now - signed) <= COMMAND_WINDOW:
        return None
    return (f"the command was signed at {signed.isoformat(timespec='seconds')}, more than "
            f"{int(COMMAND_WINDOW.total_seconds() // 60)} minutes from this service's time "
            f"{now.isoformat(timespec='seconds')}: a replay, or a wrong clock; check the clock and send a new command")


class _Scope(BaseMiddleware):
    def __init__(self, msg: Any, /, *, context: Any, edge: Edge) -> None:
        super().__init__(msg, context=context)
        self.edge = edge

    async def consume_scope(self, call_next: Callable[[Any], Awaitable[Any]], msg: StreamMessage[Any]) -> Any:
        if self.edge.route.answers:
            return await self.edge.answer(call_next, msg, self.context)
        return await self.edge.consume(call_next, msg, self.context)
