"""Every command and query, refused as it must be: bad input names the field, every role but the right one is
refused, an unsigned, unknown or altered signature is refused; each refusal says why and changes nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from contracts import messages as m
from contracts.catalog import QUERY_SUBJECTS, REQUEST_SUBJECTS
from contracts.envelope import Envelope, Payload
from tests.support.service import Actors, Harness

DIGEST = "sha256:" + "1" * 64
IMAGE = m.ImageRef(digest=DIGEST, name="img")
SPEC = m.BenchmarkSpec(benchmark_id="bm", name="Benchmark", preparator=IMAGE, reference_model=IMAGE, evaluator=IMAGE,
                       metrics=(m.MetricSpec(name="auc"),), primary_metric="auc")


@dataclass(frozen=True)
class Case:
    """A valid example of a request, the service that answers it, who may send it, and one field made invalid."""

    service: str
    example: Callable[[Actors], Payload]
    roles: tuple[m.Role, ...]
    field: str                 # a dotted path inside `data`
    bad: object

    @property
    def payload(self) -> type[Payload]:
        return type(self.example(Actors()))


CASES = {
    "RegisterActor": Case("registry", lambda a: m.RegisterActor(
        actor_id="newcomer", role=m.Role.SITE, public_key=a.key("newcomer").public_key, display_name="Newcomer"),
        (m.Role.OPERATOR,), "public_key", "!" * 43),
    "RegisterBenchmark": Case("registry", lambda a: m.RegisterBenchmark(benchmark=SPEC), (m.Role.BENCHMARK_OWNER,),
                              "benchmark.primary_metric", "F1"),
    "RegisterModel": Case("registry", lambda a: m.RegisterModel(model_id="model-1", name="Model", image=IMAGE),
                          (m.Role.MODEL_OWNER,), "image.digest", "latest"),
    "RegisterDataset": Case("registry", lambda a: m.RegisterDataset(
        dataset_id="ds-1", benchmark_id="bm", name="ds", content_hash=DIGEST, case_count=2, statistics={"cases": 2},
        preparator_digest=DIGEST),
        (m.Role.SITE,), "case_count", 0),
    "RegisterOrganisation": Case("registry", lambda a: m.RegisterOrganisation(organisation_id="uh-leeds",
                                                                              name="Leeds Teaching Hospitals"),
                                 (m.Role.OPERATOR,), "organisation_id", "UH Leeds"),
    "RotateKey": Case("registry", lambda a: m.RotateKey(public_key=a.key("fresh").public_key), tuple(m.Role),
                      "public_key", "x" * 43),
    "SuspendActor": Case("registry", lambda a: m.SuspendActor(actor_id="vendor", reason="key leaked"),
                         (m.Role.OPERATOR,), "reason", ""),
    "EditBenchmark": Case("registry", lambda a: m.EditBenchmark(benchmark=SPEC), (m.Role.BENCHMARK_OWNER,),
                          "benchmark.metrics", []),
    "ArchiveEntity": Case("registry", lambda a: m.ArchiveEntity(kind=m.EntityType.MODEL, entity_id="model-1",
                                                                reason="superseded"),
                          (m.Role.MODEL_OWNER,), "kind", "planet"),
    "ListEntities": Case("registry", lambda a: m.ListEntities(kind=m.EntityType.MODEL), (), "kind", "cat"),
    "GetBenchmark": Case("registry", lambda a: m.GetBenchmark(benchmark_id="bm"), (), "benchmark_id", "a.>"),
    "ApproveBenchmark": Case("approval", lambda a: m.ApproveBenchmark(benchmark_id="bm"), (m.Role.OPERATOR,),
                             "benchmark_id", "Not An Id"),
    "RequestAssociation[model]": Case("approval", lambda a: m.RequestAssociation(
        benchmark_id="bm", kind=m.EntityKind.MODEL, entity_id="model-1"), (m.Role.MODEL_OWNER,), "kind", "cat"),
    "RequestAssociation[dataset]": Case("approval", lambda a: m.RequestAssociation(
        benchmark_id="bm", kind=m.EntityKind.DATASET, entity_id="ds-1"), (m.Role.SITE,), "entity_id", ""),
    "ApproveAssociation": Case("approval", lambda a: m.ApproveAssociation(
        benchmark_id="bm", kind=m.EntityKind.MODEL, entity_id="model-1"), (m.Role.BENCHMARK_OWNER,),
        "benchmark_id", "*"),
    "RejectBenchmark": Case("approval", lambda a: m.RejectBenchmark(benchmark_id="bm", reason="no evaluator yet"),
                            (m.Role.OPERATOR,), "reason", "  "),
    "InviteAssociation": Case("approval", lambda a: m.InviteAssociation(
        benchmark_id="bm", kind=m.EntityKind.MODEL, entity_id="model-1"), (m.Role.BENCHMARK_OWNER,), "kind", "cat"),
    "RejectAssociation": Case("approval", lambda a: m.RejectAssociation(
        benchmark_id="bm", kind=m.EntityKind.MODEL, entity_id="model-1", reason="too large"),
        (m.Role.BENCHMARK_OWNER, m.Role.MODEL_OWNER, m.Role.SITE), "reason", ""),
    "RevokeAssociation": Case("approval", lambda a: m.RevokeAssociation(
        benchmark_id="bm", kind=m.EntityKind.DATASET, entity_id="ds-1", reason="consent withdrawn"),
        (m.Role.BENCHMARK_OWNER, m.Role.MODEL_OWNER, m.Role.SITE), "entity_id", ""),
    "SetApprovalPolicy": Case("approval", lambda a: m.SetApprovalPolicy(
        benchmark_id="bm", kind=m.EntityKind.MODEL, mode=m.ApprovalMode.ALWAYS), (m.Role.BENCHMARK_OWNER,), "mode",
        "sometimes"),
    "ListAssociations": Case("approval", lambda a: m.ListAssociations(benchmark_id="bm"), (), "benchmark_id", "a b"),
    "ShowLeaderboard": Case("leaderboard", lambda a: m.ShowLeaderboard(benchmark_id="bm"), (), "benchmark_id", "x" * 65),
    "GrantImageKey": Case("scheduling", lambda a: m.GrantImageKey(image=DIGEST, site_id="site-a", sealed_key="k" * 64),
                          (m.Role.MODEL_OWNER,), "site_id", "Site A"),
    "ListJobs": Case("scheduling", lambda a: m.ListJobs(site_id="site-a"), (), "state", "LOST"),
    "GetJob": Case("scheduling", lambda a: m.GetJob(job_id="job-1"), (), "job_id", "Job One"),
    "ListDeadLetters": Case("scheduling", lambda a: m.ListDeadLetters(consumer="site-a-jobs"), (), "limit", 0),
    "RetryJobs": Case("scheduling", lambda a: m.RetryJobs(job_id="job-1"),
                      (m.Role.OPERATOR, m.Role.BENCHMARK_OWNER, m.Role.SITE), "site_id", "Site A"),
}
COMMANDS = {name: case for name, case in CASES.items() if case.roles}
ROLES = [(case.service, name, role) for name, case in COMMANDS.items() for role in m.Role if role not in case.roles]


def test_every_request_the_platform_answers_has_a_case() -> None:
    assert {case.payload for case in CASES.values()} == set(REQUEST_SUBJECTS)
    assert {case.payload for case in CASES.values() if not case.roles} == set(QUERY_SUBJECTS)


async def enrol(service: Harness, actors: Actors, name: str, role: m.Role) -> None:
    """Make `name` an actor of `role` the service knows, the way it learns of actors."""
    if service.app.wiring.owner == "registry":  # type: ignore[attr-defined]
        if role is not m.Role.OPERATOR:
            assert (await service.ask(actors.sign("operator", m.RegisterActor(
                actor_id=name, role=role, public_key=actors.key(name).public_key, display_name=name))))["ok"]
    else:
        await service.learn(actors.registered(name, role))


async def unchanged(service: Harness, ask: Callable[[], Any]) -> dict[str, Any]:
    """The reply to `ask()`, after checking it changed no row and published nothing."""
    before = (await service.state(), service.sent())
    reply = await ask()
    assert (await service.state(), service.sent()) == before, "a refusal must change nothing"
    return dict(reply)


def each(cases: dict[str, Case]) -> pytest.MarkDecorator:
    """Parametrize a test over `cases`, each with its service started as `app`."""
    return pytest.mark.parametrize(("app", "name"), [(c.service, n) for n, c in cases.items()], indirect=["app"],
                                   ids=list(cases))


@pytest.mark.parametrize(("app", "name", "role"), ROLES, indirect=["app"], ids=[f"{n}-by-{r.value}" for _, n, r in ROLES])
async def test_a_command_from_an_actor_without_its_role_is_refused(app, actors, name, role):
    case, service = COMMANDS[name], app
    actor = f"a-{role.value.replace('_', '-')}"
    await enrol(service, actors, actor if role is not m.Role.OPERATOR else "operator", role)
    signer = "operator" if role is m.Role.OPERATOR else actor

    reply = await unchanged(service, lambda: service.ask(actors.sign(signer, case.example(actors))))

    needs = ", ".join(r.value for r in case.roles)
    assert reply == {"ok": False, "retry": False,
                     "message": f"actor {signer} has role {role.value}; this command needs {needs}"}


@each(CASES)
async def test_a_request_with_an_invalid_field_is_refused_naming_it(app, actors, name):
    case, service = CASES[name], app
    raw = actors.sign("operator", case.example(actors)).model_dump(mode="json")
    *path, last = case.field.split(".")
    inner = raw["data"]
    for part in path:
        inner = inner[part]
    inner[last] = case.bad

    reply = await unchanged(service, lambda: service.ask(json.dumps(raw).encode(), case.payload))

    assert reply["ok"] is False and reply["retry"] is False
    assert reply["message"].startswith(f"invalid {case.payload.__name__}: data.{case.field}: ")


@each(COMMANDS)
async def test_an_unsigned_command_is_refused(app, actors, name):
    case, service = COMMANDS[name], app

    reply = await unchanged(service, lambda: service.ask(Envelope.wrap(case.example(actors), source="actor:x")))

    assert reply["ok"] is False and reply["message"].startswith("the command is not signed")


@each(COMMANDS)
async def test_a_command_signed_with_a_key_no_actor_holds_is_refused_for_now(app, actors, name):
    case, service = COMMANDS[name], app

    reply = await unchanged(service, lambda: service.ask(actors.sign("stranger", case.example(actors))))

    assert reply["retry"] is True
    assert reply["message"] == (f"key {actors.key('stranger').key_id} belongs to no registered actor; "
                                "ask the operator to register it")


@each(COMMANDS)
async def test_a_command_changed_after_it_was_signed_is_refused(app, actors, name):
    case, service = COMMANDS[name], app
    role = case.roles[0]
    signer = "operator" if role is m.Role.OPERATOR else "someone"
    await enrol(service, actors, signer, role)
    signed = actors.sign(signer, case.example(actors))
    altered = signed.model_copy(update={"source": "actor:mallory"})

    reply = await unchanged(service, lambda: service.ask(altered))

    assert reply == {"ok": False, "retry": False,
                     "message": "signature check failed: the signature does not match the message content"}
