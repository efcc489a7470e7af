"""The envelope every message travels in: CloudEvents 1.0 attribute names plus a typed payload and a signature."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import ClassVar, Generic, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Payload(BaseModel):
    """Base of every event, command and job body; TYPE is the CloudEvents `type`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    TYPE: ClassVar[str] = ""


class Signature(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key_id: str
    alg: Literal["ed25519"] = "ed25519"
    value: str


D = TypeVar("D", bound=Payload)


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """`moment` with its time zone: SQLite gives back a naive time of what was stored as UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Envelope(BaseModel, Generic[D]):
    model_config = ConfigDict(extra="forbid")

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    source: str = Field(min_length=1, max_length=256)
    type: str
    time: datetime = Field(default_factory=utcnow)
    subject: str | None = None
    datacontenttype: Literal["application/json"] = "application/json"
    data: D
    signature: Signature | None = None

    @model_validator(mode="after")
    def _type_matches_data(self) -> Self:
        expected = type(self.data).TYPE
        if expected and self.type != expected:
            raise ValueError(f"type {self.type!r} does not match the payload, expected {expected!r}")
        return self

    @classmethod
    def wrap(cls, data: D, *, source: str, subject: str | None = None, id: str | None = None) -> Envelope[D]:
        return Envelope[type(data)](  # type: ignore[misc]
            id=id or new_id(), source=source, type=type(data).TYPE, subject=subject, data=data
        )


def describe(exc: ValidationError) -> str:
    """A validation error as `field.path: reason` parts a user can act on."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(message)'}: {err['msg']}" for err in exc.errors())
