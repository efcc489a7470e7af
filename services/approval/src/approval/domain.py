"""Two-party consent, as plain functions: the entity's owner asks, the benchmark's owner approves."""

from __future__ import annotations

from approval.models import Association, Benchmark, Entity
from contracts.messages import EntityKind


def refuse_request(benchmark: Benchmark, entity: Entity, requester: str, kind: EntityKind) -> str | None:
    """Why `requester` may not ask to join `benchmark` with `entity`, or None when the request is valid."""
    if not benchmark.approved:
        return f"benchmark {benchmark.benchmark_id} is not approved by the operator yet"
    if entity.owner_id != requester:
        return f"{kind.value} {entity.entity_id} belongs to {entity.owner_id}, not to {requester}"
    if kind is EntityKind.DATASET and entity.benchmark_id != benchmark.benchmark_id:
        return (f"dataset {entity.entity_id} was prepared for benchmark {entity.benchmark_id}, "
                f"not {benchmark.benchmark_id}")
    return None


def refuse_approval(benchmark: Benchmark, association: Association | None, approver: str) -> str | None:
    if benchmark.owner_id != approver:
        return f"only the owner of benchmark {benchmark.benchmark_id} ({benchmark.owner_id}) may approve its members"
    if association is None:
        return "nobody asked for this association; its owner must request it first (assay association request)"
    return None
