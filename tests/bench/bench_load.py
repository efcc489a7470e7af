"""Latency against offered load: jobs offered at a steady rate, below the maximum the rounds measured, and the
percentiles of JobScheduled -> ResultAccepted at each rate; and the plot of them.

A few of the simulated sites (`SWEEP_SITES`) each have a dataset in a small benchmark of their own, so one model
approved for one of them makes one job, at that site; models are approved in turn for each benchmark, at the interval
that offers the rate asked for (an approval is sent without waiting for the one before), for `seconds` per rate: a
steady arrival of single jobs spread over the sites, as a federation's jobs arrive once its bursts are spread out.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats

from assay.client import request, signed
from assay.home import Home
from bench_observer import Observer
from bench_bus import wait_quiet
from bench_sites import BENCHMARK, CASES, METRICS, OPERATOR, OWNER, VENDOR, Site, bounded, image
from contracts import messages as m
from contracts.catalog import REQUEST_SUBJECTS
from service_kit.connection import servers

SWEEP_BENCHMARK = "bench-latency"  # and -0, -1, ...: one per site
SWEEP_SITES = 5  # the sites that take the offered jobs, in turn
LEVEL_TIMEOUT_S = 120.0
SATURATE_S = 1.0  # the maximum is taken with this many seconds' worth of the rounds' jobs, approved at once


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def models_for(fractions: list[float], max_rate: float, seconds: float) -> list[list[str]]:
    """The models each rate approves, one job each: enough for `seconds` at that rate, at least a round of the sites."""
    return [[f"load-{level}-{i}" for i in range(max(SWEEP_SITES, round(fraction * max_rate * seconds)))]
            for level, fraction in enumerate(fractions)]


def benchmark_of(model: str) -> str:
    """The sweep's benchmark a model is approved for: the sites take the models in turn."""
    return f"{SWEEP_BENCHMARK}-{int(model.rsplit('-', 1)[1]) % SWEEP_SITES}"


async def setup_sweep(nats_url: str, home: Home, sites: list[Site], models: list[str]) -> float:
    """A benchmark for each of `sites` with a dataset there (the same prepared data under a second id; none where
    `sites` is empty), and the models asked for, each for one of them; returns the seconds it took."""
    keys = {name: home.key(name) for name in (OPERATOR, OWNER, VENDOR)}
    start = time.perf_counter()

    async def send(payload: m.Payload, actor: str, key: Any) -> None:
        reply = await request(nats_url, payload, actor=actor, key=key, patience_s=60)
        if not reply.get("ok", True):
            raise RuntimeError(f"{type(payload).__name__} refused: {reply}")

    specs = [m.BenchmarkSpec(benchmark_id=f"{SWEEP_BENCHMARK}-{n}", name="latency", metrics=METRICS,
                             preparator=image("bench/preparator"), reference_model=image("bench/reference"),
                             evaluator=image("bench/evaluator"), primary_metric="auc") for n in range(len(sites))]
    for spec in specs:
        await send(m.RegisterBenchmark(benchmark=spec), OWNER, keys[OWNER])
        await send(m.ApproveBenchmark(benchmark_id=spec.benchmark_id), OPERATOR, keys[OPERATOR])

    async def join(site: Site, spec: m.BenchmarkSpec) -> None:
        dataset_id = f"{site.site_id}-latency"
        datasets = json.loads(site.settings.datasets_file.read_text())
        datasets[dataset_id] = datasets[site.dataset_id]  # the same prepared data, registered for this benchmark too
        site.settings.datasets_file.write_text(json.dumps(datasets))
        await send(m.RegisterDataset(dataset_id=dataset_id, benchmark_id=spec.benchmark_id, name=dataset_id,
                                     content_hash=site.content_hash, case_count=CASES, statistics={"cases": CASES},
                                     preparator_digest=spec.preparator.digest), site.site_id, site.key)
        await send(m.RequestAssociation(benchmark_id=spec.benchmark_id, kind=m.EntityKind.DATASET,
                                        entity_id=dataset_id), site.site_id, site.key)
        await send(m.ApproveAssociation(benchmark_id=spec.benchmark_id, kind=m.EntityKind.DATASET,
                                        entity_id=dataset_id), OWNER, keys[OWNER])

    async def ask(model: str) -> None:
        await send(m.RegisterModel(model_id=model, name=model, image=image(f"bench/{model}")), VENDOR, keys[VENDOR])
        await send(m.RequestAssociation(benchmark_id=benchmark_of(model), kind=m.EntityKind.MODEL, entity_id=model),
                   VENDOR, keys[VENDOR])

    await bounded([*(join(site, spec) for site, spec in zip(sites, specs, strict=True)), *(ask(x) for x in models)])
    await wait_quiet(nats_url)  # the datasets' checks ran; the rates start with everyone caught up
    return time.perf_counter() - start


