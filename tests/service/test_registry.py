"""The registry under the test broker: who may register what, what each registration announces, what it refuses."""

from __future__ import annotations

from contracts import messages as m
from tests.support.service import Actors, Harness

DIGEST = "sha256:" + "1" * 64
IMAGE = m.ImageRef(digest=DIGEST, name="img")
SPEC = m.BenchmarkSpec(benchmark_id="bm", name="Benchmark", preparator=IMAGE, reference_model=IMAGE, evaluator=IMAGE,
                       metrics=(m.MetricSpec(name="auc"),), primary_metric="auc")


async def enrol(registry: Harness, actors: Actors, name: str, role: m.Role) -> dict[str, object]:
    return await registry.ask(actors.sign("operator", m.RegisterActor(
        actor_id=name, role=role, public_key=actors.key(name).public_key, display_name=name)))


async def test_the_operator_is_enrolled_from_configuration_and_announced(registry, actors):
    [operator] = registry.events(m.ActorRegistered)
    assert (operator.actor_id, operator.role, operator.public_key) == (
        "operator", m.Role.OPERATOR, actors.key("operator").public_key)


async def test_an_enrolled_actor_is_announced_once_and_enrolling_it_again_changes_nothing(registry, actors):
    first = await enrol(registry, actors, "vendor", m.Role.MODEL_OWNER)
    again = await enrol(registry, actors, "vendor", m.Role.MODEL_OWNER)

    assert (first["message"], again["message"]) == ("registered model_owner vendor", "actor vendor is already registered")
    assert [e.actor_id for e in registry.events(m.ActorRegistered)] == ["operator", "vendor"]


async def test_an_actor_another_replica_enrolled_between_the_two_reads_is_already_registered(registry, actors,
                                                                                            monkeypatch):
    """Two replicas enrolling one actor at once (on PostgreSQL each statement sees what was committed before it): the
    second's look by id saw nothing, its look by key sees the first's row. The same actor, key and role: no refusal."""
    from sqlmodel.ext.asyncio.session import AsyncSession

    from service_kit.actors import KnownActor

    await enrol(registry, actors, "vendor", m.Role.MODEL_OWNER)
    get = AsyncSession.get

    async def before_it_committed(self, entity, ident, **kwargs):  # type: ignore[no-untyped-def]
        return None if (entity, ident) == (KnownActor, "vendor") else await get(self, entity, ident, **kwargs)

    monkeypatch.setattr(AsyncSession, "get", before_it_committed)
    again = await enrol(registry, actors, "vendor", m.Role.MODEL_OWNER)
    other = await enrol(registry, actors, "vendor", m.Role.BENCHMARK_OWNER)

    assert (again["ok"], again["message"]) == (True, "actor vendor is already registered")
    assert other["ok"] is False and "already enrolled as actor vendor" in other["message"]
    assert [e.actor_id for e in registry.events(m.ActorRegistered)] == ["operator", "vendor"]


async def test_an_actor_id_or_a_key_already_taken_is_refused(registry, actors):
    await enrol(registry, actors, "vendor", m.Role.MODEL_OWNER)

    taken_id = await registry.ask(actors.sign("operator", m.RegisterActor(
        actor_id="vendor", role=m.Role.MODEL_OWNER, public_key=actors.key("other").public_key, display_name="x")))
    taken_key = await registry.ask(actors.sign("operator", m.RegisterActor(
        actor_id="vendor-2", role=m.Role.MODEL_OWNER, public_key=actors.key("vendor").public_key, display_name="x")))

    assert taken_id["message"] == "actor_id 'vendor' is taken by another key or role; choose another id"
    assert taken_key["message"] == "public_key is already enrolled as actor vendor; every actor has its own key"
    assert len(registry.events(m.ActorRegistered)) == 2


