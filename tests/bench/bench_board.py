"""(c) The board at committee scale: a benchmark of 50 models x 32 sites x 1000 replicates pooled from scratch, made
again after one new result (in memory, and through the leaderboard's store on SQLite as the service does it), and the
bytes a result with its evidence takes on the bus. Baseline: the same board without replicates or aggregates (what
the board was: means of site values), pooled in the same run."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from contracts.envelope import Envelope
from contracts.messages import (
    BenchmarkSpec,
    Confusion,
    Evidence,
    Histograms,
    ImageRef,
    JobBinding,
    JobSpec,
    MetricKind,
    MetricSpec,
    Pooling,
    SiteResult,
)
from contracts.signing import KeyPair, metrics_hash
from leaderboard.board import Score, aggregate
from leaderboard.current import Boards

SPECS = (MetricSpec(name="auc", kind=MetricKind.AUC), MetricSpec(name="sensitivity", kind=MetricKind.SENSITIVITY),
         MetricSpec(name="specificity", kind=MetricKind.SPECIFICITY))
IMAGE = ImageRef(digest="sha256:" + "1" * 64, name="bench")


def benchmark(replicates: int, bins: int) -> BenchmarkSpec:
    return BenchmarkSpec(benchmark_id="bench-board", name="board", preparator=IMAGE, reference_model=IMAGE,
                         evaluator=IMAGE, metrics=SPECS, primary_metric="auc",
                         pooling=Pooling(replicates=replicates, confusion=True, bins=bins, min_count=1))


def evidence(rng: np.random.Generator, replicates: int, bins: int) -> tuple[dict[str, float], Evidence]:
    tp, fn, tn, fp = (int(x) for x in rng.integers(20, 200, 4))
    values = {"auc": float(rng.uniform(0.6, 0.95)), "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp)}
    return values, Evidence(
        replicates={k: tuple(np.round(np.clip(rng.normal(v, 0.03, replicates), 0, 1), 6)) for k, v in values.items()},
        confusion=Confusion(tp=tp, fn=fn, tn=tn, fp=fp),
        histograms=Histograms(positive=tuple(int(x) for x in rng.multinomial(tp + fn, np.ones(bins) / bins)),
                              negative=tuple(int(x) for x in rng.multinomial(tn + fp, np.ones(bins) / bins))))


def score_of(model: str, site: str, values: dict[str, float], ev: Evidence | None) -> Score:
    if ev is None:
        return Score(model_id=model, site_id=site, metrics=values, case_count=400)
    return Score(model_id=model, site_id=site, metrics=values, case_count=sum(ev.histograms.positive) +  # type: ignore[union-attr]
                 sum(ev.histograms.negative), replicates={k: np.asarray(v) for k, v in ev.replicates.items()},  # type: ignore[union-attr]
                 confusion=ev.confusion, histograms=ev.histograms)


def median_s(run: Callable[[], Any], repetitions: int) -> float:
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def result_bytes(values: dict[str, float], ev: Evidence | None) -> int:
    """A signed SiteResult envelope as it travels, with the job it answers."""
    scheduler, site = KeyPair.generate(), KeyPair.generate()
    binding = JobBinding(benchmark_id="bench-board", model_id="m", dataset_id="d", model_image=IMAGE.digest,
                         evaluator_image=IMAGE.digest, dataset_hash=IMAGE.digest, case_count=400)
    job = JobSpec(job_id="job-1", site_id="site", binding=binding, metrics=SPECS, expires_at=datetime(2100, 1, 1,
                  tzinfo=UTC), pooling=Pooling(replicates=1000, confusion=True, bins=100, min_count=1))
    result = SiteResult(job_id="job-1", site_id="site", binding=binding, metrics=values,
                        metrics_hash=metrics_hash(values), job=scheduler.sign(Envelope.wrap(job, source="s")),
                        worker_id="w", finished_at=datetime.now(UTC), evidence=ev)
    return len(site.sign(Envelope.wrap(result, source="site:site")).model_dump_json().encode())


async def through_store(bench: BenchmarkSpec, results: list[tuple[str, str, dict[str, float], Evidence]],
                        extra: list[tuple[str, str, dict[str, float], Evidence]]) -> dict[str, float]:
    """The service's own path on SQLite: the first board from the database, then each new result recorded and the
    board made again (as `record_result` does), medians."""
    from sqlmodel import SQLModel
    from sqlmodel.ext.asyncio.session import AsyncSession

    from leaderboard.handlers import current
    from leaderboard.models import TABLES, AcceptedResult
    from service_kit.app import KIT_TABLES
    from leaderboard.store import Store
    from sqlalchemy.ext.asyncio import create_async_engine

    folder = Path(tempfile.mkdtemp(prefix="assay-bench-board-"))
    engine = create_async_engine(f"sqlite+aiosqlite:///{folder / 'board.db'}")
    async with engine.begin() as conn:  # all the tables `current` reads (the withdrawals' too), as the service has them
        await conn.run_sync(SQLModel.metadata.create_all, tables=[*KIT_TABLES, *TABLES])

    def row(n: int, model: str, site: str, values: dict[str, float], ev: Evidence) -> AcceptedResult:
        names = sorted(ev.replicates)
        return AcceptedResult(job_id=f"job-{n}", message_id=f"msg-{n}", benchmark_id=bench.benchmark_id,
                              model_id=model, dataset_id=site, site_id=site, metrics=values, case_count=400,
                              metrics_hash="sha256:" + "0" * 64, worker_id="w", finished_at=datetime.now(UTC),
                              aggregates=ev.model_dump(mode="json", exclude={"replicates"}), replicated=names,
                              replicates=np.array([ev.replicates[k] for k in names]).tobytes())

    async with AsyncSession(engine) as session:
        session.add_all(row(n, *r) for n, r in enumerate(results))
        await session.commit()
    boards = Boards()
    timings: dict[str, list[float]] = {"cold": [], "new_result": []}
    async with AsyncSession(engine) as session:
        start = time.perf_counter()
        await current(Store(session), bench, boards)
        timings["cold"].append(time.perf_counter() - start)
    for n, new in enumerate(extra, start=len(results)):
        async with AsyncSession(engine) as session:
            start = time.perf_counter()
            session.add(row(n, *new))
            await session.flush()
            await current(Store(session), bench, boards)
            await session.commit()
            timings["new_result"].append(time.perf_counter() - start)
    await engine.dispose()
    return {k: statistics.median(v) for k, v in timings.items()}


def measure(models: int = 50, sites: int = 32, replicates: int = 1000, bins: int = 100, repetitions: int = 5,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    rng = np.random.default_rng(2026)
    bench = benchmark(replicates, bins)
    results = [(f"m{m:02d}", f"site-{s:02d}", *evidence(rng, replicates, bins)) for m in range(models)
               for s in range(sites)]
    scores = [score_of(m, s, v, e) for m, s, v, e in results]
    bare = [score_of(m, s, v, None) for m, s, v, _ in results]
    say(f"{models} models x {sites} sites x {replicates} replicates: {len(scores)} results")
    full_s = median_s(lambda: aggregate(bench, scores), repetitions)
    bare_s = median_s(lambda: aggregate(bench, bare), repetitions)

    boards = Boards()
    listing = [(m, f"job-{n}", "") for n, (m, *_) in enumerate(results)]

    async def load(chosen: Any) -> list[Score]:
        return [score for score in scores if score.model_id in chosen]

    asyncio.run(boards.board(bench, listing, load))
    new_results = [(f"m{n % models:02d}", f"site-new-{n}", *evidence(rng, replicates, bins))
                   for n in range(repetitions)]
    times = []
    for n, (m, s, v, e) in enumerate(new_results):
        scores.append(score_of(m, s, v, e))
        listing.append((m, f"job-new-{n}", ""))
        start = time.perf_counter()
        asyncio.run(boards.board(bench, listing, load))
        times.append(time.perf_counter() - start)
    say("the same through the leaderboard's store on SQLite")
    stored = asyncio.run(through_store(bench, results, new_results))
    values, ev = results[0][2], results[0][3]
    return {
        "models": models, "sites": sites, "replicates": replicates, "bins": bins, "repetitions": repetitions,
        "full_s": full_s, "bare_s": bare_s, "ratio_full_to_bare": full_s / bare_s,
        "incremental_s": statistics.median(times), "stored_cold_s": stored["cold"],
        "stored_new_result_s": stored["new_result"],
        "result_bytes": result_bytes(values, ev), "bare_result_bytes": result_bytes(values, None),
    }
