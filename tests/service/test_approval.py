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
