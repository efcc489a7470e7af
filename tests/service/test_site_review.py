"""The site's control under the test broker: its policy refuses a job before any container, with the reason sent to
the scheduler; a held result leaves only when the data owner approves it, once; a rejection sends the fact and the
reason, never the metrics; a failure that will recur is reported and not tried again; the audit log keeps it all."""

from __future__ import annotations

from pathlib import Path

import pytest

from contracts import messages as m
from contracts import subjects
from contracts.envelope import Envelope
from contracts.signing import verify
from site_worker.audit import verify_log
from site_worker.containers import RunOutcome
from site_worker.main import send_decisions
from site_worker.review import Decision
from tests.service.conftest import started
from tests.service.test_site import JOBS, job, prepare, reports, signed
from tests.support.service import Actors, Harness

HOLD = '[release]\nrule = "hold"\n'


def results(site: Harness) -> list[Envelope[m.SiteResult]]:
    return [Envelope[m.SiteResult].model_validate(sent) for sent in site.published(subjects.results("site-a"))]


def kinds(site: Harness) -> list[str]:
    return [entry.kind for entry in site.broker.context.get("site").audit.entries()]


def with_policy(tmp_path: Path, text: str) -> Path:
    (tmp_path / "policy.toml").write_text(text)
    return tmp_path


async def test_a_job_outside_the_policy_is_refused_before_any_container_and_the_scheduler_told_why(
        tmp_path, actors, runner):
    with_policy(tmp_path, 'benchmarks = ["other-benchmark"]\n[release]\nrule = "auto"\n')
    async with started("site", tmp_path, actors, runner) as site:
        await site.deliver(JOBS, signed(actors, job(prepare(site))))

        [report] = reports(site)
        [envelope] = site.published(subjects.reports("site-a"))
        verify(Envelope[m.SiteReport].model_validate(envelope), actors.key("site-a").public_key)
        assert (report.job_id, report.state) == ("job-1", m.JobState.REFUSED)
        assert report.reason == "the site's policy accepts benchmarks ['other-benchmark'], not bm; nothing was run"
        assert runner.specs == [] and results(site) == []
        assert kinds(site) == ["policy", "job_received", "job_refused"]


@pytest.mark.parametrize(("policy", "reason"), [
    ('model_owners = ["trusted-vendor"]', "accepts models of ['trusted-vendor'], and model model-1 is vendor's"),
    (f'[models]\ndeny = ["{"sha256:" + "a" * 64}"]', "denies image sha256:aaaa"),
    (f'[models]\nallow = ["{"sha256:" + "b" * 64}"]', "is not on the site's allow-list"),
    ("[limits]\ntimeout_s = 60", "asks timeout_s = 600 s per container; this site allows at most 60 s"),
    ("[limits]\nmemory_mb = 1024", "asks memory_mb = 2048 MB per container; this site allows at most 1024 MB"),
])
async def test_each_rule_of_the_policy_refuses_with_its_reason(tmp_path, actors, runner, policy, reason):
    with_policy(tmp_path, policy + "\n")
    async with started("site", tmp_path, actors, runner) as site:
        planned = job(prepare(site), model_owner="vendor")
        planned = planned.model_copy(update={"binding": planned.binding.model_copy(
            update={"model_image": "sha256:" + "a" * 64})})

        await site.deliver(JOBS, signed(actors, planned))

        [report] = reports(site)
        assert report.state is m.JobState.REFUSED and reason in report.reason, report.reason
        assert runner.specs == []


async def test_a_held_result_leaves_only_once_approved_and_once_however_often_it_is_approved(
        tmp_path, actors, runner):
    with_policy(tmp_path, HOLD)
    async with started("site", tmp_path, actors, runner) as site:
        worker = site.broker.context.get("site")
        await site.deliver(JOBS, signed(actors, job(prepare(site))))

        assert results(site) == [] and [r.state for r in reports(site)] == [m.JobState.HELD]
        [held] = worker.review.pending()
        assert held.leaving == {"metrics": {"auc": 0.91, "sensitivity": 0.8}, "metrics_hash": held.result.metrics_hash}
        assert await send_decisions(worker) == 0 and results(site) == []  # nothing decided, nothing leaves

        worker.review.decide(["job-1"], Decision.APPROVED, by="dr-lee (uid 1000)")
        with pytest.raises(ValueError, match="already approved; a decision is taken once"):
            worker.review.decide(["job-1"], Decision.APPROVED, by="dr-lee (uid 1000)")
        assert await send_decisions(worker) == 1
        assert await send_decisions(worker) == 0

        [released] = results(site)
        verify(released, actors.key("site-a").public_key)
        assert released.data.metrics == {"auc": 0.91, "sensitivity": 0.8}
        assert kinds(site)[-2:] == ["result_held", "result_released"]
        assert verify_log(worker.settings.audit_file, actors.key("site-a").public_key).ok


