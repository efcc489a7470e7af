"""A site's control on a real nats-server with the four real services: a job its policy refuses is REFUSED in the
scheduler's record with the site's reason; a held result does not leave until the data owner approves it, survives
the worker's restart, and once approved it is sent by the restarted worker and counted once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from contracts import messages as m
from site_worker.audit import verify_log
from site_worker.review import Decision, Review
from tests.support.federation import Federation, fake_containers, next_events

METRICS = {"auc": 0.91, "sensitivity": 0.8}


async def jobs_until(fed: Federation, done: Callable[[list[m.JobStatus]], bool],
                     timeout_s: float = 60, checks: bool = False) -> list[m.JobStatus]:
    """The benchmark's own jobs (or, `checks`, the datasets' checks before joining) once `done` says so."""
    deadline = time.monotonic() + timeout_s
    while True:
        listed = m.JobList.model_validate(await fed.send(m.ListJobs(benchmark_id="bench"), None)).jobs
        jobs = [job for job in listed if (job.check is not None) == checks]
        if done(jobs):
            return jobs
        assert time.monotonic() < deadline, f"the jobs stand {[(j.site_id, j.state, j.reason) for j in jobs]}"
        await asyncio.sleep(0.1)


def policy(fed: Federation, site: str, text: str) -> None:
    folder = fed.root / "sites" / site
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.toml").write_text(text)


async def test_a_site_refuses_by_policy_and_holds_for_review_and_each_decision_is_seen(
        nats_url: str, tmp_path: Path) -> None:
    fed = Federation(nats_url, tmp_path, lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db")
    await fed.start_services()
    try:
        policy(fed, "site-a", '[release]\nrule = "hold"\n')
        policy(fed, "site-b", 'benchmarks = ["another-benchmark"]\n')
        site_a = await fed.start_site("site-a", fake_containers(METRICS))
        await fed.start_site("site-b", fake_containers(METRICS))
        await fed.benchmark()
        await fed.model("model-1")
        await fed.dataset("site-a", "ds-a")
        await fed.dataset("site-b", "ds-b")

        jobs = await jobs_until(fed, lambda js: sorted(j.state for j in js) == [m.JobState.HELD, m.JobState.REFUSED])
        refused = next(j for j in jobs if j.site_id == "site-b")
        assert refused.reason == ("the site's policy accepts benchmarks ['another-benchmark'], not bench; nothing "
                                  "was run")
        assert fed.runners["site-b"].specs == []  # neither its dataset's check nor the job ran there
        assert (await fed.board()).rows == ()  # the held result has not left

        await jobs_until(fed, lambda js: {j.site_id: j.state for j in js}.get("site-a") is m.JobState.HELD,
                         checks=True)  # its dataset's check is held there too
        await site_a.stop()  # the worker goes; what it holds stays
        fed.apps.remove(site_a)
        review = Review(fed.root / "sites" / "site-a" / "review.sqlite")
        [check, held] = sorted(review.pending(), key=lambda h: h.job_id)  # its dataset's check is held like any
        assert check.job_id.startswith("check-") and held.job_id.startswith("job-")
        review.decide([check.job_id, held.job_id], Decision.APPROVED, by="dr-lee (uid 1000)")
        await fed.start_site("site-a", fake_containers(METRICS))

        [accepted] = await next_events(nats_url, "assay.v1.evt.result.accepted", 1)
        assert accepted["data"]["job_id"] == held.job_id
        await jobs_until(fed, lambda js: {j.site_id: j.state for j in js}["site-a"] is m.JobState.DONE)
        [row] = (await fed.board()).rows
        assert row.site_values == {"site-a": METRICS}
        assert len(fed.runners["site-a"].specs) == 0  # the restarted worker sent it; nothing ran again
        assert verify_log(fed.root / "sites" / "site-a" / "audit.jsonl", fed.key("site-a").public_key).ok
    finally:
        await fed.stop()


async def test_a_worker_runs_several_jobs_at_once_within_its_budget(nats_url: str, tmp_path: Path) -> None:
    """Two models' jobs at one site: each model container waits until the other one runs too, so the jobs finish
    only if the worker runs them at the same time."""
    import threading

    from site_worker.containers import RunSpec

    fed = Federation(nats_url, tmp_path, lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db")
    await fed.start_services()
    try:
        both = threading.Barrier(2, timeout=60)
        runner = fake_containers(METRICS)
        write_predictions = runner._actions["infer"]

        def infer(spec: RunSpec) -> None:
            if spec.env["ASSAY_JOB_ID"].startswith("job-"):  # the dataset's check runs alone, before or between
                both.wait()  # broken (and the job failed) unless the other model runs meanwhile
            write_predictions(spec)

        runner.on("infer", infer)
        await fed.start_site("site-a", runner, max_jobs=2)
        await fed.benchmark()
        await fed.model("model-1")
        await fed.model("model-2")
        await fed.dataset("site-a", "ds-a")

        accepted = await next_events(nats_url, "assay.v1.evt.result.accepted", 2, timeout_s=90)
        assert {e["data"]["binding"]["model_id"] for e in accepted} == {"model-1", "model-2"}
        assert not both.broken
    finally:
        await fed.stop()
