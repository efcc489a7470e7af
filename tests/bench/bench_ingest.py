"""Result ingest: how fast the leaderboard takes results that are already waiting in the RESULTS stream, each verified
(the site's signature and the scheduler's on the job it carries), bound, stored and ranked.

The leaderboard's processes are paused (SIGSTOP) while the signed results of new jobs (new models at every simulated
site, signed as the scheduler signs jobs and as each site signs results) are published; then they go on (SIGCONT) and
the clock runs until the last ResultAccepted, and until the LeaderboardUpdated that ranks the last of them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import nats

from assay.home import Home
from assay.platform import Platform
from bench_observer import Observer
from bench_sites import BENCHMARK, CASES, Site, fake_digest, scores
from contracts import subjects
from contracts.envelope import Envelope
from contracts.messages import JobBinding, JobSpec, MetricSpec, SiteResult
from contracts.signing import metrics_hash
from service_kit.connection import servers

METRICS = (MetricSpec(name="auc"), MetricSpec(name="accuracy"))
INGEST_TIMEOUT_S = 180.0


def signed_results(home: Home, sites: list[Site], models: list[str]) -> list[Envelope[SiteResult]]:
    """One result per model and site, of a job the scheduler's key signed, signed by the site."""
    scheduler = home.key("scheduling")
    out = []
    for model in models:
        for site in sites:
            job = JobSpec(job_id=f"{model}-{site.site_id}", site_id=site.site_id, metrics=METRICS, model_owner="vendor",
                          expires_at=datetime.now(UTC) + timedelta(days=1), binding=JobBinding(
                              benchmark_id=BENCHMARK, model_id=model, dataset_id=site.dataset_id,
                              model_image=fake_digest(f"bench/{model}"),
                              evaluator_image=fake_digest("bench/evaluator"), dataset_hash=site.content_hash,
                              case_count=CASES))
            signed_job = scheduler.sign(Envelope.wrap(job, source="service:scheduling", id=job.job_id))
            metrics = scores(job.binding.model_image, site.site_id)  # the same in every run: the same board
            result = SiteResult(job_id=job.job_id, site_id=site.site_id, binding=job.binding, metrics=metrics,
                                metrics_hash=metrics_hash(metrics), worker_id="worker-1",
                                finished_at=datetime.now(UTC), job=signed_job)
            out.append(site.key.sign(Envelope.wrap(result, source=f"site:{site.site_id}/worker-1",
                                                   id=f"result-{job.job_id}")))
    return out


def leaderboards(platform: Platform) -> list[int]:
    return [proc.pid for name, proc in platform.procs.items() if name.split("-")[0] == "leaderboard"]


async def ingest(platform: Platform, observer: Observer, sites: list[Site], count: int,
                 reps: int = 3) -> dict[str, Any]:
    """`count` results waiting, then taken, `reps` times (new models each time): the median run, by results per
    second, with every run's figures."""
    runs = [await ingest_once(platform, observer, sites, count, f"ingest-{rep}") for rep in range(reps)]
    median = sorted(runs, key=lambda run: run["results_per_s"])[len(runs) // 2]
    return median | {"reps": reps, "runs": runs}


async def ingest_once(platform: Platform, observer: Observer, sites: list[Site], count: int,
                      prefix: str) -> dict[str, Any]:
    """`count` results (rounded to whole models of every site) waiting, then taken: results per second."""
    from bench_flow import cpu_of  # (bench_flow runs this module's ingest: not imported at the top)

    models = [f"{prefix}-{i}" for i in range(max(1, round(count / len(sites))))]
    results = signed_results(platform.home, sites, models)
    pids = leaderboards(platform)
    nc = await nats.connect(servers(platform.nats_url))
    js = nc.jetstream()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.gather(*(js.publish(subjects.results(r.data.site_id), r.model_dump_json().encode(),
                                          headers={"Nats-Msg-Id": r.id}) for r in results))
        info = await js.consumer_info(subjects.RESULTS_STREAM, "leaderboard-results")
        waiting = info.num_pending + info.num_ack_pending  # and those its stopped fetch holds, not yet taken
    finally:
        every = {name: proc.pid for name, proc in platform.procs.items()}
        cpu_before = cpu_of(every)
        resumed = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        await nc.close()
    await observer.wait_accepted(models, len(results), timeout_s=INGEST_TIMEOUT_S)
    accepted = max(observer.stamps[r.data.job_id]["accepted"]["mono"] for r in results)
    cpu_after = cpu_of(every)  # at the last accepted
    cpu_ms = {name: round((cpu_after[name] - cpu_before[name]) * 1000 / len(results), 2) for name in every}
    ranked = await observer.wait_board(models, sites=len(sites), timeout_s=INGEST_TIMEOUT_S)
    return {"results": len(results), "waiting_when_resumed": waiting, "accepted_s": accepted - resumed,
            "ranked_s": ranked - resumed, "results_per_s": len(results) / (accepted - resumed),
            "ranked_per_s": len(results) / (ranked - resumed), "cpu_ms_per_result": cpu_ms,
            "leaderboard_cpu_ms_per_result": round(sum(v for name, v in cpu_ms.items()
                                                       if name.split("-")[0] == "leaderboard"), 2),
            "board_updates": sum(1 for b in observer.boards if b["mono"] >= resumed)}