async def test_a_registered_benchmark_is_announced_in_development_and_its_id_is_then_taken(registry, actors):
    await enrol(registry, actors, "owner", m.Role.BENCHMARK_OWNER)

    first = await registry.ask(actors.sign("owner", m.RegisterBenchmark(benchmark=SPEC)))
    again = await registry.ask(actors.sign("owner", m.RegisterBenchmark(benchmark=SPEC)))

    assert first["ok"] and again == {"ok": False, "retry": False,
                                     "message": "benchmark_id 'bm' already exists; choose another id"}
    [registered] = registry.events(m.BenchmarkRegistered)
    assert (registered.owner_id, registered.benchmark) == ("owner", SPEC)
    details = m.BenchmarkDetails.model_validate(await registry.ask(actors.sign("x", m.GetBenchmark(benchmark_id="bm"))))
    assert (details.owner_id, details.status, details.benchmark) == ("owner", "DEVELOPMENT", SPEC)


async def test_an_approved_benchmark_is_in_operation(registry, actors):
    await enrol(registry, actors, "owner", m.Role.BENCHMARK_OWNER)
    await registry.ask(actors.sign("owner", m.RegisterBenchmark(benchmark=SPEC)))

    await registry.learn(m.BenchmarkApproved(benchmark_id="bm", approved_by="operator"))

    details = await registry.ask(actors.sign("x", m.GetBenchmark(benchmark_id="bm")))
    assert details["status"] == "OPERATION"


async def test_a_registered_model_is_announced_with_its_image_digest(registry, actors):
    await enrol(registry, actors, "vendor", m.Role.MODEL_OWNER)

    reply = await registry.ask(actors.sign("vendor", m.RegisterModel(model_id="model-1", name="Model", image=IMAGE)))

    assert reply["message"] == f"model model-1 registered as {DIGEST}"
    [model] = registry.events(m.ModelRegistered)
    assert (model.model_id, model.owner_id, model.image) == ("model-1", "vendor", IMAGE)


def dataset(**changes: object) -> m.RegisterDataset:
    return m.RegisterDataset(dataset_id="ds-1", benchmark_id="bm", name="ds", content_hash="sha256:" + "d" * 64,
                             case_count=40, statistics={"cases": 40}, preparator_digest=DIGEST).model_copy(update=changes)


async def test_a_dataset_prepared_with_the_benchmarks_preparator_is_announced_as_metadata_only(registry, actors):
    await enrol(registry, actors, "owner", m.Role.BENCHMARK_OWNER)
    await enrol(registry, actors, "hospital", m.Role.SITE)
    await registry.ask(actors.sign("owner", m.RegisterBenchmark(benchmark=SPEC)))

    reply = await registry.ask(actors.sign("hospital", dataset()))

    assert reply["message"] == "dataset ds-1 registered (metadata only)"
    [registered] = registry.events(m.DatasetRegistered)
    assert (registered.site_id, registered.case_count, registered.statistics) == ("hospital", 40, {"cases": 40})


async def test_a_dataset_for_an_unknown_benchmark_waits_and_one_from_another_preparator_is_refused(registry, actors):
    await enrol(registry, actors, "owner", m.Role.BENCHMARK_OWNER)
    await enrol(registry, actors, "hospital", m.Role.SITE)

    early = await registry.ask(actors.sign("hospital", dataset()))
    await registry.ask(actors.sign("owner", m.RegisterBenchmark(benchmark=SPEC)))
    other = await registry.ask(actors.sign("hospital", dataset(preparator_digest="sha256:" + "9" * 64)))

    assert (early["retry"], early["message"]) == (True, "benchmark 'bm' is not registered")
    assert other["message"].startswith("preparator_digest sha256:999") and "prepare the data with" in other["message"]
    assert registry.events(m.DatasetRegistered) == []


