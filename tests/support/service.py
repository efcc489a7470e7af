"""One app under faststream's TestNatsBroker: deliver messages, ask requests, read what it published and stored.

No nats-server: the test broker hands each publish to the subscribers at once and records what the app's declared
publishers sent on their `.mock`. It does not redeliver, nack or dedupe; that is tested against a real server.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from faststream import FastStream, TestApp
from faststream.nats import NatsBroker, TestNatsBroker
from pydantic import BaseModel
from sqlalchemy import text
from sqlmodel import SQLModel

from contracts import subjects
from contracts.catalog import EVENT_SUBJECTS, REQUEST_SUBJECTS, SERVICES, event_subject, publisher_of
from contracts.envelope import Envelope, Payload
from contracts.messages import ActorRegistered, DeadLetter, Role
from contracts.signing import KeyPair
from service_kit.app import ServiceApp
from service_kit.replay import FakeStreams


@dataclass
class Actors:
    """Actors with keys: what the registry would announce about them, and the commands they sign."""

    keys: dict[str, KeyPair] = field(default_factory=dict)

    def key(self, name: str) -> KeyPair:
        return self.keys.setdefault(name, KeyPair.generate())

    def registered(self, name: str, role: Role) -> ActorRegistered:
        key = self.key(name)
        return ActorRegistered(actor_id=name, role=role, public_key=key.public_key, key_id=key.key_id,
                               display_name=name)

    def sign(self, name: str, payload: Payload) -> Envelope[Any]:
        return self.key(name).sign(Envelope.wrap(payload, source=f"actor:{name}"))

    def announce(self, payload: Payload) -> Envelope[Any]:
        """An event as the one service that publishes it signs it."""
        service = publisher_of(payload)
        assert service is not None, f"{type(payload).__name__} is no event"
        return self.key(service).sign(Envelope.wrap(payload, source=f"service:{service}"))

    def save(self, name: str, folder: Path) -> Path:
        """The key of `name` as a file, as a service or site is given it."""
        path = folder / f"{name}.key"
        if not path.exists():
            self.key(name).save(path)
        return path

    def service_settings(self, name: str, folder: Path) -> dict[str, Any]:
        """What every service is configured with: its own key, and every service's public key."""
        return {"key_file": self.save(name, folder),
                "service_keys": {service: self.key(service).public_key for service in SERVICES}}


@dataclass
class Harness:
    app: FastStream
    broker: NatsBroker
    actors: Actors
    streams: FakeStreams = field(default_factory=FakeStreams)  # what was delivered, where a replay reads it back

    async def deliver(self, subject: str, message: Envelope[Any] | bytes, *, msg_id: str | None = None,
                      attempt: int = 1, owed: bool = False) -> None:
        """Publish as JetStream would deliver it for the `attempt`-th time (its ack subject carries the count and its
        sequence in the stream, which keeps it), then let the app's relay publish what the handler staged; with
        `owed`, what the app does a short while later (the leaderboard's announcements) stays owed."""
        body = message if isinstance(message, bytes) else message.model_dump_json().encode()
        stream, headers = subjects.stream_of(subject), {"Nats-Msg-Id": msg_id or str(uuid.uuid4())}
        sequence = self.streams.keep(stream, subject, body, headers)
        await self.broker.publish(body, subject, stream=stream, headers=headers,
                                  reply_to=f"$JS.ACK.{stream}.test.{attempt}.{sequence}.{sequence}.0.0")
        await self.settle(owed=owed)

    async def learn(self, payload: Payload) -> Envelope[Any]:
        """Deliver an event as the service that owns it publishes it: signed with its key."""
        envelope = self.actors.announce(payload)
        await self.deliver(event_subject(payload), envelope)
        return envelope

    async def ask(self, request: Envelope[Any] | bytes, payload: type[Payload] | None = None, *,
                  subject: str | None = None) -> dict[str, Any]:
        """A command's or query's reply, as the CLI receives it (on `subject`, for one every service answers)."""
        if isinstance(request, bytes):
            assert payload is not None or subject is not None, "name the request type of a raw body"
            body, subject = request, subject or REQUEST_SUBJECTS[payload]  # type: ignore[index]
        else:
            body, subject = request.model_dump_json().encode(), subject or REQUEST_SUBJECTS[type(request.data)]
        reply = await self.broker.request(body, subject, timeout=30)  # a loaded machine is slow, never wrong
        await self.settle()
        return dict(json.loads(reply.body))

    async def settle(self, *, owed: bool = False) -> None:
        """What the app owes is done now (what it would do a moment later: the leaderboard's announcements), unless
        it stays `owed`, and what it staged is published."""
        if isinstance(self.app, ServiceApp):
            for deferred in self.app.deferred if not owed else ():
                await deferred.settle()
            await self.app.relay.flush()

    def published(self, subject: str) -> list[dict[str, Any]]:
        """What the publishers declared for `subject` sent (the envelopes, decoded); a pattern names several. The test
        broker records a message in the mock of every publisher whose subject a subscriber's wildcard takes (the
        scheduler reads every dead letter): each envelope is counted once."""
        sent, seen = [], set()
        for publisher in self.broker.publishers:
            if not (subjects.matches(subject, publisher.subject.template)
                    or subjects.matches(publisher.subject.template, subject)):
                continue
            for call in publisher.mock.call_args_list:
                body = call.args[0]
                if isinstance(body, BaseModel):  # decoded by a subscriber's edge (`checked_body`): as sent
                    body = body.model_dump(mode="json")
                key = body.get("id") if isinstance(body, dict) else None
                if key is None or key not in seen:
                    seen.add(key)
                    sent.append(body)
        return sent

    def events(self, kind: type[Payload]) -> list[Any]:
        """The payloads of the events of `kind` the app published, in order."""
        return [kind.model_validate(sent["data"]) for sent in self.published(EVENT_SUBJECTS[kind])
                if sent["type"] == kind.TYPE]

    def dead_letters(self) -> list[DeadLetter]:
        return [DeadLetter.model_validate(sent["data"]) for sent in self.published(subjects.DEAD_LETTERS_ALL)]

    def sent(self) -> int:
        """How many messages the app has published in all (each envelope once: see `published`)."""
        return len(self.published(">"))

    async def state(self) -> dict[str, list[tuple[Any, ...]]]:
        """What handlers change: every row but the inbox's (which remembers what was seen, refusals too) and the dead
        letters the scheduler keeps for the operator."""
        return {table: rows for table, rows in (await self.stored()).items()
                if table not in ("inbox", "sched_dead_letter")}  # the record of what was refused is no change

    async def stored(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table the app owns: what a refusal must leave as it was."""
        assert isinstance(self.app, ServiceApp)
        async with self.app.db.engine.connect() as conn:
            names = await conn.run_sync(lambda sync: sync.dialect.get_table_names(sync))
            return {name: sorted(map(tuple, (await conn.execute(text(f'SELECT * FROM "{name}"'))).all()), key=repr)
                    for name in names if name in SQLModel.metadata.tables}


@asynccontextmanager
async def running(app: FastStream, actors: Actors) -> AsyncIterator[Harness]:
    """The app started under the test broker: its tables made, its start hooks run, its relay going."""
    async with TestNatsBroker(app.broker, connect_only=True) as broker, TestApp(app):
        harness = Harness(app, broker, actors)
        if isinstance(app, ServiceApp):  # the test broker keeps no stream: a replay reads what the harness delivered
            app.replays.streams = harness.streams
        await harness.settle()
        yield harness
