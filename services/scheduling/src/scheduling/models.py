"""Scheduling tables: what it knows of benchmarks, models, datasets and approvals, and the jobs it planned."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Column, DateTime
from sqlmodel import Field, SQLModel

from contracts.envelope import utcnow


class Benchmark(SQLModel, table=True):
    __tablename__ = "sched_benchmark"
    benchmark_id: str = Field(primary_key=True)
    spec: dict = Field(sa_column=Column(JSON))  # type: ignore[type-arg]
    owner_id: str | None = None  # the reference model's owner, as a site's policy sees it
    approved: bool = False
    archived: bool = False  # never planned again


class Model(SQLModel, table=True):
    __tablename__ = "sched_model"
    model_id: str = Field(primary_key=True)
    digest: str
    owner_id: str | None = None
    archive: dict | None = Field(default=None, sa_column=Column(JSON))  # type: ignore[type-arg]  # where it was pushed
    archived: bool = False


class Dataset(SQLModel, table=True):
    __tablename__ = "sched_dataset"
    dataset_id: str = Field(primary_key=True)
    site_id: str
    benchmark_id: str
    content_hash: str
    case_count: int
    archived: bool = False


class Member(SQLModel, table=True):
    """An approved association."""

    __tablename__ = "sched_member"
    benchmark_id: str = Field(primary_key=True)
    kind: str = Field(primary_key=True)
    entity_id: str = Field(primary_key=True)


class Job(SQLModel, table=True):
    __tablename__ = "sched_job"
    job_id: str = Field(primary_key=True)
    benchmark_id: str = Field(index=True)
    model_id: str
    dataset_id: str
    site_id: str = Field(index=True)
    status: str = "SCHEDULED"
    reason: str = ""  # why it is in this state, as its site reported it
    attempts: int = 0  # the attempt its site's last report named
    retried_as: str | None = None  # the round that runs it again, once an owner retried it
    from_letter: bool = False  # its state is a dead letter's word: the site's own report, however late, replaces it
    updated_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True)))
    spec: dict = Field(default_factory=dict, sa_column=Column(JSON))  # type: ignore[type-arg]  # the JobSpec sent


class ImageKey(SQLModel, table=True):
    """The key of a private image, sealed to one site by the image's owner."""

    __tablename__ = "sched_image_key"
    image: str = Field(primary_key=True)
    site_id: str = Field(primary_key=True)
    sealed_key: str
    granted_by: str


class DeadLetter(SQLModel, table=True):
    """A message a consumer gave up on, as its DeadLetter said: kept for the operator (`assay dead-letters`)."""

    __tablename__ = "sched_dead_letter"
    letter_id: str = Field(primary_key=True)
    consumer: str = Field(index=True)
    subject: str
    message_id: str
    deliveries: int
    error: str
    at: datetime = Field(sa_column=Column(DateTime(timezone=True)))
    stream: str | None = None  # where its message is kept, for a replay (a letter of an outbox has none)
    sequence: int | None = None


class LetterReplay(SQLModel, table=True):
    """One replay of a dead letter's message, as the service that owns its consumer said (DeadLetterReplayed): kept
    by consumer and message, so it stands by every letter of that message."""

    __tablename__ = "sched_letter_replay"
    replay_id: str = Field(primary_key=True)  # the event's id
    consumer: str = Field(index=True)
    message_id: str
    outcome: str
    reason: str
    replayed_by: str
    at: datetime = Field(sa_column=Column(DateTime(timezone=True)))


TABLES = [t.__table__ for t in (Benchmark, Model, Dataset, Member, Job, ImageKey, DeadLetter,  # type: ignore[attr-defined]
                                LetterReplay)]