async def test_every_registered_actor_lists_what_exists_by_kind_and_filter_without_dataset_statistics(registry, actors):
    for name, role in (("owner", m.Role.BENCHMARK_OWNER), ("vendor", m.Role.MODEL_OWNER),
                       ("rival", m.Role.MODEL_OWNER), ("hospital", m.Role.SITE)):
        await enrol(registry, actors, name, role)
    await registry.ask(actors.sign("owner", m.RegisterBenchmark(benchmark=SPEC)))
    for model, owner in (("model-1", "vendor"), ("model-2", "rival")):
        await registry.ask(actors.sign(owner, m.RegisterModel(model_id=model, name=model, image=IMAGE)))
    await registry.ask(actors.sign("hospital", m.RegisterDataset(
        dataset_id="ds-1", benchmark_id="bm", name="ds", content_hash=DIGEST, case_count=2,
        statistics={"cases": 2, "prevalence": 0.5}, preparator_digest=DIGEST)))

    async def listed(asker: str, **query: object) -> list[tuple[str, str, str]]:
        reply = m.EntityList.model_validate(await registry.ask(actors.sign(asker, m.ListEntities(**query))))
        return [(e.entity_id, e.owner_id, e.state) for e in reply.entities]

    assert await listed("hospital", kind=m.EntityType.MODEL) == [("model-1", "vendor", "OPERATION"),
                                                                 ("model-2", "rival", "OPERATION")]
    assert await listed("vendor", kind=m.EntityType.MODEL, owner="rival") == [("model-2", "rival", "OPERATION")]
    assert await listed("vendor", kind=m.EntityType.BENCHMARK, state="DEVELOPMENT") == [
        ("bm", "owner", "DEVELOPMENT")]
    assert await listed("vendor", kind=m.EntityType.BENCHMARK, state="OPERATION") == []
    assert await listed("owner", kind=m.EntityType.DATASET, benchmark_id="bm") == [("ds-1", "hospital", "OPERATION")]
    assert ("hospital", "hospital", "site") in await listed("owner", kind=m.EntityType.ACTOR)
    datasets = await registry.ask(actors.sign("owner", m.ListEntities(kind=m.EntityType.DATASET)))
    assert "prevalence" not in str(datasets)  # a hospital's statistics are not for every actor
    unsigned = await registry.ask(_unsigned(m.ListEntities(kind=m.EntityType.MODEL)))
    assert unsigned["ok"] is False and unsigned["message"].startswith("the command is not signed")


def _unsigned(payload: m.Payload):  # type: ignore[no-untyped-def]
    from contracts.envelope import Envelope

    return Envelope.wrap(payload, source="actor:anyone")


async def test_a_benchmark_is_edited_freely_in_development_and_only_in_what_does_not_define_results_later(
        registry, actors):
    await enrol(registry, actors, "owner", m.Role.BENCHMARK_OWNER)
    await enrol(registry, actors, "rival", m.Role.BENCHMARK_OWNER)
    await registry.ask(actors.sign("owner", m.RegisterBenchmark(benchmark=SPEC)))
    two_metrics = SPEC.model_copy(update={"metrics": (m.MetricSpec(name="auc"), m.MetricSpec(name="brier"))})

    early = await registry.ask(actors.sign("owner", m.EditBenchmark(benchmark=two_metrics)))
    stranger = await registry.ask(actors.sign("rival", m.EditBenchmark(benchmark=SPEC)))
    await registry.learn(m.BenchmarkApproved(benchmark_id="bm", approved_by="operator"))
    frozen = await registry.ask(actors.sign("owner", m.EditBenchmark(benchmark=SPEC)))
    renamed = await registry.ask(actors.sign("owner", m.EditBenchmark(
        benchmark=two_metrics.model_copy(update={"name": "Benchmark, 2nd edition"}))))

    assert early["message"] == "benchmark bm edited: metrics"
    assert stranger["message"] == "benchmark bm belongs to owner, not to rival"
    assert frozen["ok"] is False and frozen["message"].startswith("metrics of benchmark bm cannot change in "
                                                                  "OPERATION: they define the results")
    assert renamed["message"] == "benchmark bm edited: name"
    assert [e.changed for e in registry.events(m.BenchmarkEdited)] == [("metrics",), ("name",)]


async def test_a_changed_model_is_a_new_version_linked_to_its_own_earlier_one(registry, actors):
    await enrol(registry, actors, "vendor", m.Role.MODEL_OWNER)
    await enrol(registry, actors, "rival", m.Role.MODEL_OWNER)
    await registry.ask(actors.sign("vendor", m.RegisterModel(model_id="model-1", name="m", image=IMAGE)))

    again = await registry.ask(actors.sign("vendor", m.RegisterModel(model_id="model-1", name="m", image=IMAGE)))
    theirs = await registry.ask(actors.sign("rival", m.RegisterModel(model_id="model-x", name="x", image=IMAGE,
                                                                     previous="model-1")))
    version = await registry.ask(actors.sign("vendor", m.RegisterModel(model_id="model-1-v2", name="m", image=IMAGE,
                                                                       previous="model-1")))

    assert again["message"].endswith("register it under a new id with --version-of model-1")
    assert theirs["message"] == "model model-1 is not a model of rival: a new version follows one's own"
    assert version["message"].endswith("a new version of model-1 (which stays as it was)")
    assert registry.events(m.ModelRegistered)[-1].previous == "model-1"


