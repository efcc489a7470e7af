"""The site worker under the test broker, with fake containers: a job the scheduler signed runs and its signed
result leaves on the site's subject; anything else is refused before a container starts, with its reason."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from assay_telemetry.metrics import CONTAINER_RUNS, DEAD_LETTERS
from contracts import messages as m
from contracts import subjects
from contracts.envelope import Envelope
from contracts.signing import verify
from site_worker.containers import RunOutcome, RunSpec
from site_worker.datasets import content_hash

from tests.service.conftest import SITE_METRICS
from tests.support.federation import EVALUATOR, MODEL, make_dataset
from tests.support.metrics import Series, measured, series
from tests.support.service import Actors, Harness

LATER = datetime(2100, 1, 1, tzinfo=UTC)  # the jobs of these tests never expire

JOBS = subjects.jobs("site-a")


def prepare(site: Harness, dataset_id: str = "ds-a") -> str:
    """A prepared dataset at the site; its content hash."""
    root = site.broker.context.get("site").settings.datasets_file.parent
    folder = root / "datasets" / dataset_id
    make_dataset(folder)
    (root / "datasets.json").write_text(json.dumps({dataset_id: str(folder)}))
    return content_hash(folder / "data", folder / "labels")


def job(dataset_hash: str, **changes: object) -> m.JobSpec:
    binding = m.JobBinding(benchmark_id="bm", model_id="model-1", dataset_id="ds-a", model_image=MODEL,
                           evaluator_image=EVALUATOR, dataset_hash=dataset_hash, case_count=2)
    planned = m.JobSpec(expires_at=LATER, job_id="job-1", site_id="site-a", binding=binding,
                        metrics=(m.MetricSpec(name="auc"), m.MetricSpec(name="sensitivity")))
    return planned.model_copy(update=changes)


def reports(site: Harness, *, running: bool = False) -> list[m.SiteReport]:
    """What the site said became of its jobs (and, `running`, that it took them)."""
    said = [m.SiteReport.model_validate(sent["data"]) for sent in site.published(subjects.reports("site-a"))]
    return [r for r in said if running or r.state is not m.JobState.RUNNING]


def signed(actors: Actors, planned: m.JobSpec, by: str = "scheduling") -> Envelope[m.JobSpec]:
    return actors.key(by).sign(Envelope.wrap(planned, source="service:scheduling", id=planned.job_id))


async def test_a_signed_job_runs_and_its_signed_result_leaves_on_the_sites_subject(site, actors, runner):
    planned = job(prepare(site))

    await site.deliver(JOBS, signed(actors, planned))

    [sent] = site.published(subjects.results("site-a"))
    result = Envelope[m.SiteResult].model_validate(sent)
    verify(result, actors.key("site-a").public_key)
    assert (result.id, result.data.metrics, result.data.binding) == ("result-job-1", SITE_METRICS, planned.binding)
    assert [spec.task for spec in runner.specs] == ["infer", "evaluate"]


async def test_a_job_not_signed_by_the_scheduler_is_dead_lettered_and_never_run(site, actors, runner):
    await site.deliver(JOBS, signed(actors, job(prepare(site)), by="mallory"), msg_id="job-1")

    [letter] = site.dead_letters()
    assert (letter.consumer, letter.message_id, letter.deliveries) == ("site-site-a-jobs", "job-1", 1)
    assert letter.error.startswith("refused, not a valid signed job: signed with key")
    assert runner.specs == [] and site.published(subjects.results("site-a")) == []


async def test_a_job_for_another_site_or_an_unprepared_dataset_is_refused_before_any_container(site, actors, runner):
    digest = prepare(site)
    await site.deliver(JOBS, signed(actors, job(digest, site_id="site-b")))
    await site.deliver(JOBS, signed(actors, job(digest, binding=job(digest).binding.model_copy(
        update={"dataset_id": "ds-z"}))))

    assert [letter.error for letter in site.dead_letters()] == [
        "job job-1 is addressed to site site-b, not site-a", "dataset ds-z is not prepared at site site-a"]
    assert runner.specs == []


async def test_a_failed_container_is_tried_again_and_dead_lettered_after_the_last_attempt(site, actors, runner, caplog):
    runner.script("evaluate", *[RunOutcome(exit_code=1, log_tail="patient 17: bad")] * 3)
    message = signed(actors, job(prepare(site)))

    with caplog.at_level(logging.WARNING, logger="service_kit.edge"):
        for attempt in (1, 2):
            await site.deliver(JOBS, message, attempt=attempt)
            assert site.dead_letters() == []
    assert "again in 2.00 s (attempt 1 of 3)" in caplog.text and "again in 4.00 s (attempt 2 of 3)" in caplog.text
    await site.deliver(JOBS, message, attempt=3)

    [letter] = site.dead_letters()
    assert letter.deliveries == 3 and letter.error.startswith("RunFailed: the evaluator failed (exit code 1)")
    assert "patient 17" not in letter.error  # the container's log stays at the site
    assert site.published(subjects.results("site-a")) == []


async def test_a_job_redelivered_after_its_result_was_kept_sends_what_did_not_leave_and_runs_nothing(
        site, actors, runner, monkeypatch):
    """A server failing over between the keeping and the acknowledgement: the same message comes back. It is no
    replay, so no dead letter (which would have the scheduler fail a job whose result is on its way)."""
    planned = job(prepare(site))
    worker = site.broker.context.get("site")
    publish = worker.outlets.publish

    async def results_away(subject: str, body: bytes, message_id: str) -> None:
        if subject == subjects.results("site-a"):
            raise ConnectionError("the server went away")
        await publish(subject, body, message_id)

    monkeypatch.setattr(worker.outlets, "publish", results_away)
    await site.deliver(JOBS, signed(actors, planned), msg_id="job-1")
    assert site.published(subjects.results("site-a")) == [] and site.dead_letters() == []
    monkeypatch.undo()

    await site.deliver(JOBS, signed(actors, planned), msg_id="job-1", attempt=2)
    await site.deliver(JOBS, signed(actors, planned), msg_id="job-1", attempt=3)

    assert site.dead_letters() == []
    assert [spec.task for spec in runner.specs] == ["infer", "evaluate"]
    [sent] = site.published(subjects.results("site-a"))  # sent once, in the envelope the site signed as it kept it
    assert sent["data"]["job_id"] == "job-1" and sent["id"] == "result-job-1"


async def delivered_again_while_it_runs(site: Harness, actors: Actors, runner, caplog: pytest.LogCaptureFixture,
                                        ends: Callable[[], None]) -> None:
    """Deliver job-1, and while its model runs deliver it again (its lease lapsed: the heartbeats did not reach the
    bus for the whole ack wait); the model ends as `ends` says once the second delivery is waiting."""
    planned, started, release = job(prepare(site)), threading.Event(), threading.Event()

    def infer(spec: RunSpec) -> None:
        started.set()
        assert release.wait(10), "the test never let the model finish"
        ends()

    runner.on("infer", infer)
    first = asyncio.create_task(site.deliver(JOBS, signed(actors, planned), msg_id="job-1"))
    assert await asyncio.to_thread(started.wait, 10)
    worker = site.broker.context.get("site")
    waiting = asyncio.create_task(site.deliver(JOBS, signed(actors, planned), msg_id="job-1", attempt=2))
    for _ in range(500):  # until the second delivery waits for the first (or has ended: the test then fails)
        if waiting.done() or "this delivery waits for that run" in caplog.text:
            break
        await asyncio.sleep(0.01)
    assert not waiting.done() and "job-1" in worker.running
    release.set()
    await asyncio.gather(first, waiting)


async def test_a_job_delivered_again_while_it_runs_waits_for_that_run_and_runs_once(site, actors, runner, caplog):
    """A lapsed lease while the bus was away: JetStream hands the job out again, to the same site. It must not run
    twice at once (the audit log would show two runs of one job): the second delivery waits, then ends as a
    redelivery of a kept result does, sending nothing twice."""
    await delivered_again_while_it_runs(site, actors, runner, caplog, ends=lambda: None)

    assert "was delivered again while it runs here" in caplog.text
    assert [spec.task for spec in runner.specs] == ["infer", "evaluate"]
    [sent] = site.published(subjects.results("site-a"))
    assert sent["id"] == "result-job-1" and site.dead_letters() == []
    runs = [e for e in site.broker.context.get("site").audit.entries() if e.kind == "job_run"]
    assert [e.job_id for e in runs] == ["job-1"]


async def test_a_job_that_failed_while_delivered_again_is_tried_again_not_run_by_the_waiting_delivery(
        site, actors, runner, caplog):
    def crash() -> None:
        raise RuntimeError("out of GPU memory")

    with caplog.at_level(logging.WARNING, logger="service_kit.edge"):
        await delivered_again_while_it_runs(site, actors, runner, caplog, ends=crash)

    assert [spec.task for spec in runner.specs] == ["infer"], "the waiting delivery ran nothing"
    assert caplog.text.count("will be delivered again") == 2  # both deliveries ask for the one message again
    assert "this delivery waited for failed" in caplog.text
    assert site.published(subjects.results("site-a")) == [] and site.dead_letters() == []


async def test_a_job_failed_for_good_while_delivered_again_is_dead_lettered_once(site, actors, runner, caplog):
    runner.script("evaluate", RunOutcome(exit_code=137, log_tail="", oom_killed=True))

    await delivered_again_while_it_runs(site, actors, runner, caplog, ends=lambda: None)

    [letter] = site.dead_letters()  # failed for good: said and dead-lettered by the run, not again by the wait
    assert [r.state for r in reports(site)] == [m.JobState.FAILED]
    assert [spec.task for spec in runner.specs] == ["infer", "evaluate"]


async def test_a_bus_away_for_a_moment_is_waited_out_not_spent_on_the_jobs_deliveries(site, actors, runner,
                                                                                    monkeypatch, caplog):
    """A cluster electing a stream's leader answers nothing for seconds: the site's reports and result wait for it,
    where each failed publish used to cost the job one of its three deliveries (and, three times, the job)."""
    from nats.js.errors import NoStreamResponseError

    planned = job(prepare(site))
    worker = site.broker.context.get("site")
    publish, away = worker.outlets.publish, iter(range(3))

    async def electing(subject: str, body: bytes, message_id: str) -> None:
        if next(away, None) is not None:
            raise NoStreamResponseError
        await publish(subject, body, message_id)

    monkeypatch.setattr(worker.outlets, "publish", electing)
    await site.deliver(JOBS, signed(actors, planned))

    assert site.dead_letters() == [] and [spec.task for spec in runner.specs] == ["infer", "evaluate"]
    [sent] = site.published(subjects.results("site-a"))
    assert sent["data"]["job_id"] == "job-1"
    assert sum("trying again in" in record.message for record in caplog.records) == 3


async def test_a_bus_away_past_the_sites_patience_fails_the_delivery_which_comes_again(site, actors, runner,
                                                                                     monkeypatch):
    from nats.js.errors import NoStreamResponseError

    import site_worker.main

    monkeypatch.setattr(site_worker.main, "BUS_PATIENCE_S", 0.5)
    worker = site.broker.context.get("site")

    async def gone(subject: str, body: bytes, message_id: str) -> None:
        raise NoStreamResponseError

    monkeypatch.setattr(worker.outlets, "publish", gone)
    await site.deliver(JOBS, signed(actors, job(prepare(site))))

    assert runner.specs == [], "nothing runs before the scheduler can be told that it does"
    monkeypatch.undo()
    assert site.dead_letters() == [] and site.published(subjects.results("site-a")) == []


async def test_a_job_that_ran_is_never_run_again_however_it_comes_back(site, actors, runner):
    planned = job(prepare(site))
    await site.deliver(JOBS, signed(actors, planned))

    await site.deliver(JOBS, signed(actors, planned), msg_id="replayed-under-a-new-id")

    [letter] = site.dead_letters()
    assert letter.error.startswith("job job-1 already ran at this site (its result was kept at ")
    assert [spec.task for spec in runner.specs] == ["infer", "evaluate"]
    assert len(site.published(subjects.results("site-a"))) == 1


async def test_an_expired_job_is_refused_before_any_container(site, actors, runner):
    expired = job(prepare(site), expires_at=datetime.now(UTC) - timedelta(seconds=1))

    await site.deliver(JOBS, signed(actors, expired))

    [letter] = site.dead_letters()
    assert letter.error.startswith("job job-1 expired at ") and letter.error.endswith("; it is not run")
    assert runner.specs == []


async def test_a_job_delivered_after_a_worker_died_in_its_last_attempt_is_dead_lettered_unrun(site, actors, runner):
    await site.deliver(JOBS, signed(actors, job(prepare(site))), attempt=4)

    [letter] = site.dead_letters()
    assert "more than the 3 attempts allowed" in letter.error and runner.specs == []


async def test_each_container_run_is_timed_by_task_and_outcome_and_a_job_given_up_on_counted(site, actors, runner,
                                                                                              metrics):
    runner.script("evaluate", *[RunOutcome(exit_code=1, log_tail="bad")] * 3)
    message = signed(actors, job(prepare(site)))
    for attempt in (1, 2, 3):
        await site.deliver(JOBS, message, attempt=attempt)

    def run(task: str, outcome: str) -> Series:
        return series(task=task, outcome=outcome, benchmark_id="bm", site_id="site-a")

    assert measured(metrics, CONTAINER_RUNS) == {run("infer", "ok"): 3, run("evaluate", "exit_code"): 3}
    assert measured(metrics, DEAD_LETTERS) == {series(consumer="site-site-a-jobs"): 1}
