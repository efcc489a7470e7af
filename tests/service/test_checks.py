"""Checks before joining, under the test broker: a request plans its check (a model on the benchmark's demo data at
its check site, the reference model on a dataset at its site); the leaderboard verifies a check's result like any
result and announces it to the approver, never on the board; the approver sees it, a failed check is approved only
with an override, and a policy approves only what passed."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from contracts import messages as m
from contracts import subjects
from contracts.envelope import Envelope
from contracts.sealing import SealError, seal, unseal
from contracts.signing import metrics_hash
from tests.support.service import Actors, Harness

PREPARATOR = m.ImageRef(digest="sha256:" + "1" * 64, name="prep")
REFERENCE = m.ImageRef(digest="sha256:" + "4" * 64, name="reference")
EVALUATOR = m.ImageRef(digest="sha256:" + "2" * 64, name="ev")
MODEL_IMAGE = m.ImageRef(digest="sha256:" + "3" * 64, name="m")
DEMO = m.DemoData(archive=m.Archive(sha256="sha256:" + "e" * 64, size=4096), cases=20)
SPEC = m.BenchmarkSpec(benchmark_id="bm", name="Benchmark", preparator=PREPARATOR, reference_model=REFERENCE,
                       evaluator=EVALUATOR, metrics=(m.MetricSpec(name="auc", kind=m.MetricKind.AUC),),
                       primary_metric="auc", demo_data=DEMO, check_site="owner")
MODEL = dict(benchmark_id="bm", kind=m.EntityKind.MODEL, entity_id="model-1")
DATASET = dict(benchmark_id="bm", kind=m.EntityKind.DATASET, entity_id="ds-a")
LATER = datetime(2100, 1, 1, tzinfo=UTC)


def dataset_registered() -> m.DatasetRegistered:
    return m.DatasetRegistered(dataset_id="ds-a", site_id="hospital", benchmark_id="bm", name="ds",
                               content_hash="sha256:" + "d" * 64, case_count=40, statistics={})


# --- scheduling: what a request plans ----------------------------------------------------------------------


async def scheduling_world(scheduling: Harness, spec: m.BenchmarkSpec = SPEC) -> None:
    for event in (m.BenchmarkRegistered(owner_id="owner", benchmark=spec),
                  m.BenchmarkApproved(benchmark_id="bm", approved_by="operator"),
                  m.ModelRegistered(model_id="model-1", owner_id="vendor", name="m", image=MODEL_IMAGE),
                  dataset_registered()):
        await scheduling.learn(event)


def jobs_sent(scheduling: Harness) -> list[m.JobSpec]:
    return [Envelope[m.JobSpec].model_validate(sent).data for sent in scheduling.published(subjects.JOBS_ALL)]


async def test_a_models_request_plans_its_check_on_the_demo_data_at_the_check_site(scheduling, actors):
    await scheduling_world(scheduling)

    await scheduling.learn(m.AssociationRequested(**MODEL, requested_by="vendor"))

    [check] = jobs_sent(scheduling)
    assert (check.site_id, check.check, check.demo_data) == ("owner", m.CheckOf(kind=m.EntityKind.MODEL,
                                                                                 entity_id="model-1"), DEMO)
    assert (check.binding.model_image, check.binding.dataset_hash, check.binding.case_count) == (
        MODEL_IMAGE.digest, DEMO.archive.sha256, 20)
    assert check.preparator == PREPARATOR.digest  # raw demo data: the check site prepares it first
    assert check.pooling is None  # a check sends no replicates: it is never pooled
    assert [e.job for e in scheduling.events(m.JobScheduled)] == [check]


async def test_a_datasets_request_plans_the_reference_model_on_it_at_its_own_site(scheduling, actors):
    await scheduling_world(scheduling)

    await scheduling.learn(m.AssociationRequested(**DATASET, requested_by="hospital"))

    [check] = jobs_sent(scheduling)
    assert (check.site_id, check.check, check.demo_data, check.model_owner) == (
        "hospital", m.CheckOf(kind=m.EntityKind.DATASET, entity_id="ds-a"), None, "owner")
    assert (check.binding.model_image, check.binding.dataset_id, check.binding.case_count) == (
        REFERENCE.digest, "ds-a", 40)


async def test_each_request_runs_its_own_check_and_a_benchmark_without_demo_data_checks_no_model(scheduling):
    await scheduling_world(scheduling, SPEC.model_copy(update={"demo_data": None, "check_site": None}))

    await scheduling.learn(m.AssociationRequested(**MODEL, requested_by="vendor"))
    await scheduling.learn(m.AssociationRequested(**DATASET, requested_by="hospital"))
    await scheduling.learn(m.AssociationRequested(**DATASET, requested_by="hospital"))  # asked again after a fix

    assert [j.check.kind for j in jobs_sent(scheduling) if j.check] == [m.EntityKind.DATASET] * 2
    assert len({j.job_id for j in jobs_sent(scheduling)}) == 2


async def test_a_completed_check_is_done_and_listed_as_a_check(scheduling, actors):
    await scheduling_world(scheduling)
    await scheduling.learn(m.AssociationRequested(**DATASET, requested_by="hospital"))
    [check] = jobs_sent(scheduling)

    await scheduling.learn(m.CheckCompleted(job_id=check.job_id, site_id="hospital", benchmark_id="bm",
                                            kind=m.EntityKind.DATASET, entity_id="ds-a", sealed_metrics="x",
                                            case_count=40))

    listed = m.JobList.model_validate(await scheduling.ask(actors.sign("owner", m.ListJobs(benchmark_id="bm"))))
    assert [(j.job_id, j.state, j.check) for j in listed.jobs] == [(check.job_id, m.JobState.DONE, check.check)]


# --- leaderboard: a check's result is verified and announced, never counted ---------------------------------


def check_result(actors: Actors, *, signer: str = "hospital") -> Envelope[m.SiteResult]:
    job = m.JobSpec(job_id="check-1", site_id="hospital", metrics=SPEC.metrics, expires_at=LATER,
                    check=m.CheckOf(kind=m.EntityKind.DATASET, entity_id="ds-a"), binding=m.JobBinding(
                        benchmark_id="bm", model_id="reference-model", dataset_id="ds-a",
                        model_image=REFERENCE.digest, evaluator_image=EVALUATOR.digest,
                        dataset_hash="sha256:" + "d" * 64, case_count=40))
    signed_job = actors.key("scheduling").sign(Envelope.wrap(job, source="service:scheduling", id=job.job_id))
    metrics = {"auc": 0.91}
    result = m.SiteResult(job_id=job.job_id, site_id="hospital", binding=job.binding, metrics=metrics,
                          metrics_hash=metrics_hash(metrics), worker_id="w", finished_at=datetime.now(UTC),
                          job=signed_job)
    return actors.key(signer).sign(Envelope.wrap(result, source="site:hospital"))


async def leaderboard_world(leaderboard: Harness, actors: Actors) -> None:
    for name, role in (("hospital", m.Role.SITE), ("intruder", m.Role.SITE), ("owner", m.Role.BENCHMARK_OWNER)):
        await leaderboard.learn(actors.registered(name, role))
    await leaderboard.learn(m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC))


async def test_a_checks_result_is_verified_announced_to_the_approver_and_never_on_the_board(leaderboard, actors):
    await leaderboard_world(leaderboard, actors)  # the pair is only requested: no approval is needed for a check

    await leaderboard.deliver(subjects.results("hospital"), check_result(actors))

    [checked] = leaderboard.events(m.CheckCompleted)
    assert checked.model_copy(update={"sealed_metrics": ""}) == m.CheckCompleted(
        job_id="check-1", site_id="hospital", benchmark_id="bm", kind=m.EntityKind.DATASET, entity_id="ds-a",
        sealed_metrics="", case_count=40)
    assert json.loads(unseal(checked.sealed_metrics, actors.key("approval"))) == {"auc": 0.91}  # for it alone
    with pytest.raises(SealError):
        unseal(checked.sealed_metrics, actors.key("hospital"))
    assert leaderboard.events(m.ResultAccepted) == [] and leaderboard.events(m.LeaderboardUpdated) == []
    board = m.Leaderboard.model_validate(await leaderboard.ask(actors.sign("owner", m.ShowLeaderboard(
        benchmark_id="bm"))))
    assert board.rows == ()


async def test_a_checks_result_signed_by_another_site_is_rejected_and_announces_nothing(leaderboard, actors):
    await leaderboard_world(leaderboard, actors)

    await leaderboard.deliver(subjects.results("hospital"), check_result(actors, signer="intruder"))

    [rejected] = leaderboard.events(m.ResultRejected)
    assert rejected.reason.startswith("signer_site:")
    assert leaderboard.events(m.CheckCompleted) == []


# --- approval: the approver sees the check; a failed one takes an override; a policy waits for a pass ------


async def approval_world(approval: Harness, actors: Actors, spec: m.BenchmarkSpec = SPEC) -> None:
    for name, role in (("operator", m.Role.OPERATOR), ("owner", m.Role.BENCHMARK_OWNER),
                       ("vendor", m.Role.MODEL_OWNER), ("hospital", m.Role.SITE)):
        await approval.learn(actors.registered(name, role))
    await approval.learn(m.BenchmarkRegistered(owner_id="owner", benchmark=spec))
    await approval.learn(m.ModelRegistered(model_id="model-1", owner_id="vendor", name="m", image=MODEL_IMAGE))
    await approval.learn(dataset_registered())
    assert (await approval.ask(actors.sign("operator", m.ApproveBenchmark(benchmark_id="bm"))))["ok"]


def planned(kind: m.EntityKind, entity_id: str, site: str, job_id: str = "check-1") -> m.JobScheduled:
    return m.JobScheduled(job=m.JobSpec(
        job_id=job_id, site_id=site, metrics=SPEC.metrics, expires_at=LATER,
        check=m.CheckOf(kind=kind, entity_id=entity_id), binding=m.JobBinding(
            benchmark_id="bm", model_id="model-1", dataset_id="demo-data", model_image=MODEL_IMAGE.digest,
            evaluator_image=EVALUATOR.digest, dataset_hash=DEMO.archive.sha256, case_count=20)))


def failed(job_id: str = "check-1") -> m.JobStateChanged:
    return m.JobStateChanged(job_id=job_id, site_id="owner", benchmark_id="bm", model_id="model-1",
                             state=m.JobState.FAILED, reason="the model failed (exit code 2); its log is kept at the "
                                                             "site", check=m.CheckOf(kind=m.EntityKind.MODEL,
                                                                                    entity_id="model-1"))


def passed(actors: Actors, kind: m.EntityKind, entity_id: str, job_id: str = "check-1") -> m.CheckCompleted:
    sealed = seal(json.dumps({"auc": 0.87}).encode(), actors.key("approval").public_key)
    return m.CheckCompleted(job_id=job_id, site_id="owner", benchmark_id="bm", kind=kind, entity_id=entity_id,
                            sealed_metrics=sealed, case_count=20)


async def pairs(approval: Harness, actors: Actors, asker: str = "owner") -> dict[str, m.AssociationView]:
    listed = m.AssociationList.model_validate(await approval.ask(actors.sign(asker, m.ListAssociations())))
    return {pair.entity_id: pair for pair in listed.associations}


async def test_the_approver_sees_the_checks_metrics_beside_the_request(approval, actors):
    await approval_world(approval, actors)
    asked = await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))
    await approval.learn(planned(m.EntityKind.MODEL, "model-1", "owner"))
    waiting = (await pairs(approval, actors))["model-1"].check

    await approval.learn(passed(actors, m.EntityKind.MODEL, "model-1"))

    seen = (await pairs(approval, actors))["model-1"]
    assert "who sees its check (on the benchmark's demo data)" in asked["message"]
    assert waiting is not None and (waiting.state, waiting.site_id) == ("SCHEDULED", "owner")
    assert seen.check is not None and (seen.status, seen.check.state, seen.check.metrics) == (
        "REQUESTED", "PASSED", {"auc": 0.87})
    assert (await pairs(approval, actors, "vendor"))["model-1"].check == seen.check  # the requester sees it too
    assert (await approval.ask(actors.sign("owner", m.ApproveAssociation(**MODEL))))["ok"]


async def test_a_request_whose_check_failed_is_approved_only_with_an_override_kept_in_its_history(approval, actors):
    await approval_world(approval, actors)
    await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))
    await approval.learn(planned(m.EntityKind.MODEL, "model-1", "owner"))
    await approval.learn(failed())

    refused = await approval.ask(actors.sign("owner", m.ApproveAssociation(**MODEL)))
    blank = await approval.ask(actors.sign("owner", m.ApproveAssociation(**MODEL, override="  ")))
    before = approval.events(m.AssociationApproved)
    overridden = await approval.ask(actors.sign("owner", m.ApproveAssociation(
        **MODEL, override="the failure is the demo data's, fixed in the next version")))

    assert refused == blank == {"ok": False, "retry": False, "message": (
        "the check of model model-1 in benchmark bm failed (failed: the model failed (exit code 2); its log is kept "
        "at the site); approve it only with --override REASON, which is kept in its history")}
    assert before == [] and overridden["ok"]
    pair = (await pairs(approval, actors))["model-1"]
    assert (pair.status, pair.history[-1].action, pair.history[-1].reason) == (
        "APPROVED", "approved", "check overridden: the failure is the demo data's, fixed in the next version")
    assert pair.check is not None and pair.check.state == "FAILED"


async def test_a_policy_approves_a_request_only_once_its_check_passed(approval, actors):
    await approval_world(approval, actors)
    for kind in (m.EntityKind.MODEL, m.EntityKind.DATASET):
        await approval.ask(actors.sign("owner", m.SetApprovalPolicy(benchmark_id="bm", kind=kind,
                                                                  mode=m.ApprovalMode.ALWAYS)))
    await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))
    await approval.ask(actors.sign("hospital", m.RequestAssociation(**DATASET)))
    await approval.learn(planned(m.EntityKind.MODEL, "model-1", "owner"))
    await approval.learn(planned(m.EntityKind.DATASET, "ds-a", "hospital", "check-2"))
    waiting = approval.events(m.AssociationApproved)

    await approval.learn(failed())
    await approval.learn(passed(actors, m.EntityKind.DATASET, "ds-a", "check-2"))

    assert waiting == []
    assert approval.events(m.AssociationApproved) == [m.AssociationApproved(**DATASET, approved_by="owner",
                                                                            by_policy=True)]
    assert (await pairs(approval, actors))["model-1"].status == "REQUESTED"  # a failed check waits for its owner


async def test_a_benchmark_without_demo_data_lets_its_policy_approve_a_model_at_once(approval, actors):
    await approval_world(approval, actors, SPEC.model_copy(update={"demo_data": None, "check_site": None}))
    await approval.ask(actors.sign("owner", m.SetApprovalPolicy(benchmark_id="bm", kind=m.EntityKind.MODEL,
                                                              mode=m.ApprovalMode.ALWAYS)))

    reply = await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))

    assert reply["message"] == "model model-1 approved for bm by the benchmark's approval policy"


async def test_asking_again_runs_a_new_check_and_forgets_the_last_ones_word(approval, actors):
    await approval_world(approval, actors)
    await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))
    await approval.learn(planned(m.EntityKind.MODEL, "model-1", "owner"))
    await approval.learn(failed())
    await approval.ask(actors.sign("owner", m.RejectAssociation(**MODEL, reason="its check failed")))

    await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))
    cleared = (await pairs(approval, actors))["model-1"].check
    await approval.learn(planned(m.EntityKind.MODEL, "model-1", "owner", "check-2"))
    await approval.learn(failed("check-1"))  # the old check's late word changes nothing
    await approval.learn(passed(actors, m.EntityKind.MODEL, "model-1", "check-2"))

    check = (await pairs(approval, actors))["model-1"].check
    assert cleared is None
    assert check is not None and (check.job_id, check.state) == ("check-2", "PASSED")
    assert (await approval.ask(actors.sign("owner", m.ApproveAssociation(**MODEL))))["ok"]


# --- registry: the check site is the benchmark owner's own ---------------------------------------------------


async def registry_world(registry: Harness, actors: Actors) -> None:
    await registry.ask(actors.sign("operator", m.RegisterOrganisation(organisation_id="committee-org",
                                                                      name="Committee")))
    for name, role, org, also in (("owner", m.Role.BENCHMARK_OWNER, "committee-org", (m.Role.SITE,)),
                                  ("owner-lab", m.Role.SITE, "committee-org", ()),
                                  ("hospital", m.Role.SITE, None, ())):
        reply = await registry.ask(actors.sign("operator", m.RegisterActor(
            actor_id=name, role=role, public_key=actors.key(name).public_key, display_name=name, also=also,
            organisation=org)))
        assert reply["ok"], reply


async def test_the_check_site_must_be_a_site_of_the_benchmark_owner(registry, actors):
    await registry.learn(actors.registered("operator", m.Role.OPERATOR))
    await registry_world(registry, actors)

    def spec(site: str, benchmark_id: str = "bm") -> m.RegisterBenchmark:
        return m.RegisterBenchmark(benchmark=SPEC.model_copy(update={"check_site": site,
                                                                     "benchmark_id": benchmark_id}))

    unknown = await registry.ask(actors.sign("owner", spec("nowhere")))
    foreign = await registry.ask(actors.sign("owner", spec("hospital")))
    own = await registry.ask(actors.sign("owner", spec("owner")))
    organisations = await registry.ask(actors.sign("owner", spec("owner-lab", "bm-2")))

    assert unknown["message"].startswith("check_site 'nowhere' is not a registered site")
    assert foreign["message"] == ("check_site hospital is not owner's own: models are checked at a site of the "
                                  "benchmark owner's organisation (committee-org)")
    assert own["ok"] and organisations["ok"]
