"""What may change in each state of an entity's life (DEVELOPMENT -> OPERATION -> ARCHIVED), and who retires what."""

from __future__ import annotations

from contracts import messages as m

# what defines a benchmark's results: in OPERATION these never change (a new benchmark does)
FROZEN = ("preparator", "reference_model", "evaluator", "metrics", "primary_metric", "pooling", "predictions")
OWNERS = {m.EntityType.BENCHMARK: (m.Role.BENCHMARK_OWNER,), m.EntityType.MODEL: (m.Role.MODEL_OWNER,),
          m.EntityType.DATASET: (m.Role.SITE,)}


def changed(before: m.BenchmarkSpec, after: m.BenchmarkSpec) -> list[str]:
    """The top-level fields of the spec that differ, in the spec's order."""
    old, new = before.model_dump(mode="json"), after.model_dump(mode="json")
    return [name for name in new if old.get(name) != new[name]]
