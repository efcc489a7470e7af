"""The leaderboard's tables: what it learned from events (benchmarks, jobs) and the results it accepted."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, LargeBinary
from sqlmodel import Field, SQLModel

from contracts.envelope import utcnow


class KnownBenchmark(SQLModel, table=True):
    __tablename__ = "lb_benchmark"
    benchmark_id: str = Field(primary_key=True, max_length=64)
    owner_id: str = Field(max_length=64)
    spec: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))  # a BenchmarkSpec


class ParkedResult(SQLModel, table=True):
    """A result about something not known here yet (its site's key, its benchmark): kept, acknowledged, and judged
    when what it waits for arrives, or rejected once it has waited too long. It never holds the consumer."""

    __tablename__ = "lb_parked"
    digest: str = Field(primary_key=True, max_length=64)
    waiting_for: str = Field(index=True, max_length=200)
    subject: str = Field(max_length=256)
    body: bytes
    parked_at: datetime = Field(default_factory=utcnow, index=True)


class AcceptedResult(SQLModel, table=True):
    """One per job (the key): a second result for a job, even from a replica racing this one, cannot be stored."""

    __tablename__ = "lb_result"
    job_id: str = Field(primary_key=True, max_length=64)
    message_id: str = Field(unique=True, max_length=128)
    benchmark_id: str = Field(index=True, max_length=64)
    model_id: str = Field(max_length=64)
    dataset_id: str = Field(max_length=64)
    site_id: str = Field(max_length=64)
    model_owner: str | None = Field(default=None, max_length=64)
    metrics: dict[str, float] = Field(sa_column=Column(JSON, nullable=False))
    case_count: int
    metrics_hash: str = Field(max_length=80)
    worker_id: str = Field(max_length=200)
    finished_at: datetime
    accepted_at: datetime = Field(default_factory=utcnow, index=True)
    # the site's Evidence: its aggregates as JSON, its replicates as float64 rows (one per metric, in `replicated`
    # order), which a board of thousands of results reads back in milliseconds
    aggregates: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    replicated: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    replicates: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))


class PairConsent(SQLModel, table=True):
    """The last revocation and the last approval of a pair the approval service announced (by its clock)."""

    __tablename__ = "lb_consent"
    benchmark_id: str = Field(primary_key=True, max_length=64)
    kind: str = Field(primary_key=True, max_length=16)
    entity_id: str = Field(primary_key=True, max_length=64)
    revoked_at: datetime | None = None
    revoked_by: str = Field(default="", max_length=64)
    reason: str = Field(default="", max_length=2000)
    approved_at: datetime | None = None


class Archived(SQLModel, table=True):
    """A benchmark, model or dataset its owner archived, as the registry announced it."""

    __tablename__ = "lb_archived"
    kind: str = Field(primary_key=True, max_length=16)
    entity_id: str = Field(primary_key=True, max_length=64)
    at: datetime
    by: str = Field(max_length=64)
    reason: str = Field(default="", max_length=2000)


class BoardDue(SQLModel, table=True):
    """A board that changed and is not announced yet: the models whose results changed, in the order they did. It is
    written with the result that changed the board, so an announcement is owed even if the process dies before
    making it; the announcement's transaction removes it (`leaderboard.announce`)."""

    __tablename__ = "lb_board_due"
    benchmark_id: str = Field(primary_key=True, max_length=64)
    models: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    since: datetime = Field(default_factory=utcnow)


TABLES = [KnownBenchmark.__table__, ParkedResult.__table__, AcceptedResult.__table__,  # type: ignore[attr-defined]
          PairConsent.__table__, Archived.__table__, BoardDue.__table__]  # type: ignore[attr-defined]
