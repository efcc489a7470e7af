"""An intruder on the bus forges events: an approval nobody gave, and a phantom site with a huge job. Every consumer
checks that an event is signed by the one service that publishes it, so each forgery is dead-lettered with the reason
and changes nothing: no job is planned, the board does not move."""

from __future__ import annotations

from datetime import UTC, datetime

import nats
import pytest

from contracts import messages as m
from contracts import subjects
from contracts.catalog import event_subject
from contracts.envelope import Envelope
from contracts.signing import KeyPair, metrics_hash
from tests.support.federation import EVALUATOR, MODEL, Federation, fake_containers, next_events

METRICS = {"auc": 0.7, "sensitivity": 0.6}


async def publish(nats_url: str, *envelopes: Envelope[m.Payload]) -> None:
    nc = await nats.connect(nats_url)
    try:
        for envelope in envelopes:
            await nc.jetstream().publish(event_subject(envelope.data), envelope.model_dump_json().encode(),
                                         headers={"Nats-Msg-Id": envelope.id})
    finally:
        await nc.close()


async def test_a_forged_approval_gets_no_model_scheduled(federation: Federation) -> None:
    await federation.start_site("site-a", fake_containers(METRICS))
    await federation.benchmark()
    await federation.dataset("site-a", "ds-a")
    await federation.enrol("vendor", m.Role.MODEL_OWNER)
    await federation.send(m.RegisterModel(model_id="never-approved", name="n", image=m.ImageRef(digest=MODEL,
                                                                                                  name="n")), "vendor")
    approval = m.AssociationApproved(benchmark_id="bench", kind=m.EntityKind.MODEL, entity_id="never-approved",
                                     approved_by="owner")
    unsigned = Envelope.wrap(approval, source="service:approval")
    by_an_actor = federation.key("vendor").sign(Envelope.wrap(approval, source="service:approval"))

    await publish(federation.nats_url, unsigned, by_an_actor)

    letters = await next_events(federation.nats_url, subjects.dead_letter("scheduling-association-approved"), 2)
    assert all(letter["data"]["error"].startswith("a AssociationApproved must be signed by approval: ")
               for letter in letters)
    [check] = await next_events(federation.nats_url, subjects.job_evt("scheduled"), 1)
    assert check["data"]["job"]["check"] == {"kind": "dataset", "entity_id": "ds-a"}  # the dataset's own check
    with pytest.raises(TimeoutError):  # no job was planned for the model nobody approved
        await next_events(federation.nats_url, subjects.job_evt("scheduled"), 2, timeout_s=1.5)
    assert (await federation.board()).rows == ()


async def test_a_phantom_site_with_a_huge_job_does_not_move_the_board(federation: Federation) -> None:
    await federation.start_site("site-a", fake_containers(METRICS))
    await federation.benchmark()
    await federation.model("model-1")
    await federation.dataset("site-a", "ds-a")
    await next_events(federation.nats_url, subjects.evt("result", "accepted"), 1)
    before = await federation.board()
    phantom = KeyPair.generate()
    job = m.JobSpec(job_id="job-phantom", site_id="phantom", metrics=(m.MetricSpec(name="auc"),
                                                                       m.MetricSpec(name="sensitivity")),
                    expires_at=datetime(2100, 1, 1, tzinfo=UTC), binding=m.JobBinding(
                        benchmark_id="bench", model_id="model-1", dataset_id="huge", model_image=MODEL,
                        evaluator_image=EVALUATOR, dataset_hash="sha256:" + "e" * 64, case_count=100_000))
    await publish(federation.nats_url,
                  Envelope.wrap(m.ActorRegistered(actor_id="phantom", role=m.Role.SITE, public_key=phantom.public_key,
                                                  key_id=phantom.key_id, display_name="p"), source="service:registry"),
                  Envelope.wrap(m.JobScheduled(job=job), source="service:scheduling"))
    perfect = {"auc": 1.0, "sensitivity": 1.0}
    result = phantom.sign(Envelope.wrap(m.SiteResult(
        job_id=job.job_id, site_id="phantom", binding=job.binding, metrics=perfect, metrics_hash=metrics_hash(perfect),
        worker_id="w", finished_at=datetime.now(UTC), job=phantom.sign(Envelope.wrap(job, source="x"))),
        source="site:phantom"))
    nc = await nats.connect(federation.nats_url)
    await nc.jetstream().publish(subjects.results("phantom"), result.model_dump_json().encode(),
                                 headers={"Nats-Msg-Id": result.id})
    await nc.close()

    registered = await next_events(federation.nats_url, subjects.dead_letter("leaderboard-actor-registered"), 1)
    assert "must be signed by registry" in registered[0]["data"]["error"]
    [rejected] = await next_events(federation.nats_url, subjects.evt("result", "rejected"), 1)
    assert rejected["data"]["reason"].startswith("job_signature: the job the result carries is not the scheduler's")
    assert await federation.board() == before  # the phantom's 100,000 cases count for nothing
