"""Scheduling under the test broker: each approved (model, dataset) pair of an approved benchmark becomes one job,
announced and sent, signed, to its site's queue, whichever event completes the pair and however often it comes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from opentelemetry import context as otel_context

from assay_telemetry.metrics import JOBS, OUTBOX_LAG, OUTBOX_OLDEST, OUTBOX_PENDING, QUEUE
from contracts import messages as m
from contracts import subjects
from contracts.envelope import Envelope
from contracts.signing import verify
from scheduling.handlers import mark_all_done, record_reports
from service_kit.edge import Refused
from service_kit.together import Arrival
from tests.support.metrics import measured, series
from tests.support.service import Harness

IMAGE = m.ImageRef(digest="sha256:" + "1" * 64, name="prep")
EVALUATOR = m.ImageRef(digest="sha256:" + "2" * 64, name="ev")
SPEC = m.BenchmarkSpec(benchmark_id="bm", name="Benchmark", preparator=IMAGE, reference_model=IMAGE,
                       evaluator=EVALUATOR, metrics=(m.MetricSpec(name="auc"),), primary_metric="auc")


def model(model_id: str, digest_char: str = "3") -> m.ModelRegistered:
    return m.ModelRegistered(model_id=model_id, owner_id="vendor", name=model_id,
                             image=m.ImageRef(digest="sha256:" + digest_char * 64, name=model_id))


def dataset(dataset_id: str, site_id: str) -> m.DatasetRegistered:
    return m.DatasetRegistered(dataset_id=dataset_id, site_id=site_id, benchmark_id="bm", name=dataset_id,
                               content_hash="sha256:" + "d" * 64, case_count=40, statistics={})


def member(kind: m.EntityKind, entity_id: str) -> m.AssociationApproved:
    return m.AssociationApproved(benchmark_id="bm", kind=kind, entity_id=entity_id, approved_by="owner")


async def learn(scheduling: Harness, *events: m.Payload) -> None:
    for event in events:
        await scheduling.learn(event)


def jobs_sent(scheduling: Harness) -> list[Envelope[m.JobSpec]]:
    return [Envelope[m.JobSpec].model_validate(sent) for sent in scheduling.published(subjects.JOBS_ALL)]


async def test_every_approved_pair_becomes_one_announced_job_signed_for_its_site(scheduling, actors):
    await learn(scheduling, m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC),
                m.BenchmarkApproved(benchmark_id="bm", approved_by="operator"), model("model-1"),
                dataset("ds-a", "site-a"), dataset("ds-b", "site-b"), member(m.EntityKind.MODEL, "model-1"),
                member(m.EntityKind.DATASET, "ds-a"), member(m.EntityKind.DATASET, "ds-b"))

    sent = jobs_sent(scheduling)
    assert sorted((job.data.site_id, job.data.binding.dataset_id) for job in sent) == [("site-a", "ds-a"),
                                                                                        ("site-b", "ds-b")]
    for job in sent:
        verify(job, actors.key("scheduling").public_key)
        assert job.id == job.data.job_id
        assert timedelta(days=29) < job.data.expires_at - datetime.now(UTC) <= timedelta(days=30)  # the default
        assert (job.data.binding.model_image, job.data.binding.evaluator_image, job.data.binding.case_count) == (
            "sha256:" + "3" * 64, EVALUATOR.digest, 40)
    assert sorted(e.job.job_id for e in scheduling.events(m.JobScheduled)) == sorted(j.id for j in sent)


async def test_a_pair_is_planned_once_whichever_event_completes_it_and_however_often(scheduling, actors):
    events = (m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC), member(m.EntityKind.MODEL, "model-1"),
              dataset("ds-a", "site-a"), member(m.EntityKind.DATASET, "ds-a"), model("model-1"),
              m.BenchmarkApproved(benchmark_id="bm", approved_by="operator"))
    await learn(scheduling, *events)
    await learn(scheduling, *events)  # announced again, under new envelope ids

    assert len(jobs_sent(scheduling)) == 1 and len(scheduling.events(m.JobScheduled)) == 1


async def test_nothing_is_planned_for_a_benchmark_the_operator_has_not_approved(scheduling):
    await learn(scheduling, m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC), model("model-1"),
                dataset("ds-a", "site-a"), member(m.EntityKind.MODEL, "model-1"), member(m.EntityKind.DATASET, "ds-a"))

    assert jobs_sent(scheduling) == [] and scheduling.events(m.JobScheduled) == []


async def test_a_model_or_dataset_not_approved_for_the_benchmark_gets_no_job(scheduling):
    await learn(scheduling, m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC),
                m.BenchmarkApproved(benchmark_id="bm", approved_by="operator"), model("model-1"), model("model-2", "4"),
                dataset("ds-a", "site-a"), dataset("ds-b", "site-b"), member(m.EntityKind.MODEL, "model-1"),
                member(m.EntityKind.DATASET, "ds-a"))

    assert [(j.data.binding.model_id, j.data.binding.dataset_id) for j in jobs_sent(scheduling)] == [("model-1", "ds-a")]


async def planned_job(scheduling: Harness) -> m.JobSpec:
    await learn(scheduling, m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC),
                m.BenchmarkApproved(benchmark_id="bm", approved_by="operator"), model("model-1"),
                dataset("ds-a", "site-a"), member(m.EntityKind.MODEL, "model-1"), member(m.EntityKind.DATASET, "ds-a"))
    [sent] = jobs_sent(scheduling)
    return sent.data


def report(actors, job_id: str, state: m.JobState = m.JobState.REFUSED, by: str = "site-a", site: str = "site-a",
           reason: str = "the site's policy accepts benchmarks ['other'], not bm; nothing was run",
           ) -> Envelope[m.SiteReport]:
    return actors.key(by).sign(Envelope.wrap(m.SiteReport(job_id=job_id, site_id=site, state=state, reason=reason,
                                                          worker_id="worker-1", at=datetime.now(UTC)),
                                             source=f"site:{site}/worker-1"))


async def test_what_a_site_reports_of_its_job_becomes_the_jobs_state_with_the_reason(scheduling, actors):
    planned = await planned_job(scheduling)
    await scheduling.learn(actors.registered("site-a", m.Role.SITE))

    await scheduling.deliver(subjects.reports("site-a"), report(actors, planned.job_id))

    [changed] = scheduling.events(m.JobStateChanged)
    assert (changed.job_id, changed.state, changed.model_id) == (planned.job_id, m.JobState.REFUSED, "model-1")
    listed = m.JobList.model_validate(await scheduling.ask(actors.sign("anyone", m.ListJobs(site_id="site-a"))))
    [status] = listed.jobs
    assert (status.state, status.reason) == (m.JobState.REFUSED, changed.reason)
    details = m.JobDetails.model_validate(await scheduling.ask(actors.sign("anyone", m.GetJob(job_id=planned.job_id))))
    assert details.job == planned and details.job.model_owner == "vendor"
    done = await scheduling.ask(actors.sign("x", m.ListJobs(state=m.JobState.DONE)))
    assert m.JobList.model_validate(done).jobs == ()


async def test_a_report_not_from_the_jobs_own_site_changes_nothing(scheduling, actors):
    planned = await planned_job(scheduling)
    for site in ("site-a", "site-b"):
        await scheduling.learn(actors.registered(site, m.Role.SITE))
    before = await scheduling.state()

    await scheduling.deliver(subjects.reports("site-b"), report(actors, planned.job_id, by="site-b", site="site-b"))
    await scheduling.deliver(subjects.reports("site-a"), report(actors, planned.job_id, by="site-b"))
    await scheduling.deliver(subjects.reports("site-b"), report(actors, planned.job_id))

    assert [letter.error for letter in scheduling.dead_letters()] == [
        f"site site-b reports on job {planned.job_id}, which was never sent to it",
        "a report naming site site-a is signed by site-b",
        "a report naming site site-a came on assay.v1.reports.site-b; each site reports on its own"]
    assert await scheduling.state() == before and scheduling.events(m.JobStateChanged) == []


async def test_a_job_whose_result_is_on_the_board_stays_done_whatever_a_site_says_later(scheduling, actors):
    planned = await planned_job(scheduling)
    await scheduling.learn(actors.registered("site-a", m.Role.SITE))
    await scheduling.learn(m.ResultAccepted(job_id=planned.job_id, site_id="site-a", binding=planned.binding,
                                            metrics={"auc": 0.9}))

    await scheduling.deliver(subjects.reports("site-a"), report(actors, planned.job_id, m.JobState.FAILED))

    details = m.JobDetails.model_validate(await scheduling.ask(actors.sign("anyone", m.GetJob(job_id=planned.job_id))))
    assert details.status.state is m.JobState.DONE and scheduling.events(m.JobStateChanged) == []


async def test_a_private_model_is_planned_at_a_site_only_once_its_owner_gave_that_site_the_key(scheduling, actors):
    private = m.ImageRef(digest="sha256:" + "3" * 64, name="private",
                         archive=m.Archive(sha256="sha256:" + "9" * 64, size=1000, encrypted=True))
    await scheduling.learn(actors.registered("vendor", m.Role.MODEL_OWNER))
    await learn(scheduling, m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC),
                m.BenchmarkApproved(benchmark_id="bm", approved_by="operator"),
                m.ModelRegistered(model_id="model-1", owner_id="vendor", name="m", image=private),
                dataset("ds-a", "site-a"), dataset("ds-b", "site-b"), member(m.EntityKind.MODEL, "model-1"),
                member(m.EntityKind.DATASET, "ds-a"), member(m.EntityKind.DATASET, "ds-b"))
    assert jobs_sent(scheduling) == []  # no site holds its key yet

    await scheduling.learn(actors.registered("mallory", m.Role.MODEL_OWNER))
    stolen = await scheduling.ask(actors.sign("mallory", m.GrantImageKey(image=private.digest, site_id="site-a",
                                                                         sealed_key="k" * 64)))
    reply = await scheduling.ask(actors.sign("vendor", m.GrantImageKey(image=private.digest, site_id="site-a",
                                                                       sealed_key="sealed-for-a" * 4)))

    assert stolen == {"ok": False, "retry": False,
                      "message": f"image {private.digest} is not mallory's: only its owner gives its key"}
    assert reply["ok"] and reply["message"].endswith("1 job(s) planned for it now")
    [sent] = jobs_sent(scheduling)
    assert (sent.data.site_id, sent.data.keys) == ("site-a", {private.digest: "sealed-for-a" * 4})


async def test_a_revoked_pair_has_its_open_jobs_cancelled_with_the_reason_and_none_planned_again(scheduling, actors):
    planned = await planned_job(scheduling)
    await scheduling.learn(actors.registered("site-a", m.Role.SITE))
    revoked = m.AssociationRevoked(benchmark_id="bm", kind=m.EntityKind.MODEL, entity_id="model-1",
                                   revoked_by="vendor", reason="a bug found in the model")

    await scheduling.learn(revoked)
    await learn(scheduling, dataset("ds-b", "site-b"), member(m.EntityKind.DATASET, "ds-b"))  # the model stays out
    await scheduling.deliver(subjects.reports("site-a"), report(actors, planned.job_id, m.JobState.FAILED))

    [changed] = scheduling.events(m.JobStateChanged)
    assert (changed.job_id, changed.state) == (planned.job_id, m.JobState.CANCELLED)
    assert changed.reason == "model model-1 was revoked from bm by vendor: a bug found in the model"
    details = m.JobDetails.model_validate(await scheduling.ask(actors.sign("anyone", m.GetJob(job_id=planned.job_id))))
    assert details.status.state is m.JobState.CANCELLED  # a site's later word does not bring it back
    assert len(jobs_sent(scheduling)) == 1


async def test_a_cancelled_job_is_put_signed_where_its_site_looks_it_up(scheduling, actors):
    planned = await planned_job(scheduling)

    await scheduling.learn(m.AssociationRevoked(benchmark_id="bm", kind=m.EntityKind.MODEL, entity_id="model-1",
                                                revoked_by="vendor", reason="a bug found in the model"))

    [notice] = scheduling.published(subjects.cancelled("site-a", planned.job_id))
    cancelled = Envelope[m.JobCancelled].model_validate(notice)
    verify(cancelled, actors.key("scheduling").public_key)
    assert cancelled.data == m.JobCancelled(job_id=planned.job_id, site_id="site-a",
                                            reason="model model-1 was revoked from bm by vendor: a bug found in the "
                                                   "model")


async def test_a_pair_approved_again_after_a_revocation_is_planned_anew_and_a_suspended_site_is_not(
        scheduling, actors):
    planned = await planned_job(scheduling)
    await scheduling.learn(m.AssociationRevoked(benchmark_id="bm", kind=m.EntityKind.MODEL, entity_id="model-1",
                                                revoked_by="vendor", reason="a bug found in the model"))

    await scheduling.learn(member(m.EntityKind.MODEL, "model-1"))  # asked again, approved again
    await scheduling.learn(member(m.EntityKind.MODEL, "model-1"))  # announced twice: still one new job

    again = [job.data for job in jobs_sent(scheduling)][1:]
    assert [job.job_id for job in again] == [f"{planned.job_id}-r1"]
    assert again[0].binding == planned.binding
    await scheduling.learn(m.ActorRegistered(actor_id="site-a", role=m.Role.SITE, display_name="a",
                                             public_key=actors.key("site-a").public_key,
                                             key_id=actors.key("site-a").key_id))
    await scheduling.learn(m.ActorSuspended(actor_id="site-a", role=m.Role.SITE, suspended_by="operator",
                                            reason="key leaked"))
    await scheduling.learn(m.AssociationRevoked(benchmark_id="bm", kind=m.EntityKind.MODEL, entity_id="model-1",
                                                revoked_by="vendor", reason="again"))
    await scheduling.learn(member(m.EntityKind.MODEL, "model-1"))
    assert len(jobs_sent(scheduling)) == 2  # the suspended site gets nothing anew


async def refused_job(scheduling: Harness, actors) -> m.JobSpec:  # type: ignore[no-untyped-def]
    """A job its site refused: its image was not there."""
    planned = await planned_job(scheduling)
    for name, role in (("site-a", m.Role.SITE), ("site-b", m.Role.SITE), ("owner", m.Role.BENCHMARK_OWNER),
                       ("vendor", m.Role.MODEL_OWNER), ("operator", m.Role.OPERATOR)):
        await scheduling.learn(actors.registered(name, role))
    await scheduling.deliver(subjects.reports("site-a"), report(
        actors, planned.job_id, reason=f"image {planned.binding.model_image} is not present at this site"))
    return planned


async def test_a_refused_job_retried_by_its_benchmarks_owner_runs_again_as_a_new_round(scheduling, actors):
    planned = await refused_job(scheduling, actors)

    reply = await scheduling.ask(actors.sign("owner", m.RetryJobs(job_id=planned.job_id[:12])))

    again = f"{planned.job_id}-r1"
    assert reply == {"ok": True, "retry": False, "message": f"1 job(s) sent again: {planned.job_id} as {again}"}
    sent = jobs_sent(scheduling)[-1]
    verify(sent, actors.key("scheduling").public_key)
    assert (sent.data.job_id, sent.data.binding, sent.data.site_id) == (again, planned.binding, "site-a")
    assert scheduling.events(m.JobScheduled)[-1].job == sent.data
    old = m.JobDetails.model_validate(await scheduling.ask(actors.sign("x", m.GetJob(job_id=planned.job_id))))
    assert (old.status.state, old.status.retried_as) == (m.JobState.REFUSED, again)
    assert old.status.reason.endswith(f"; retried as {again}")
    twice = await scheduling.ask(actors.sign("owner", m.RetryJobs(job_id=planned.job_id)))
    assert twice["message"].startswith(f"job {planned.job_id} was retried already")


async def test_only_the_operator_the_benchmarks_owner_and_the_jobs_site_retry_and_only_what_failed(
        scheduling, actors):
    planned = await refused_job(scheduling, actors)

    stranger = await scheduling.ask(actors.sign("site-b", m.RetryJobs(job_id=planned.job_id)))
    vendor = await scheduling.ask(actors.sign("vendor", m.RetryJobs(job_id=planned.job_id)))
    nothing = await scheduling.ask(actors.sign("site-b", m.RetryJobs(failed=True)))
    mine = await scheduling.ask(actors.sign("site-a", m.RetryJobs(failed=True, site_id="site-a")))
    [retried] = [j.data for j in jobs_sent(scheduling)][1:]
    again = await scheduling.ask(actors.sign("operator", m.RetryJobs(job_id=retried.job_id)))

    assert stranger["message"] == (f"site-b may not retry job {planned.job_id}: the operator, the owner of benchmark "
                                   "bm and site site-a may")
    assert vendor["message"] == "actor vendor has role model_owner; this command needs operator, benchmark_owner, site"
    assert nothing["message"] == "0 job(s) sent again: none REFUSED or FAILED"
    assert mine["message"] == f"1 job(s) sent again: {planned.job_id} as {planned.job_id}-r1"
    assert again["message"] == f"job {retried.job_id} is SCHEDULED: only a REFUSED or FAILED job is retried"


def letter(job_id: str, site: str = "site-a", error: str = "invalid Job: data.binding: Field required",
           on: str | None = None) -> tuple[str, Envelope[m.DeadLetter]]:
    consumer = f"site-{site}-jobs"
    said = m.DeadLetter(consumer=consumer, subject=subjects.jobs(site), message_id=job_id, deliveries=1, error=error)
    return on or subjects.dead_letter(consumer), Envelope.wrap(said, source=f"site:{site}/worker-1")


async def test_a_job_its_site_gave_up_on_without_a_word_is_failed_with_the_reason_and_kept_for_the_operator(
        scheduling, actors):
    planned = await planned_job(scheduling)
    await scheduling.learn(actors.registered("operator", m.Role.OPERATOR))
    await scheduling.learn(actors.registered("site-a", m.Role.SITE))
    await scheduling.deliver(*letter(planned.job_id, site="site-b", on=subjects.dead_letter("site-site-a-jobs")))
    untouched = m.JobDetails.model_validate(await scheduling.ask(actors.sign("x", m.GetJob(job_id=planned.job_id))))

    await scheduling.deliver(*letter(planned.job_id))

    [changed] = scheduling.events(m.JobStateChanged)
    assert untouched.status.state is m.JobState.SCHEDULED  # a letter naming another site's queue changes nothing
    assert (changed.job_id, changed.state, changed.reason) == (
        planned.job_id, m.JobState.FAILED, "its site gave up on it after 1 deliveries: invalid Job: data.binding: "
                                           "Field required")
    listed = m.DeadLetterList.model_validate(await scheduling.ask(actors.sign(
        "operator", m.ListDeadLetters(consumer="site-site-a-jobs"))))
    assert [(x.consumer, x.message_id) for x in listed.letters] == [("site-site-a-jobs", planned.job_id)]
    refused = await scheduling.ask(actors.sign("site-a", m.ListDeadLetters()))
    assert refused["message"] == "actor site-a has role site; this command needs operator"
    # the site's own word, sent before the letter but read after it, is what stands
    await scheduling.deliver(subjects.reports("site-a"), report(actors, planned.job_id))
    details = m.JobDetails.model_validate(await scheduling.ask(actors.sign("x", m.GetJob(job_id=planned.job_id))))
    assert details.status.state is m.JobState.REFUSED


async def test_jobs_are_measured_by_state_and_each_sites_queue_by_what_it_has_not_finished(scheduling, actors, metrics):
    planned = await refused_job(scheduling, actors)
    await scheduling.ask(actors.sign("owner", m.RetryJobs(job_id=planned.job_id)))  # counted as its new round only
    await learn(scheduling, dataset("ds-b", "site-b"), member(m.EntityKind.DATASET, "ds-b"))
    [at_b] = [sent.data for sent in jobs_sent(scheduling) if sent.data.site_id == "site-b"]
    await scheduling.deliver(subjects.reports("site-b"), report(actors, at_b.job_id, m.JobState.RUNNING, by="site-b",
                                                                site="site-b", reason="worker-1 runs it"))
    await scheduling.learn(m.ResultAccepted(job_id=f"{planned.job_id}-r1", site_id="site-a", binding=planned.binding))
    await scheduling.app.gauges.refresh()  # the store is read every few seconds; a test does not wait

    jobs = measured(metrics, JOBS)
    assert {at: count for at, count in jobs.items() if count} == {
        series(state="DONE", benchmark_id="bm", site_id="site-a"): 1,
        series(state="RUNNING", benchmark_id="bm", site_id="site-b"): 1}
    assert len(jobs) == 2 * len(m.JobState)  # every state of each benchmark and site, 0 too: none goes stale
    assert measured(metrics, QUEUE) == {series(site_id="site-a"): 0, series(site_id="site-b"): 1}
    assert measured(metrics, OUTBOX_PENDING) == {(): 0} and measured(metrics, OUTBOX_OLDEST) == {(): 0}
    assert measured(metrics, OUTBOX_LAG) == {(): len(scheduling.published(">"))}  # each message it relayed


def arrival(envelope: Envelope[Any], subject: str) -> Arrival:
    return Arrival(envelope, envelope.model_dump_json().encode(), subject, otel_context.get_current())


async def test_the_reports_and_results_of_one_fetch_taken_together_leave_what_each_would_leave_in_turn(
        scheduling, actors):
    planned = await planned_job(scheduling)
    await learn(scheduling, dataset("ds-b", "site-b"), member(m.EntityKind.DATASET, "ds-b"))
    [at_b] = [sent.data for sent in jobs_sent(scheduling) if sent.data.site_id == "site-b"]
    for site in ("site-a", "site-b"):
        await scheduling.learn(actors.registered(site, m.Role.SITE))
    running = report(actors, planned.job_id, m.JobState.RUNNING, reason="worker-1 runs it")
    said = [running, report(actors, at_b.job_id, m.JobState.FAILED, by="site-b", site="site-b", reason="exit 2"),
            report(actors, planned.job_id, m.JobState.HELD, reason="its result waits at the site")]
    units = scheduling.app.units  # type: ignore[attr-defined]

    async with units.transaction() as unit:  # what the edge does with one fetch's batch (service_kit.together)
        await record_reports([arrival(r, subjects.reports(r.data.site_id)) for r in said], unit, None)
    async with units.transaction() as unit:
        await mark_all_done([arrival(actors.announce(m.ResultAccepted(job_id=at_b.job_id, site_id="site-b",
                                                                      binding=at_b.binding)),
                                     subjects.evt("result", "accepted"))], unit, None)
    await scheduling.settle()

    assert [(e.job_id, e.state) for e in scheduling.events(m.JobStateChanged)] == [
        (planned.job_id, m.JobState.RUNNING), (at_b.job_id, m.JobState.FAILED), (planned.job_id, m.JobState.HELD)]
    listed = m.JobList.model_validate(await scheduling.ask(actors.sign("x", m.ListJobs())))
    assert {(job.job_id, job.state, job.reason) for job in listed.jobs} == {
        (planned.job_id, m.JobState.HELD, "its result waits at the site"), (at_b.job_id, m.JobState.DONE, "")}


async def test_a_refused_report_in_a_fetch_undoes_its_batch_so_each_is_handled_alone(scheduling, actors):
    planned = await planned_job(scheduling)
    for site in ("site-a", "site-b"):
        await scheduling.learn(actors.registered(site, m.Role.SITE))
    before = await scheduling.state()
    forged = report(actors, planned.job_id, m.JobState.FAILED, by="site-b")  # site-a's word, signed by another

    with pytest.raises(Refused):  # service_kit.together rolls the batch back and delivers each alone
        async with scheduling.app.units.transaction() as unit:  # type: ignore[attr-defined]
            await record_reports([arrival(report(actors, planned.job_id), subjects.reports("site-a")),
                                  arrival(forged, subjects.reports("site-a"))], unit, None)

    assert await scheduling.state() == before
