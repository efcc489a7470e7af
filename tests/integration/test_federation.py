"""The four real services and site workers on a real nats-server, on SQLite and PostgreSQL: the flow, retries of a
failed container, and a forgery that reuses a genuine id inside the server's duplicate window."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest

from contracts import messages as m
from contracts.envelope import Envelope, utcnow
from contracts.signing import metrics_hash
from site_worker.containers import RunSpec
from tests.conftest import new_database
from tests.support.federation import Federation, benchmark_tasks, fake_containers, next_events

METRICS = {"auc": 0.91, "sensitivity": 0.8}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
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


async def test_a_failed_container_is_retried_and_the_result_counted_once(federation: Federation) -> None:
    runner = fake_containers(METRICS)
    evaluate, failed = runner._actions["evaluate"], []

    def once_failing(spec: RunSpec) -> None:  # the benchmark's job's first evaluation crashes (not the check's)
        if spec.env["ASSAY_JOB_ID"].startswith("job-") and not failed:
            failed.append(spec)
            raise RuntimeError("transient failure")
        evaluate(spec)

    runner.on("evaluate", once_failing)
    await federation.start_site("site-a", runner)
    await federation.benchmark()
    await federation.model("model-1")
    await federation.dataset("site-a", "ds-a")
    await next_events(federation.nats_url, "assay.v1.evt.result.accepted", 1)
    assert benchmark_tasks(runner.specs) == ["infer", "evaluate", "infer", "evaluate"]
    board = await federation.board()
    assert board.rows[0].case_count == 2
    with pytest.raises(TimeoutError):  # no second acceptance arrives
        await next_events(federation.nats_url, "assay.v1.evt.result.accepted", 2, timeout_s=1.5)
    await asyncio.sleep(0)


async def test_a_forgery_that_reuses_a_genuine_result_id_blocks_nothing(federation: Federation) -> None:
    await federation.benchmark()
    await federation.model("model-1")
    await federation.dataset("site-a", "ds-a")
    [job] = [m.JobSpec.model_validate(e["data"]["job"]) for e in await next_events(
        federation.nats_url, "assay.v1.evt.job.scheduled.*", 2) if e["data"]["job"]["check"] is None]  # not the check
    perfect = {"auc": 1.0, "sensitivity": 1.0}
    made_up = federation.key("site-b").sign(Envelope.wrap(job, source="service:scheduling", id=job.job_id))
    forged = m.SiteResult(job_id=job.job_id, site_id="site-a", binding=job.binding, metrics=perfect, job=made_up,
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
    assert accepted["data"]["job_id"] == job.job_id
    assert (await federation.board()).rows[0].site_values == {"site-a": METRICS}
