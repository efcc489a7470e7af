"""Approval under the test broker: the operator approves benchmarks; an owner asks to join with what it owns; only
the benchmark's owner consents; each step is announced once and every refusal says why."""

from __future__ import annotations

from contracts import messages as m
from tests.support.service import Actors, Harness

IMAGE = m.ImageRef(digest="sha256:" + "1" * 64, name="img")
SPEC = m.BenchmarkSpec(benchmark_id="bm", name="Benchmark", preparator=IMAGE, reference_model=IMAGE, evaluator=IMAGE,
                       metrics=(m.MetricSpec(name="auc"),), primary_metric="auc")
MODEL = dict(benchmark_id="bm", kind=m.EntityKind.MODEL, entity_id="model-1")


async def world(approval: Harness, actors: Actors, *, approved: bool = True) -> None:
    """The actors, the benchmark and a model, as the registry announces them."""
    for name, role in (("operator", m.Role.OPERATOR), ("owner", m.Role.BENCHMARK_OWNER),
                       ("vendor", m.Role.MODEL_OWNER), ("rival", m.Role.MODEL_OWNER), ("hospital", m.Role.SITE)):
        await approval.learn(actors.registered(name, role))
    await approval.learn(m.BenchmarkRegistered(owner_id="owner", benchmark=SPEC))
    await approval.learn(m.ModelRegistered(model_id="model-1", owner_id="vendor", name="m", image=IMAGE))
    if approved:
        assert (await approval.ask(actors.sign("operator", m.ApproveBenchmark(benchmark_id="bm"))))["ok"]


async def test_the_operator_approves_a_benchmark_once(approval, actors):
    await world(approval, actors, approved=False)

    first = await approval.ask(actors.sign("operator", m.ApproveBenchmark(benchmark_id="bm")))
    again = await approval.ask(actors.sign("operator", m.ApproveBenchmark(benchmark_id="bm")))

    assert (first["message"], again["message"]) == ("benchmark bm approved: OPERATION", "benchmark bm is already approved")
    assert approval.events(m.BenchmarkApproved) == [m.BenchmarkApproved(benchmark_id="bm", approved_by="operator")]


async def test_a_model_joins_when_its_owner_asks_and_the_benchmark_owner_approves(approval, actors):
    await world(approval, actors)

    asked = await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))
    approved = await approval.ask(actors.sign("owner", m.ApproveAssociation(**MODEL)))
    again = await approval.ask(actors.sign("owner", m.ApproveAssociation(**MODEL)))

    assert asked["message"] == "model model-1 asked to join bm; waiting for the benchmark owner"
    assert (approved["message"], again["message"]) == ("model model-1 approved for bm", "already approved")
    assert approval.events(m.AssociationRequested) == [m.AssociationRequested(**MODEL, requested_by="vendor")]
    assert approval.events(m.AssociationApproved) == [m.AssociationApproved(**MODEL, approved_by="owner")]


async def test_nobody_but_the_owner_of_a_model_may_ask_for_it(approval, actors):
    await world(approval, actors)

    reply = await approval.ask(actors.sign("rival", m.RequestAssociation(**MODEL)))

    assert reply["message"] == "model model-1 belongs to vendor, not to rival"
    assert approval.events(m.AssociationRequested) == []


async def test_nothing_joins_a_benchmark_the_operator_has_not_approved(approval, actors):
    await world(approval, actors, approved=False)

    reply = await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))

    assert reply["message"] == "benchmark bm is not approved by the operator yet"


async def test_only_the_benchmarks_owner_approves_and_only_what_was_asked(approval, actors):
    await world(approval, actors)
    await approval.learn(actors.registered("owner-2", m.Role.BENCHMARK_OWNER))

    unasked = await approval.ask(actors.sign("owner", m.ApproveAssociation(**MODEL)))
    await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))
    stranger = await approval.ask(actors.sign("owner-2", m.ApproveAssociation(**MODEL)))

    assert unasked["message"].startswith("nobody asked for this association")
    assert stranger["message"] == "only the owner of benchmark bm (owner) may approve its members"
    assert approval.events(m.AssociationApproved) == []


async def test_a_dataset_joins_only_the_benchmark_it_was_prepared_for(approval, actors):
    await world(approval, actors)
    await approval.learn(m.DatasetRegistered(dataset_id="ds-1", site_id="hospital", benchmark_id="other", name="d",
                                             content_hash="sha256:" + "d" * 64, case_count=2, statistics={}))

    reply = await approval.ask(actors.sign("hospital", m.RequestAssociation(
        benchmark_id="bm", kind=m.EntityKind.DATASET, entity_id="ds-1")))

    assert reply["message"] == "dataset ds-1 was prepared for benchmark other, not bm"


async def test_asking_for_what_is_not_registered_yet_is_refused_for_now(approval, actors):
    await world(approval, actors)

    reply = await approval.ask(actors.sign("vendor", m.RequestAssociation(
        benchmark_id="bm", kind=m.EntityKind.MODEL, entity_id="model-9")))

    assert (reply["retry"], reply["message"]) == (True, "model 'model-9' is not known (register it first)")


DATASET = dict(benchmark_id="bm", kind=m.EntityKind.DATASET, entity_id="ds-1")


async def with_dataset(approval: Harness) -> None:
    await approval.learn(m.DatasetRegistered(dataset_id="ds-1", site_id="hospital", benchmark_id="bm", name="d",
                                             content_hash="sha256:" + "d" * 64, case_count=2, statistics={}))


