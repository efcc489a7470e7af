"""The operator's replay of a dead letter (`assay dead-letters replay`), one mechanism for every service: the service
that owns the consumer reads the message back from its stream by sequence and hands it to that consumer's own
subscriber, behind the consumer's own edge (the signature checks, the inbox, the unit of work and its outbox), so it
is processed once however often it is replayed. What became of it is announced (DeadLetterReplayed), for the
scheduler to keep with the letter. Only the operator may; a service that refused the operator's own registration
takes that registration, once checked to be the registry's, as its word on the operator's key."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from faststream import Context
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from contracts import messages as m
from contracts import subjects
from contracts.envelope import Envelope
from contracts.signing import SignatureError, verify
from service_kit.edge import Checks, NotYetKnown, Refused, Replay

if TYPE_CHECKING:
    from faststream.nats import NatsBroker

    from service_kit.work import Units

log = logging.getLogger(__name__)
READ_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Stored:
    """A message as its stream keeps it."""

    subject: str
    data: bytes
    headers: dict[str, str]


class Streams(Protocol):
    """Where a service reads a message back by its stream and sequence: None when the stream holds it no more."""

    async def read(self, stream: str, sequence: int) -> Stored | None: ...


class JetStreamMessages:
    """The stream's own copy, by `$JS.API.STREAM.MSG.GET.<stream>` on the service's connection."""

    def __init__(self, broker: NatsBroker) -> None:
        self._broker = broker

    async def read(self, stream: str, sequence: int) -> Stored | None:
        js = self._broker.config.connection_state.connection.jetstream(timeout=READ_TIMEOUT_S)
        try:
            raw = await js.get_msg(stream, sequence)
        except NotFoundError:
            return None
        except TimeoutError:  # a request the server does not let through is never answered: say which right it needs
            raise Refused(f"stream {stream} did not give message {sequence} within {READ_TIMEOUT_S:.0f} s; the "
                          f"service's NATS user may read it only if it may publish $JS.API.STREAM.MSG.GET.{stream}"
                          ) from None
        return Stored(raw.subject or "", raw.data or b"", dict(raw.headers or {}))


@dataclass
class FakeStreams:
    """Streams in memory (the test broker has none): what was delivered, by stream and sequence."""

    messages: dict[tuple[str, int], Stored] = field(default_factory=dict)

    def keep(self, stream: str, subject: str, data: bytes, headers: dict[str, str]) -> int:
        """Keep a message as its stream would, at the stream's next sequence, which is returned."""
        sequence = 1 + max((seq for name, seq in self.messages if name == stream), default=0)
        self.messages[(stream, sequence)] = Stored(subject, data, headers)
        return sequence

    async def read(self, stream: str, sequence: int) -> Stored | None:
        return self.messages.get((stream, sequence))


@dataclass(frozen=True)
class Replayable:
    """A durable consumer of the service, as a replay reaches it."""

    consumer: str     # the durable's name
    address: str      # the subject (or pattern) it reads
    stream: str
    subscriber: Any   # faststream's subscriber: its middlewares and its edge run a replay as they run a delivery


