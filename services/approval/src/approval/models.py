"""Approval tables: what it has learned of benchmarks and entities, and the associations it decides."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel


class Benchmark(SQLModel, table=True):
    __tablename__ = "appr_benchmark"
    benchmark_id: str = Field(primary_key=True)
    owner_id: str
    approved: bool = False
    rejected: str | None = None  # the operator's reason, until it is approved after all
    archived: bool = False
    checks_models: bool = False  # it has demo data: a model's request runs a compatibility check first


class Entity(SQLModel, table=True):
    __tablename__ = "appr_entity"
    kind: str = Field(primary_key=True)
    entity_id: str = Field(primary_key=True)
    owner_id: str
    benchmark_id: str | None = None  # datasets are prepared for one benchmark
    archived: bool = False


class Association(SQLModel, table=True):
    """Where a pair stands now: its history's last word, kept beside it for the lists."""

    __tablename__ = "appr_association"
    benchmark_id: str = Field(primary_key=True)
    kind: str = Field(primary_key=True)
    entity_id: str = Field(primary_key=True)
    status: str = "REQUESTED"
    requested_by: str
    approved_by: str | None = None


class AssociationEntry(SQLModel, table=True):
    """One step of a pair's history: only ever added, never changed or removed."""

    __tablename__ = "appr_history"
    id: int | None = Field(default=None, primary_key=True)
    benchmark_id: str = Field(index=True)
    kind: str
    entity_id: str
    action: str
    actor: str
    at: datetime
    reason: str = ""
    by_policy: bool = False


class Check(SQLModel, table=True):
    """The check a pair's last request ran, as the scheduler and the leaderboard told it: a new request replaces it."""

    __tablename__ = "appr_check"
    benchmark_id: str = Field(primary_key=True)
    kind: str = Field(primary_key=True)
    entity_id: str = Field(primary_key=True)
    job_id: str = Field(index=True)
    site_id: str
    state: str = "SCHEDULED"  # SCHEDULED, HELD, PASSED, or FAILED, REFUSED, DECLINED, CANCELLED (see FAILED)
    reason: str = ""
    metrics: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))  # type: ignore[type-arg]
    at: datetime


FAILED = ("FAILED", "REFUSED", "DECLINED", "CANCELLED")  # a check that ended without metrics: approving takes override


class ApprovalPolicy(SQLModel, table=True):
    __tablename__ = "appr_policy"
    benchmark_id: str = Field(primary_key=True)
    kind: str = Field(primary_key=True)
    mode: str
    allowed: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


TABLES = [Benchmark.__table__, Entity.__table__, Association.__table__, AssociationEntry.__table__,  # type: ignore[attr-defined]
          ApprovalPolicy.__table__, Check.__table__]  # type: ignore[attr-defined]
