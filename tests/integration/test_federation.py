"""The four real services and site workers on a real nats-server: the flow, bad input, forged jobs, retries."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest
from pydantic import ValidationError

from contracts import messages as m
from contracts.envelope import Envelope
from contracts.envelope import utcnow
from contracts.signing import KeyPair, metrics_hash
from contracts.subjects import jobs
from site_worker.containers import RunOutcome
from tests.conftest import new_database
from tests.support.federation import EVALUATOR, MODEL, Federation, fake_containers, next_events

METRICS = {"auc": 0.91, "sensitivity": 0.8}


@pytest.fixture(params=["sqlite", "postgres"])
async def federation(request: pytest.FixtureRequest, nats_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "postgres":
        server = request.getfixturevalue("postgres_server")
        urls = {name: await new_database(server) for name in ("registry", "approval", "scheduling", "leaderboard")}
        fed = Federation(nats_url, tmp_path, urls.__getitem__)
    else:
        fed = Federation(nats_url, tmp_path, lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db")
    await fed.start_services()
    yield fed
    await fed.stop()


async def test_signed_commands_drive_a_benchmark_to_ranked_results(federation: Federation) -> None:
    await federation.start_site("site-a", fake_containers(METRICS))
    await federation.start_site("site-b", fake_containers({"auc": 0.71, "sensitivity": 0.6}))
    await federation.benchmark()
    await federation.model("model-1")
    await federation.dataset("site-a", "ds-a")
    await federation.dataset("site-b", "ds-b")

    accepted = await next_events(federation.nats_url, "assay.v1.evt.result.accepted", 2)
    assert {e["data"]["site_id"] for e in accepted} == {"site-a", "site-b"}
    board = await federation.board()
    (row,) = board.rows
    assert row.site_values == {"site-a": METRICS, "site-b": {"auc": 0.71, "sensitivity": 0.6}}
    assert row.pooled["auc"] == pytest.approx((0.91 * 2 + 0.71 * 2) / 4)
    # the model container saw the data read-only and never the labels; the evaluator saw the labels
    specs = federation.runners["site-a"].specs
    infer = next(s for s in specs if s.task == "infer")
    assert not any("labels" in str(mt.source) or mt.target == "/assay/labels" for mt in infer.mounts)
    assert all(not mt.writable for mt in infer.mounts if mt.target == "/assay/data")


async def test_command_with_bad_input_names_the_field_and_changes_nothing(federation: Federation) -> None:
    await federation.enrol("vendor", m.Role.MODEL_OWNER)
    envelope = federation.key("vendor").sign(Envelope.wrap(
        m.RegisterModel(model_id="good", name="x", image=m.ImageRef(digest=MODEL, name="x")), source="actor:vendor"))
    raw = json.loads(envelope.model_dump_json())
    raw["data"]["image"]["digest"] = "latest"  # a tag where a digest is required
    nc = await nats.connect(federation.nats_url)
    reply = json.loads((await nc.request("assay.v1.cmd.registry.register_model", json.dumps(raw).encode(),
                                         timeout=10)).data)
    await nc.close()
    assert reply["ok"] is False
    assert "data.image.digest" in reply["message"]
    registered = await next_events(federation.nats_url, "assay.v1.evt.>", 2)  # the operator's and the vendor's enrolment
    assert [e["type"] for e in registered] == ["assay.v1.ActorRegistered"] * 2


async def test_command_signed_by_an_unregistered_key_is_refused(federation: Federation) -> None:
    from assay.client import CommandFailed, request

    stranger = KeyPair.generate()
    with pytest.raises(CommandFailed, match="no registered actor"):
        await request(federation.nats_url, m.ApproveBenchmark(benchmark_id="bench"), actor="stranger", key=stranger,
                      patience_s=0.5)


async def test_command_by_an_actor_without_the_role_is_refused(federation: Federation) -> None:
    from assay.client import CommandFailed

    await federation.benchmark()
    await federation.enrol("vendor", m.Role.MODEL_OWNER)
    with pytest.raises(CommandFailed, match="needs operator"):
        await federation.send(m.ApproveBenchmark(benchmark_id="bench"), "vendor")


async def test_a_job_not_signed_by_the_scheduler_is_never_run(federation: Federation) -> None:
    runner = fake_containers(METRICS)
    await federation.start_site("site-a", runner)
    forged = m.JobSpec(job_id="job-forged", site_id="site-a", metrics=(m.MetricSpec(name="auc"),),
                       binding=m.JobBinding(benchmark_id="bench", model_id="m", dataset_id="d", model_image=MODEL,
                                            evaluator_image=EVALUATOR, dataset_hash="sha256:" + "0" * 64,
                                            case_count=2))
    envelope = KeyPair.generate().sign(Envelope.wrap(forged, source="service:scheduling", id="job-forged"))
    nc = await nats.connect(federation.nats_url)
    await nc.jetstream().publish(jobs("site-a"), envelope.model_dump_json().encode(),
                                 headers={"Nats-Msg-Id": envelope.id})
    await nc.close()
    (letter,) = await next_events(federation.nats_url, "assay.v1.dlq.site-site-a-jobs", 1)
    assert "not a valid signed job" in letter["data"]["error"]
    assert runner.specs == []


async def test_a_failed_container_is_retried_and_the_result_counted_once(federation: Federation) -> None:
    runner = fake_containers(METRICS)
    runner.script("evaluate", RunOutcome(exit_code=1, log_tail="transient failure"))
    await federation.start_site("site-a", runner)
    await federation.benchmark()
    await federation.model("model-1")
    await federation.dataset("site-a", "ds-a")
    await next_events(federation.nats_url, "assay.v1.evt.result.accepted", 1)
    assert [s.task for s in runner.specs] == ["infer", "evaluate", "infer", "evaluate"]
    board = await federation.board()
    assert board.rows[0].case_count == 2
    with pytest.raises(TimeoutError):  # no second acceptance arrives
        await next_events(federation.nats_url, "assay.v1.evt.result.accepted", 2, timeout_s=1.5)
    await asyncio.sleep(0)


async def test_a_forgery_that_reuses_a_genuine_result_id_blocks_nothing(federation: Federation) -> None:
    await federation.benchmark()
    await federation.model("model-1")
    await federation.dataset("site-a", "ds-a")
    (scheduled,) = await next_events(federation.nats_url, "assay.v1.evt.job.scheduled", 1)
    job = m.JobSpec.model_validate(scheduled["data"]["job"])
    perfect = {"auc": 1.0, "sensitivity": 1.0}
    forged = m.SiteResult(job_id=job.job_id, site_id="site-a", binding=job.binding, metrics=perfect,
                          metrics_hash=metrics_hash(perfect), worker_id="mallory", finished_at=utcnow())
    await federation.enrol("site-b", m.Role.SITE)  # another hospital tries to pre-empt site-a's result id
    envelope = federation.key("site-b").sign(Envelope.wrap(forged, source="site:site-a", id=f"result-{job.job_id}"))
    nc = await nats.connect(federation.nats_url)
    await nc.jetstream().publish("assay.v1.results.site-a", envelope.model_dump_json().encode(),
                                 headers={"Nats-Msg-Id": envelope.id})
    await nc.close()
    (rejected,) = await next_events(federation.nats_url, "assay.v1.evt.result.rejected", 1)
    assert rejected["data"]["job_id"] == job.job_id
    await federation.start_site("site-a", fake_containers(METRICS))  # the genuine worker comes online only now
    (accepted,) = await next_events(federation.nats_url, "assay.v1.evt.result.accepted", 1)
    assert accepted["data"]["metrics"] == METRICS


async def test_an_actor_key_must_be_a_real_and_unused_ed25519_key(federation: Federation) -> None:
    from assay.client import CommandFailed

    await federation.enrol("vendor", m.Role.MODEL_OWNER)
    with pytest.raises(CommandFailed, match="already enrolled as actor vendor"):
        await federation.send(m.RegisterActor(actor_id="vendor-2", role=m.Role.MODEL_OWNER,
                                              public_key=federation.key("vendor").public_key,
                                              display_name="copy"), "operator")
    with pytest.raises(ValidationError, match="not a raw Ed25519 public key"):
        m.RegisterActor(actor_id="x", role=m.Role.SITE, public_key="!" * 43, display_name="x")