class Replays:
    """This service's consumers whose dead letters the operator may replay, and what a replay needs: the service's
    units of work (who asks, and what it announces) and where its streams are read (`streams`, a fake in tests)."""

    def __init__(self, owner: str, units: Units, streams: Streams, trust: Checks) -> None:
        self.owner, self.units, self.streams, self.trust = owner, units, streams, trust
        self.consumers: dict[str, Replayable] = {}

    def add(self, consumer: Replayable) -> None:
        self.consumers[consumer.consumer] = consumer

    async def replay(self, command: Envelope[m.ReplayDeadLetter]) -> m.CommandReply:
        """Run the letter's message again through its consumer (the operator only), once the message read back is
        checked to be the letter's; bad input is refused and changes nothing."""
        from service_kit.actors import authenticate  # the database's: a site imports this module without one

        asked, operator = command.data, None
        async with self.units.transaction() as unit:
            with contextlib.suppress(NotYetKnown):  # a key it does not know: perhaps the operator's, see `vouched`
                operator = (await authenticate(unit.session, command, m.Role.OPERATOR)).actor_id
        if operator is None:
            operator = await self.vouched(command)
        target = self.consumer(asked)
        stored = await self.streams.read(asked.stream, asked.sequence)
        check(asked, target, stored)
        assert stored is not None
        replay = Replay.of(stored.subject, stored.data, stored.headers)
        await target.subscriber.process_message(replay)
        outcome = replay.outcome or m.ReplayOutcome.FAILED
        reason = replay.reason if replay.outcome else f"{target.consumer} did not take the message"
        async with self.units.transaction() as unit:
            unit.emit(m.DeadLetterReplayed(service=self.owner, letter_id=asked.letter_id, consumer=asked.consumer,
                                           stream=asked.stream, sequence=asked.sequence, message_id=asked.message_id,
                                           outcome=outcome, reason=reason[:4000], replayed_by=operator))
        log.info("%s replayed %s (%s #%d) of letter %s for %s: %s %s", self.owner, asked.message_id, asked.stream,
                 asked.sequence, asked.letter_id, operator, outcome.value, reason)
        return said(asked, outcome, reason)

    async def vouched(self, command: Envelope[m.ReplayDeadLetter]) -> str:
        """The operator, where this service has not learnt of it because it refused the operator's own registration
        (given a stale key of the registry, say): the letter's message, that registration, checked to be the
        registry's, vouches for the key that signed the replay. Any other signer it does not know is refused."""
        asked, signature = command.data, command.signature
        key = signature.key_id if signature is not None else "(none)"
        unknown = Refused(f"key {key} belongs to no actor {self.owner} knows; if it is the operator's, {self.owner} "
                          f"has not learnt of the operator (its registration may be a letter of "
                          f"{self.owner}-actor-registered: replay that one first)")
        stored = await self.streams.read(asked.stream, asked.sequence)  # a stream it may not read says so
        try:
            check(asked, self.consumer(asked), stored)
            registered = Envelope[m.ActorRegistered].model_validate_json(stored.data if stored else b"")
            self.trust.check(registered)
            said = registered.data
            if said.role is not m.Role.OPERATOR or said.key_id != key:
                raise unknown
            verify(command, said.public_key)
        except (Refused, ValidationError, SignatureError):
            raise unknown from None
        return said.actor_id

    def consumer(self, asked: m.ReplayDeadLetter) -> Replayable:
        """The consumer the letter names, if it is this service's and reads the letter's stream."""
        if subjects.site_of_queue(asked.consumer) is not None:  # its jobs run again as new rounds, never replayed
            raise Refused(f"{asked.consumer} is a site's job queue, whose letters are not replayed: run the job "
                          f"again with `assay job retry {asked.message_id} --as operator`")
        if (target := self.consumers.get(asked.consumer)) is None:
            mine = ", ".join(sorted(self.consumers)) or "none"
            raise Refused(f"{asked.consumer} is not a consumer of {self.owner} (its consumers: {mine}); the service "
                          "that owns a consumer replays its letters")
        if target.stream != asked.stream:
            raise Refused(f"{target.consumer} reads stream {target.stream}, not {asked.stream}: the letter does not "
                          "say where its message is")
        return target


def check(asked: m.ReplayDeadLetter, target: Replayable, stored: Stored | None) -> None:
    """Refused unless `stored` is the letter's message: still in its stream, on a subject its consumer reads, with
    the letter's message id."""
    where = f"message {asked.sequence} of stream {asked.stream}"
    if stored is None:
        raise Refused(f"{where} is no longer there (the stream's limits dropped it, or it never was): letter "
                      f"{asked.letter_id} cannot be replayed; nothing was changed")
    if not subjects.matches(target.address, stored.subject):
        raise Refused(f"{where} is on {stored.subject}, which {target.consumer} does not read: it is not the "
                      f"letter's message; nothing was changed")
    found = stored.headers.get("Nats-Msg-Id")
    if found != asked.message_id:
        raise Refused(f"{where} is message {found or '(without a Nats-Msg-Id)'}, not the letter's "
                      f"{asked.message_id}; nothing was changed")


def said(asked: m.ReplayDeadLetter, outcome: m.ReplayOutcome, reason: str) -> m.CommandReply:
    """The operator's answer: what became of the message, and what to do next."""
    what = (f"{asked.consumer}: message {asked.message_id} ({asked.stream} #{asked.sequence}) of letter "
            f"{asked.letter_id}")
    if outcome is m.ReplayOutcome.PROCESSED:
        return m.CommandReply(ok=True, message=f"{what} was processed; the letter is marked replayed")
    if outcome is m.ReplayOutcome.ALREADY_PROCESSED:
        return m.CommandReply(ok=True, message=f"{what} was processed already (its consumer's inbox has it); nothing "
                                               "was done again")
    return m.CommandReply(ok=False, message=f"{what} failed again: {reason}; nothing was changed; fix that, then "
                                            "replay it again")


ReplaysDep = Annotated[Replays, Context("replays")]


async def replay_dead_letter(command: Envelope[m.ReplayDeadLetter], replays: ReplaysDep) -> m.CommandReply:
    """The operator's replay of one of this service's consumers' dead letters (every service answers it)."""
    return await replays.replay(command)
