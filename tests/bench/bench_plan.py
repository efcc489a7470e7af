"""Planning at size: the scheduler's `plan_jobs` when one more model is approved for a benchmark that already has
jobs (every approval plans its whole benchmark again; what exists is skipped). Sizes: a committee's 50 models x 30
sites, 10 models x 100 sites, and 3 models x 1,000 sites. Medians of 5. Run alone:
`.venv/bin/python tests/bench/bench_plan.py`."""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime

from contracts import messages as m
from scheduling.domain import PlannedDataset, plan_jobs

IMAGE = m.ImageRef(digest="sha256:" + "e" * 64, name="evaluator")
SPEC = m.BenchmarkSpec(benchmark_id="b", name="b", preparator=IMAGE, reference_model=IMAGE, evaluator=IMAGE,
                       metrics=(m.MetricSpec(name="auc"),), primary_metric="auc")
LATER = datetime(2100, 1, 1, tzinfo=UTC)
SIZES = ((50, 30), (10, 100), (3, 1000))  # models, sites


def measure(models_n: int, sites: int, repetitions: int = 5) -> dict[str, float]:
    datasets = [PlannedDataset(f"d{i}", f"site-{i}", f"sha256:{i:064x}", 10) for i in range(sites)]
    models = {f"m{k}": f"sha256:{k:064x}" for k in range(models_n)}
    existing = {j.job_id for j in plan_jobs(SPEC, dict(list(models.items())[:-1]), datasets, set(), LATER)}
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        planned = plan_jobs(SPEC, models, datasets, existing, LATER)
        times.append(time.perf_counter() - start)
    assert len(planned) == sites
    return {"models": models_n, "sites": sites, "existing": len(existing), "planned": len(planned),
            "ms": round(statistics.median(times) * 1e3, 1)}


def main() -> None:
    for models_n, sites in SIZES:
        got = measure(models_n, sites)
        print(f"{got['models']} models x {got['sites']} sites ({got['existing']} jobs exist): the last model's "
              f"{got['planned']} jobs planned in {got['ms']} ms")


if __name__ == "__main__":
    main()
