"""The actors a service knows (learned from ActorRegistered events) and the check of a signed command."""

from __future__ import annotations

from datetime import datetime
from typing import TypeVar

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from contracts.envelope import Envelope, Payload
from contracts.messages import ActorKeyRotated, ActorRegistered, ActorSuspended, Role
from contracts.signing import SignatureError, verify
from service_kit.edge import NotYetKnown, Refused

P = TypeVar("P", bound=Payload)


class KnownActor(SQLModel, table=True):
    __tablename__ = "known_actor"
    actor_id: str = Field(primary_key=True, max_length=64)
    role: str = Field(max_length=32)
    public_key: str = Field(max_length=64)
    key_id: str = Field(unique=True, max_length=64)
    display_name: str = Field(max_length=200)
    also: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))  # more roles it holds
    organisation: str | None = Field(default=None, max_length=64)
    suspended: str | None = Field(default=None, max_length=2000)  # the operator's reason: nothing it signs counts
    suspended_at: datetime | None = None


class RetiredKey(SQLModel, table=True):
    """A key an actor replaced: what it signed before `retired_at` stays valid; nothing after."""

    __tablename__ = "retired_key"
    key_id: str = Field(primary_key=True, max_length=64)
    actor_id: str = Field(max_length=64)
    public_key: str = Field(max_length=64)
    retired_at: datetime


async def remember_rotation(session: AsyncSession, event: ActorKeyRotated, at: datetime) -> None:
    """The actor signs with its new key from `at`; its old one is kept, retired, to check what it signed before."""
    actor = await session.get(KnownActor, event.actor_id)
    if actor is None:
        raise NotYetKnown(f"actor {event.actor_id}'s key rotated before its registration arrived")
    if actor.key_id != event.previous_key_id:
        return  # this rotation (or a later one) is already here
    session.add(RetiredKey(key_id=actor.key_id, actor_id=actor.actor_id, public_key=actor.public_key, retired_at=at))
    actor.public_key, actor.key_id = event.public_key, event.key_id
    session.add(actor)


async def remember_actor(session: AsyncSession, event: ActorRegistered) -> None:
    if await session.get(KnownActor, event.actor_id) is None:
        session.add(KnownActor(**event.model_dump(mode="json")))


async def suspended_ids(session: AsyncSession) -> set[str]:
    """The actors the operator suspended: what they sign counts no more, and they get no job."""
    return set((await session.exec(select(KnownActor.actor_id).where(col(KnownActor.suspended).is_not(None)))).all())


async def remember_suspension(session: AsyncSession, event: ActorSuspended, at: datetime) -> KnownActor:
    """The operator suspended an actor; NotYetKnown until its registration has arrived here."""
    actor = await session.get(KnownActor, event.actor_id)
    if actor is None:
        raise NotYetKnown(f"actor {event.actor_id} suspended before its registration arrived")
    if actor.suspended is None:
        actor.suspended, actor.suspended_at = event.reason, at
        session.add(actor)
    return actor


async def authenticate(session: AsyncSession, envelope: Envelope[P], *roles: Role) -> KnownActor:
    """The actor who signed `envelope`, after checking the signature and that the actor has one of `roles`."""
    if envelope.signature is None:
        raise Refused("the command is not signed; sign it with your actor key (assay ... --as NAME)")
    key_id = envelope.signature.key_id
    actor = (await session.exec(select(KnownActor).where(KnownActor.key_id == key_id))).first()
    if actor is None and (retired := await session.get(RetiredKey, key_id)) is not None:
        raise Refused(f"key {key_id} of actor {retired.actor_id} was retired at "
                      f"{retired.retired_at.isoformat(timespec='seconds')}; sign with its new key")
    if actor is None:
        raise NotYetKnown(f"key {key_id} belongs to no registered actor; ask the operator to register it")
    try:
        verify(envelope, actor.public_key)
    except SignatureError as exc:
        raise Refused(f"signature check failed: {exc}") from exc
    if actor.suspended is not None:
        raise Refused(f"actor {actor.actor_id} is suspended by the operator: {actor.suspended}")
    if roles and not {actor.role, *actor.also} & {r.value for r in roles}:
        allowed = ", ".join(r.value for r in roles)
        held = f"role {actor.role}" if not actor.also else f"roles {', '.join([actor.role, *actor.also])}"
        raise Refused(f"actor {actor.actor_id} has {held}; this command needs {allowed}")
    return actor
