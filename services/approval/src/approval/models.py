"""Approval tables: what it has learned of benchmarks and entities, and the associations it decides."""

from __future__ import annotations

from sqlmodel import Field, SQLModel


class Benchmark(SQLModel, table=True):
    __tablename__ = "appr_benchmark"
    benchmark_id: str = Field(primary_key=True)
    owner_id: str
    approved: bool = False


class Entity(SQLModel, table=True):
    __tablename__ = "appr_entity"
    kind: str = Field(primary_key=True)
    entity_id: str = Field(primary_key=True)
    owner_id: str
    benchmark_id: str | None = None  # datasets are prepared for one benchmark


class Association(SQLModel, table=True):
    __tablename__ = "appr_association"
    benchmark_id: str = Field(primary_key=True)
    kind: str = Field(primary_key=True)
    entity_id: str = Field(primary_key=True)
    status: str = "REQUESTED"
    requested_by: str
    approved_by: str | None = None


TABLES = [Benchmark.__table__, Entity.__table__, Association.__table__]  # type: ignore[attr-defined]