async def test_the_operator_rejects_a_benchmark_with_a_reason_and_nothing_may_join_it(approval, actors):
    await world(approval, actors, approved=False)

    rejected = await approval.ask(actors.sign("operator", m.RejectBenchmark(benchmark_id="bm",
                                                                            reason="no reference model results")))
    asked = await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))

    assert rejected["message"] == "benchmark bm rejected: no reference model results"
    assert approval.events(m.BenchmarkRejected) == [m.BenchmarkRejected(benchmark_id="bm", rejected_by="operator",
                                                                        reason="no reference model results")]
    assert asked["message"] == "benchmark bm was rejected by the operator: no reference model results"


async def test_a_rejected_request_keeps_its_reason_and_its_owner_may_ask_again(approval, actors):
    await world(approval, actors)
    await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))

    no = await approval.ask(actors.sign("owner", m.RejectAssociation(**MODEL, reason="the image is 40 GB")))
    again = await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))
    listed = m.AssociationList.model_validate(await approval.ask(actors.sign("owner", m.ListAssociations())))

    assert no["message"] == "model model-1 rejected for bm: the image is 40 GB"
    assert again["message"] == "model model-1 asked to join bm; waiting for the benchmark owner"
    (pair,) = listed.associations
    assert pair.status == "REQUESTED" and [(h.action, h.actor, h.reason) for h in pair.history] == [
        ("requested", "vendor", ""), ("rejected", "owner", "the image is 40 GB"), ("requested", "vendor", "")]
    assert approval.events(m.AssociationRejected) == [m.AssociationRejected(**MODEL, rejected_by="owner",
                                                                            reason="the image is 40 GB")]


async def test_either_side_revokes_and_the_revocation_is_announced_with_its_reason(approval, actors):
    await world(approval, actors)
    await with_dataset(approval)
    await approval.ask(actors.sign("hospital", m.RequestAssociation(**DATASET)))
    await approval.ask(actors.sign("owner", m.ApproveAssociation(**DATASET)))

    stranger = await approval.ask(actors.sign("vendor", m.RevokeAssociation(**DATASET, reason="mine now")))
    revoked = await approval.ask(actors.sign("hospital", m.RevokeAssociation(**DATASET, reason="ethics review")))

    assert stranger["ok"] is False and stranger["message"].startswith("only owner or hospital may revoke")
    assert revoked["message"].startswith("dataset ds-1 revoked from bm: ethics review; its open jobs are cancelled")
    assert approval.events(m.AssociationRevoked) == [m.AssociationRevoked(**DATASET, revoked_by="hospital",
                                                                          reason="ethics review")]


async def test_an_invitation_accepted_by_the_entitys_owner_is_the_two_consents(approval, actors):
    await world(approval, actors)

    invited = await approval.ask(actors.sign("owner", m.InviteAssociation(**MODEL)))
    accepted = await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))

    assert invited["message"].startswith("model model-1 invited to join bm")
    assert accepted["message"] == "model model-1 approved for bm"
    assert approval.events(m.AssociationInvited) == [m.AssociationInvited(**MODEL, invited_by="owner")]
    assert approval.events(m.AssociationApproved) == [m.AssociationApproved(**MODEL, approved_by="vendor")]


async def test_an_allow_list_policy_approves_its_actors_at_once_and_only_its_owner_sets_it(approval, actors):
    await world(approval, actors)
    await approval.learn(m.ModelRegistered(model_id="model-2", owner_id="rival", name="m2", image=IMAGE))

    refused = await approval.ask(actors.sign("vendor", m.SetApprovalPolicy(
        benchmark_id="bm", kind=m.EntityKind.MODEL, mode=m.ApprovalMode.ALWAYS)))
    set_ = await approval.ask(actors.sign("owner", m.SetApprovalPolicy(
        benchmark_id="bm", kind=m.EntityKind.MODEL, mode=m.ApprovalMode.ALLOW, allowed=("vendor",))))
    trusted = await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))
    other = await approval.ask(actors.sign("rival", m.RequestAssociation(**{**MODEL, "entity_id": "model-2"})))

    assert refused["ok"] is False and set_["message"] == "model requests to bm approved at once: those of vendor"
    assert trusted["message"] == "model model-1 approved for bm by the benchmark's approval policy"
    assert other["message"] == "model model-2 asked to join bm; waiting for the benchmark owner"
    assert approval.events(m.AssociationApproved) == [m.AssociationApproved(**MODEL, approved_by="owner",
                                                                            by_policy=True)]


async def test_each_actor_lists_only_the_pairs_it_is_a_side_of_and_pending_narrows_them(approval, actors):
    await world(approval, actors)
    await with_dataset(approval)
    await approval.ask(actors.sign("vendor", m.RequestAssociation(**MODEL)))
    await approval.ask(actors.sign("hospital", m.RequestAssociation(**DATASET)))
    await approval.ask(actors.sign("owner", m.ApproveAssociation(**DATASET)))

    def listed(reply: dict) -> list[tuple[str, str]]:  # type: ignore[type-arg]
        return [(a["entity_id"], a["status"]) for a in reply["associations"]]

    assert listed(await approval.ask(actors.sign("owner", m.ListAssociations()))) == [
        ("ds-1", "APPROVED"), ("model-1", "REQUESTED")]
    assert listed(await approval.ask(actors.sign("owner", m.ListAssociations(pending=True)))) == [
        ("model-1", "REQUESTED")]
    assert listed(await approval.ask(actors.sign("vendor", m.ListAssociations()))) == [("model-1", "REQUESTED")]
    assert listed(await approval.ask(actors.sign("rival", m.ListAssociations()))) == []
    assert len(listed(await approval.ask(actors.sign("operator", m.ListAssociations())))) == 2