async def test_held_results_survive_a_restart_of_the_worker(tmp_path, actors, runner):
    with_policy(tmp_path, HOLD)
    async with started("site", tmp_path, actors, runner) as site:
        planned = job(prepare(site))
        await site.deliver(JOBS, signed(actors, planned))
    async with started("site", tmp_path, actors, runner) as again:
        worker = again.broker.context.get("site")
        assert [held.job_id for held in worker.review.pending()] == ["job-1"]
        worker.review.decide(["job-1"], Decision.APPROVED, by="dr-lee")
        await send_decisions(worker)

        assert [r.data.job_id for r in results(again)] == ["job-1"]
        await again.deliver(JOBS, signed(actors, planned), msg_id="redelivered")
        assert "already ran at this site" in again.dead_letters()[0].error and len(runner.specs) == 2


async def test_a_held_job_redelivered_tells_the_scheduler_again_that_it_waits_and_runs_nothing(
        tmp_path, actors, runner):
    with_policy(tmp_path, HOLD)
    async with started("site", tmp_path, actors, runner) as site:
        planned = job(prepare(site))
        await site.deliver(JOBS, signed(actors, planned), msg_id="job-1")
        await site.deliver(JOBS, signed(actors, planned), msg_id="job-1", attempt=2)

        held = [sent for sent in site.published(subjects.reports("site-a")) if sent["data"]["state"] == "HELD"]
        assert {sent["id"] for sent in held} == {"held-job-1"}, "told again under the one id the bus dedupes"
        assert site.dead_letters() == [] and len(runner.specs) == 2 and results(site) == []


async def test_a_rejection_sends_the_fact_and_the_reason_never_the_metrics(tmp_path, actors, runner):
    with_policy(tmp_path, HOLD)
    async with started("site", tmp_path, actors, runner) as site:
        worker = site.broker.context.get("site")
        await site.deliver(JOBS, signed(actors, job(prepare(site))))

        worker.review.decide(["job-1"], Decision.REJECTED, by="dr-lee", reason="the cohort was mislabelled")
        await send_decisions(worker)

        assert results(site) == []
        declined = reports(site)[-1]
        assert declined.state is m.JobState.DECLINED
        assert declined.reason == "the data owner declined to release its result: the cohort was mislabelled"
        sent = site.published(subjects.reports("site-a"))[-1]["data"]
        assert set(sent) == {"job_id", "site_id", "state", "reason", "worker_id", "at", "attempt"}  # no metrics
        assert "0.91" not in sent["reason"] and "auc" not in sent["reason"]


async def test_a_release_rule_for_listed_benchmarks_releases_those_and_holds_the_rest(tmp_path, actors, runner):
    with_policy(tmp_path, '[release]\nrule = "benchmarks"\nbenchmarks = ["bm"]\n')
    async with started("site", tmp_path, actors, runner) as site:
        digest = prepare(site)
        await site.deliver(JOBS, signed(actors, job(digest)))
        other = job(digest, job_id="job-2")
        await site.deliver(JOBS, signed(actors, other.model_copy(update={"binding": other.binding.model_copy(
            update={"benchmark_id": "bm-2"})})))

        assert [r.data.job_id for r in results(site)] == ["job-1"]
        assert [(r.job_id, r.state) for r in reports(site)] == [("job-2", m.JobState.HELD)]


@pytest.mark.parametrize("outcome", [RunOutcome(exit_code=137, log_tail="", timed_out=True),
                                     RunOutcome(exit_code=137, log_tail="", oom_killed=True)])
async def test_a_failure_that_will_recur_is_reported_and_not_tried_again(site, actors, runner, outcome):
    runner.script("infer", outcome)

    await site.deliver(JOBS, signed(actors, job(prepare(site))))

    [letter] = site.dead_letters()
    [report] = reports(site)
    assert letter.deliveries == 1 and report.state is m.JobState.FAILED
    assert report.reason.startswith(f"the model failed ({outcome.why})")
    assert report.reason.endswith("(not tried again: it would fail the same way)")