async def test_only_its_owner_archives_an_entity_and_an_archived_benchmark_changes_no_more(registry, actors):
    await enrol(registry, actors, "owner", m.Role.BENCHMARK_OWNER)
    await enrol(registry, actors, "vendor", m.Role.MODEL_OWNER)
    await registry.ask(actors.sign("owner", m.RegisterBenchmark(benchmark=SPEC)))
    await registry.ask(actors.sign("vendor", m.RegisterModel(model_id="model-1", name="m", image=IMAGE)))

    wrong = await registry.ask(actors.sign("vendor", m.ArchiveEntity(kind=m.EntityType.BENCHMARK, entity_id="bm",
                                                                     reason="mine")))
    model = await registry.ask(actors.sign("vendor", m.ArchiveEntity(kind=m.EntityType.MODEL, entity_id="model-1",
                                                                     reason="superseded by model-2")))
    bench = await registry.ask(actors.sign("owner", m.ArchiveEntity(kind=m.EntityType.BENCHMARK, entity_id="bm",
                                                                    reason="the 2026 round is over")))
    edit = await registry.ask(actors.sign("owner", m.EditBenchmark(benchmark=SPEC.model_copy(update={"name": "n"}))))

    assert wrong["message"] == "actor vendor has role model_owner; this command needs benchmark_owner"
    assert model["message"].startswith("model model-1 archived: never scheduled again")
    assert bench["ok"] and edit["message"] == "benchmark bm is archived: it changes no more"
    assert [(e.kind, e.entity_id) for e in registry.events(m.EntityArchived)] == [
        (m.EntityType.MODEL, "model-1"), (m.EntityType.BENCHMARK, "bm")]
    listed = m.EntityList.model_validate(await registry.ask(actors.sign("owner", m.ListEntities(
        kind=m.EntityType.MODEL, state="ARCHIVED"))))
    assert [e.entity_id for e in listed.entities] == ["model-1"]


async def test_an_organisation_enrols_actors_who_may_hold_several_roles_in_it(registry, actors):
    missing = await registry.ask(actors.sign("operator", m.RegisterActor(
        actor_id="leeds", role=m.Role.SITE, also=(m.Role.MODEL_OWNER,), organisation="uh-leeds",
        public_key=actors.key("leeds").public_key, display_name="Leeds")))
    org = await registry.ask(actors.sign("operator", m.RegisterOrganisation(organisation_id="uh-leeds",
                                                                            name="Leeds Teaching Hospitals")))
    enrolled = await registry.ask(actors.sign("operator", m.RegisterActor(
        actor_id="leeds", role=m.Role.SITE, also=(m.Role.MODEL_OWNER,), organisation="uh-leeds",
        public_key=actors.key("leeds").public_key, display_name="Leeds")))
    model = await registry.ask(actors.sign("leeds", m.RegisterModel(model_id="leeds-net", name="n", image=IMAGE)))
    bench = await registry.ask(actors.sign("leeds", m.RegisterBenchmark(benchmark=SPEC)))

    assert missing["message"].startswith("organisation 'uh-leeds' is not registered; enrol it first")
    assert org["ok"] and enrolled["message"] == "registered site leeds (also model_owner) of uh-leeds"
    assert model["ok"]  # a hospital may also own a model
    assert bench["message"] == "actor leeds has roles site, model_owner; this command needs benchmark_owner"
    [event] = [e for e in registry.events(m.ActorRegistered) if e.actor_id == "leeds"]
    assert (event.also, event.organisation) == ((m.Role.MODEL_OWNER,), "uh-leeds")
    listed = m.EntityList.model_validate(await registry.ask(actors.sign("leeds", m.ListEntities(
        kind=m.EntityType.ACTOR, owner="uh-leeds"))))
    assert [(e.entity_id, e.detail["also"]) for e in listed.entities] == [("leeds", "model_owner")]
