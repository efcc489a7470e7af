"""What must hold before anyone may ask to join a benchmark (the consent itself is `approval.consent`)."""

from __future__ import annotations

from approval.models import Benchmark


def refuse_request(benchmark: Benchmark) -> str | None:
    """Why nothing may ask to join (or be invited to) `benchmark` yet, or None."""
    if benchmark.archived:
        return f"benchmark {benchmark.benchmark_id} is archived: nothing joins it any more"
    if benchmark.rejected:
        return f"benchmark {benchmark.benchmark_id} was rejected by the operator: {benchmark.rejected}"
    if not benchmark.approved:
        return f"benchmark {benchmark.benchmark_id} is not approved by the operator yet"
    return None