async def test_a_transient_failure_is_reported_only_after_the_last_attempt(site, actors, runner):
    runner.script("evaluate", *[RunOutcome(exit_code=1, log_tail="patient 17: bad")] * 3)
    message = signed(actors, job(prepare(site)))

    for attempt in (1, 2):
        await site.deliver(JOBS, message, attempt=attempt)
    assert reports(site) == []
    await site.deliver(JOBS, message, attempt=3)

    [report] = reports(site)
    assert report.state is m.JobState.FAILED and report.reason.endswith("(attempt 3 of 3)")
    assert report.attempt == 3 and "patient 17" not in report.reason
    # each time it took the job, the site said it runs it, and which attempt it is on
    assert [(r.state, r.attempt) for r in reports(site, running=True)][:3] == [
        (m.JobState.RUNNING, 1), (m.JobState.RUNNING, 2), (m.JobState.RUNNING, 3)]


async def test_an_evaluators_undeclared_metrics_stay_at_the_site(site, actors, runner):
    from tests.support.federation import fake_containers

    extra = fake_containers({"auc": 0.91, "sensitivity": 0.8, "auc_by_age_over_80": 0.4})
    site.broker.context.get("site").runner._actions.update(extra._actions)  # the same site, a chattier evaluator

    await site.deliver(JOBS, signed(actors, job(prepare(site))))

    [released] = results(site)
    assert released.data.metrics == {"auc": 0.91, "sensitivity": 0.8}
    worker = site.broker.context.get("site")
    assert worker.review.get("job-1").kept["undeclared_metrics"] == ["auc_by_age_over_80"]
    assert "auc_by_age_over_80" in str(worker.audit.entries()[-3].details)


def test_an_invalid_policy_stops_the_worker_at_start_naming_the_field(tmp_path: Path, actors: Actors, runner):
    from tests.service.conftest import create

    with_policy(tmp_path, '[release]\nrule = "sometimes"\n')
    with pytest.raises(ValueError, match=r"site policy .*policy.toml: release.rule: Input should be 'hold', 'auto'"):
        create("site", tmp_path, actors, runner)


async def test_a_worker_whose_audit_log_was_edited_takes_no_job(tmp_path, actors, runner):
    with_policy(tmp_path, HOLD)
    async with started("site", tmp_path, actors, runner) as site:
        await site.deliver(JOBS, signed(actors, job(prepare(site))))
        log_file = site.broker.context.get("site").settings.audit_file
    lines = log_file.read_text().splitlines()
    lines[2] = lines[2].replace("job_run", "job_skipped")
    log_file.write_text("\n".join(lines) + "\n")

    with pytest.raises(RuntimeError, match=r"audit log .* fails its check: entry 3 .* was changed after it was written"):
        async with started("site", tmp_path, actors, runner):
            pass


async def test_a_gpu_job_gets_whole_devices_pinned_by_id_for_its_model_only(tmp_path, actors, runner, monkeypatch):
    monkeypatch.setenv("ASSAY_SITE_GPUS", "GPU-aaaa,GPU-bbbb")
    with_policy(tmp_path, '[limits]\ngpus = 2\n[release]\nrule = "auto"\n')
    async with started("site", tmp_path, actors, runner) as site:
        planned = job(prepare(site))
        await site.deliver(JOBS, signed(actors, planned.model_copy(update={
            "limits": planned.limits.model_copy(update={"gpus": 1})})))

        infer, evaluate = runner.specs
        assert (infer.gpus, evaluate.gpus) == (("GPU-aaaa",), ())
        assert len(results(site)) == 1
        assert site.broker.context.get("site").capacity.ledger.free().gpus == ("GPU-aaaa", "GPU-bbbb")  # given back


async def test_a_job_that_asks_more_than_the_worker_has_is_refused_not_queued(tmp_path, actors, runner, monkeypatch):
    monkeypatch.setenv("ASSAY_SITE_GPUS", "GPU-aaaa")
    with_policy(tmp_path, '[limits]\ngpus = 4\n[release]\nrule = "auto"\n')
    async with started("site", tmp_path, actors, runner) as site:
        planned = job(prepare(site))
        await site.deliver(JOBS, signed(actors, planned.model_copy(update={
            "limits": planned.limits.model_copy(update={"gpus": 2})})))

        [report] = reports(site)
        assert report.state is m.JobState.REFUSED and "asks 2 GPUs; this worker has 1" in report.reason
        assert runner.specs == []


async def test_the_heartbeat_carries_the_audit_logs_head_as_the_site_signed_it(tmp_path, actors, runner):
    from site_worker.main import alive

    with_policy(tmp_path, HOLD)
    async with started("site", tmp_path, actors, runner) as site:
        await site.deliver(JOBS, signed(actors, job(prepare(site))))
        worker = site.broker.context.get("site")

        heartbeat = alive(worker)

        head = heartbeat.audit_head
        assert head is not None and head.data.seq == len(worker.audit.entries())
        verify(head, actors.key("site-a").public_key)
        assert (heartbeat.running, heartbeat.policy_digest) == (0, worker.policies.current.digest)