async def offer(nats_url: str, home: Home, observer: Observer, models: list[str], rate: float) -> dict[str, Any]:
    """Approve `models` one every 1 / `rate` seconds; the latencies of their jobs once all are accepted. The
    approvals go on one connection (as `assay.client.request` signs them, without its connection per command)."""
    key, interval = home.key(OWNER), 1 / rate
    nc = await nats.connect(servers(nats_url))
    try:
        async def approve(model: str) -> None:
            command = m.ApproveAssociation(benchmark_id=benchmark_of(model), kind=m.EntityKind.MODEL, entity_id=model)
            reply = json.loads((await nc.request(REQUEST_SUBJECTS[m.ApproveAssociation],
                                                 signed(command, OWNER, key), timeout=30)).data)
            if not reply.get("ok"):
                raise RuntimeError(f"the approval of {model} was refused: {reply}")

        sent: list[asyncio.Task[Any]] = []
        began = time.monotonic()
        for n, model in enumerate(models):
            if interval:  # else (an infinite rate) all at once
                await asyncio.sleep(max(0.0, began + n * interval - time.monotonic()))
            sent.append(asyncio.create_task(approve(model)))
        await asyncio.gather(*sent)
    finally:
        await nc.close()
    await observer.wait_accepted(models, len(models), timeout_s=LEVEL_TIMEOUT_S)
    stamps = [observer.stamps[job] for job, model in observer.model_of.items() if model in models]
    latency = [s["accepted"]["mono"] - s["scheduled"]["mono"] for s in stamps]
    first = min(s["scheduled"]["mono"] for s in stamps)
    last = max(s["accepted"]["mono"] for s in stamps)
    to_result = [s["result"]["mono"] - s["scheduled"]["mono"] for s in stamps if "result" in s]
    to_board = [s["accepted"]["mono"] - s["result"]["mono"] for s in stamps if "result" in s]
    return {"offered_jobs_per_s": rate if rate != float("inf") else None, "jobs": len(latency),
            "achieved_jobs_per_s": len(latency) / (last - first),
            "latency_p50_s": statistics.median(latency), "latency_p90_s": percentile(latency, 90),
            "latency_p99_s": percentile(latency, 99), "latency_max_s": max(latency),
            "stage_p50_s": {"scheduled_to_result": statistics.median(to_result),
                            "result_to_accepted": statistics.median(to_board)}}


async def sweep(nats_url: str, home: Home, observer: Observer, sites: list[Site], rounds_rate: float,
                fractions: list[float], seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    """The most these single jobs make per second (each brings its approval too, which a round shares among all its
    jobs: `rounds_rate` is more than they reach), then each fraction of that offered for about `seconds`."""
    saturating = [f"load-sat-{i}" for i in range(max(4 * SWEEP_SITES, round(rounds_rate * SATURATE_S)))]
    setup_s = await setup_sweep(nats_url, home, sites[:SWEEP_SITES], saturating)
    most = await offer(nats_url, home, observer, saturating, float("inf"))
    max_rate = most["achieved_jobs_per_s"]
    levels = models_for(fractions, max_rate, seconds)
    setup_s += await setup_sweep(nats_url, home, [], [x for level in levels for x in level])
    log(f"latency sweep: {SWEEP_SITES} benchmarks of one site each, {len(saturating) + sum(map(len, levels))} models "
        f"(set up in {setup_s:.1f} s); single jobs, all approved at once: {max_rate:.1f} jobs/s (the rounds: "
        f"{rounds_rate:.1f})")
    out = []
    for fraction, models in zip(fractions, levels, strict=True):
        level = await offer(nats_url, home, observer, models, fraction * max_rate) | {"fraction_of_max": fraction}
        out.append(level)
        log(f"offered {level['offered_jobs_per_s']:.1f} jobs/s ({fraction:.2f} of the maximum): {level['jobs']} jobs, "
            f"p50 {level['latency_p50_s'] * 1000:.0f} ms, p99 {level['latency_p99_s'] * 1000:.0f} ms (p50 stages: "
            f"to the result {level['stage_p50_s']['scheduled_to_result'] * 1000:.0f} ms, then to its acceptance "
            f"{level['stage_p50_s']['result_to_accepted'] * 1000:.0f} ms)")
    return {"benchmark": SWEEP_BENCHMARK, "sites": SWEEP_SITES, "seconds": seconds, "max_jobs_per_s": max_rate,
            "rounds_jobs_per_s": rounds_rate, "saturated": most, "setup_s": setup_s, "levels": out,
            "main_benchmark": BENCHMARK}


def plot(load: dict[str, Any], path: Path) -> None:
    """Latency percentiles against the offered load, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = load["levels"]
    offered = [x["offered_jobs_per_s"] for x in levels]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, label, style in (("latency_p50_s", "p50", "o-"), ("latency_p90_s", "p90", "s--"),
                              ("latency_p99_s", "p99", "^:")):
        ax.plot(offered, [x[key] * 1000 for x in levels], style, label=label)
    most = load["max_jobs_per_s"]
    ax.axvline(most / 2, color="grey", lw=0.8)
    ax.axvline(most, color="grey", lw=0.8, ls=":")
    ax.axhline(50, color="tab:blue", lw=0.6, ls="--", label="target p50 (at half the maximum)")
    ax.axhline(250, color="tab:green", lw=0.6, ls="--", label="target p99 (at half the maximum)")
    ax.set_yscale("log")
    ax.set_xlim(0, most * 1.05)
    ax.set_xlabel(f"offered jobs/s (the maximum, dotted: {most:.1f}; half of it, solid)")
    ax.set_ylabel("JobScheduled -> ResultAccepted, ms")
    ax.set_title(f"Job latency against offered load: single jobs over {load['sites']} sites, one nats-server",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
