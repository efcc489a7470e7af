"""How every service meets the bus: durable idempotent consumers with dead letters, and signed request/reply commands."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from faststream import AckPolicy
from faststream.nats import ConsumerConfig, JStream, NatsBroker, NatsMessage, NatsRouter, PullSub
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel.ext.asyncio.session import AsyncSession

from contracts import subjects
from contracts.envelope import Envelope, Payload
from contracts.streams import PUBLISH_TIMEOUT_S
from contracts.messages import CommandReply, DeadLetter
from service_kit.actors import CommandRejected, NotYetKnown
from service_kit.db import Database
from service_kit.inbox import first_time

log = logging.getLogger(__name__)

MAX_DELIVER = 10   # attempts for a handler that fails
WAIT_DELIVER = 1000  # attempts for a message that refers to what this service has not heard of yet (NotYetKnown)
ACK_WAIT_S = 30.0


def backoff_s(deliveries: int, cap_s: float = 15.0) -> float:
    return min(0.25 * 2 ** (min(deliveries, 20) - 1), cap_s)


def inbox_key(envelope_id: str, body: bytes) -> str:
    """The envelope id and a digest of the bytes: a forged message that reuses a genuine id blocks nothing."""
    return f"{envelope_id}:{hashlib.sha256(body).hexdigest()[:32]}"


def describe(exc: ValidationError) -> str:
    """A validation error as `field.path: reason` lines a user can act on."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(message)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


class Publisher:
    """Publishes a stored message with `Nats-Msg-Id`, so a resend inside the duplicate window is dropped."""

    def __init__(self, broker: NatsBroker) -> None:
        self._broker = broker

    async def __call__(self, subject: str, body: bytes, message_id: str) -> None:
        await self._broker.publish(
            body, subject, stream=subjects.stream_of(subject), headers={"Nats-Msg-Id": message_id},
            timeout=PUBLISH_TIMEOUT_S,
        )


Handler = Callable[[AsyncSession, Envelope[Any]], Awaitable[None]]


def durable_subscriber(
    router: NatsRouter, *, subject: str, durable: str, payload: type[Payload], db: Database,
    publish: Publisher, handle: Handler, max_deliver: int = MAX_DELIVER, ack_wait_s: float = ACK_WAIT_S,
) -> None:
    """Consume `subject` from its stream: validate, skip ids already processed, run `handle` in one transaction.

    A failure is retried with backoff up to `max_deliver` times, then recorded on the dead-letter subject; a
    malformed message is dead-lettered at once. NotYetKnown (an event it refers to is still on its way) is retried
    for much longer. The server allows more deliveries than the code uses, so a process that dies during the last
    attempt is followed by one more, which dead-letters. Nothing is dropped silently.
    """
    model = Envelope[payload]  # type: ignore[valid-type]

    async def dead_letter(msg: NatsMessage, message_id: str, deliveries: int, error: str) -> None:
        log.error("dead-lettering %s on %s after %d deliveries: %s", message_id, subject, deliveries, error)
        letter = Envelope.wrap(DeadLetter(consumer=durable, subject=msg.raw_message.subject, message_id=message_id,
                                          deliveries=deliveries, error=error[:4000]), source=f"service:{durable}")
        await publish(subjects.dead_letter(durable), letter.model_dump_json().encode(), f"dlq:{durable}:{message_id}")

    async def consume(msg: NatsMessage) -> None:
        deliveries = msg.raw_message.metadata.num_delivered or 1
        message_id = msg.headers.get("Nats-Msg-Id", msg.message_id)
        try:
            envelope = model.model_validate_json(msg.body)
        except ValidationError as exc:
            await dead_letter(msg, message_id, deliveries, f"invalid {payload.__name__}: {describe(exc)}")
            return
        try:
            async with db.transaction() as session:
                if await first_time(session, durable, inbox_key(envelope.id, msg.body)):
                    await handle(session, envelope)
        except NotYetKnown as exc:
            if deliveries >= WAIT_DELIVER:
                await dead_letter(msg, envelope.id, deliveries, f"still unknown after {deliveries} tries: {exc}")
                return
            await msg.nack(delay=backoff_s(deliveries, cap_s=60.0))
            raise
        except Exception as exc:
            if deliveries >= max_deliver:
                await dead_letter(msg, envelope.id, deliveries, f"{type(exc).__name__}: {exc}")
                return
            await msg.nack(delay=backoff_s(deliveries))
            raise

    consume.__name__ = durable.replace("-", "_")  # names the subscriber in logs and AsyncAPI
    router.subscriber(
        subject, stream=JStream(subjects.stream_of(subject), declare=False), durable=durable,
        pull_sub=PullSub(batch_size=16, timeout=1.0),
        config=ConsumerConfig(max_deliver=WAIT_DELIVER + 1, ack_wait=ack_wait_s),
        ack_policy=AckPolicy.NACK_ON_ERROR, title=durable,
    )(consume)


CommandHandler = Callable[[AsyncSession, Envelope[Any]], Awaitable[Payload]]


def command_handler(
    router: NatsRouter, *, subject: str, service: str, payload: type[Payload], db: Database,
    handle: CommandHandler, idempotent: bool = True,
) -> None:
    """Answer a request/reply command: bad input or a refused actor gets a clear reply and changes nothing.

    `handle` returns the reply payload (a CommandReply, or a query's answer) or raises CommandRejected;
    NotYetKnown marks a refusal that may pass once this service has caught up with the events (retry=True).
    """
    model = Envelope[payload]  # type: ignore[valid-type]

    async def answer(msg: NatsMessage) -> bytes:
        try:
            envelope = model.model_validate_json(msg.body)
        except ValidationError as exc:
            reply = CommandReply(ok=False, message=f"invalid {payload.__name__}: {describe(exc)}")
            return reply.model_dump_json().encode()
        signer = envelope.signature.key_id if envelope.signature else "unsigned"
        try:
            async with db.transaction() as session:
                # keyed by the signing key too, and rolled back with any refusal (a failed signature check
                # included): nobody can spend another actor's command id
                if idempotent and not await first_time(session, f"{service}-commands", f"{signer}:{envelope.id}"):
                    reply = CommandReply(ok=True, message="already done (same command id)", duplicate=True)
                else:
                    reply = await handle(session, envelope)
        except NotYetKnown as exc:
            reply = CommandReply(ok=False, message=str(exc), retry=True)
        except CommandRejected as exc:
            reply = CommandReply(ok=False, message=str(exc))
        except IntegrityError:  # a concurrent replica or command took the same id: the state is as before
            reply = CommandReply(ok=False, message="a concurrent change conflicted; retrying", retry=True)
        except Exception as exc:
            log.exception("command %s failed", envelope.id)
            reply = CommandReply(ok=False, message=f"{service} failed to handle it ({type(exc).__name__}); "
                                 "nothing was changed; see the service log")
        return reply.model_dump_json().encode()

    answer.__name__ = f"{service}_{payload.__name__}"
    router.subscriber(subject, queue=service, title=f"{service}:{payload.__name__}")(answer)
