"""The registry's lists: what exists of each kind, for any registered actor, without a dataset's statistics."""

from __future__ import annotations

from typing import Any

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from contracts import messages as m
from registry.models import Benchmark, Dataset, Model, Organisation
from service_kit.actors import KnownActor


def _benchmark(row: Benchmark) -> m.EntitySummary:
    spec = m.BenchmarkSpec.model_validate(row.spec)
    return m.EntitySummary(kind=m.EntityType.BENCHMARK, entity_id=row.benchmark_id, name=spec.name,
                           owner_id=row.owner_id, state=row.status, detail={
                               "primary metric": spec.primary_metric,
                               "metrics": ", ".join(metric.name for metric in spec.metrics),
                               "evaluator": spec.evaluator.digest, "preparator": spec.preparator.digest})


def _model(row: Model) -> m.EntitySummary:
    version = {"version of": row.previous} if row.previous else {}
    return m.EntitySummary(kind=m.EntityType.MODEL, entity_id=row.model_id, name=row.name, owner_id=row.owner_id,
                           state=row.status, detail={"image": row.digest, "image name": row.image_name, **version})


def _dataset(row: Dataset) -> m.EntitySummary:
    return m.EntitySummary(kind=m.EntityType.DATASET, entity_id=row.dataset_id, name=row.name, owner_id=row.site_id,
                           state=row.status, benchmark_id=row.benchmark_id,
                           detail={"content hash": row.content_hash, "cases": str(row.case_count)})


def _actor(row: KnownActor) -> m.EntitySummary:
    detail = {"key": row.key_id, **({"also": ", ".join(row.also)} if row.also else {}),
              **({"organisation": row.organisation} if row.organisation else {}),
              **({"suspended": row.suspended} if row.suspended else {})}
    return m.EntitySummary(kind=m.EntityType.ACTOR, entity_id=row.actor_id, name=row.display_name,
                           owner_id=row.actor_id, state="SUSPENDED" if row.suspended else row.role, detail=detail)


def _organisation(row: Organisation) -> m.EntitySummary:
    return m.EntitySummary(kind=m.EntityType.ORGANISATION, entity_id=row.organisation_id, name=row.name,
                           owner_id=row.organisation_id, state="OPERATION")


TABLES: dict[m.EntityType, tuple[Any, Any, Any, Any]] = {  # table, its id, its owner column, how it is listed
    m.EntityType.BENCHMARK: (Benchmark, Benchmark.benchmark_id, Benchmark.owner_id, _benchmark),
    m.EntityType.MODEL: (Model, Model.model_id, Model.owner_id, _model),
    m.EntityType.DATASET: (Dataset, Dataset.dataset_id, Dataset.site_id, _dataset),
    m.EntityType.ACTOR: (KnownActor, KnownActor.actor_id, KnownActor.organisation, _actor),  # owner: its organisation
    m.EntityType.ORGANISATION: (Organisation, Organisation.organisation_id, Organisation.organisation_id,
                                _organisation),
}


async def listed(session: AsyncSession, asked: m.ListEntities) -> m.EntityList:
    table, id_column, owner_column, summary = TABLES[asked.kind]
    query = select(table).order_by(col(id_column))
    if asked.entity_id is not None:
        query = query.where(id_column == asked.entity_id)
    if asked.owner is not None:
        query = query.where(owner_column == asked.owner)
    if asked.benchmark_id is not None and asked.kind is m.EntityType.DATASET:
        query = query.where(Dataset.benchmark_id == asked.benchmark_id)
    found = [summary(row) for row in (await session.exec(query.limit(asked.limit))).all()]
    if asked.state is not None:
        found = [entity for entity in found if entity.state.upper() == asked.state]
    return m.EntityList(entities=tuple(found))
