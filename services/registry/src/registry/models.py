"""Registry tables: the entities and their lifecycle. Actors live in the kit's `known_actor` table."""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel


class Status(StrEnum):
    DEVELOPMENT = "DEVELOPMENT"
    OPERATION = "OPERATION"
    ARCHIVED = "ARCHIVED"


class Benchmark(SQLModel, table=True):
    __tablename__ = "reg_benchmark"
    benchmark_id: str = Field(primary_key=True)
    owner_id: str
    status: str = Status.DEVELOPMENT
    spec: dict = Field(sa_column=Column(JSON))  # type: ignore[type-arg]


class Model(SQLModel, table=True):
    __tablename__ = "reg_model"
    model_id: str = Field(primary_key=True)
    owner_id: str
    name: str
    digest: str
    image_name: str
    status: str = Status.OPERATION  # a model is pinned by its digest from the start: a change is a new version
    previous: str | None = None     # the model this is a new version of


class Dataset(SQLModel, table=True):
    __tablename__ = "reg_dataset"
    dataset_id: str = Field(primary_key=True)
    site_id: str
    benchmark_id: str
    name: str
    content_hash: str
    case_count: int
    statistics: dict = Field(sa_column=Column(JSON))  # type: ignore[type-arg]
    status: str = Status.OPERATION


class Organisation(SQLModel, table=True):
    __tablename__ = "reg_organisation"
    organisation_id: str = Field(primary_key=True)
    name: str


TABLES = [Benchmark.__table__, Model.__table__, Dataset.__table__, Organisation.__table__]  # type: ignore[attr-defined]
