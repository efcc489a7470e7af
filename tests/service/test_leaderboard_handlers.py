"""The leaderboard's handlers over a real SQLite store, no bus: what one result changes, stages or refuses to touch."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from contracts import subjects
from contracts.catalog import EVENT_SUBJECTS
from contracts.envelope import Envelope, Payload
from contracts.messages import (
    ActorRegistered, BenchmarkRegistered, BenchmarkSpec, ImageRef, JobScheduled, JobSpec, LeaderboardUpdated,
    MetricSpec, ResultAccepted, ResultRejected, Role, SiteResult,
)
from contracts.signing import KeyPair, metrics_hash
from leaderboard.handlers import learn_actor, learn_benchmark, learn_job, result_recorder
from leaderboard.models import TABLES, AcceptedResult
from leaderboard.store import Store
from service_kit.actors import NotYetKnown
from service_kit.app import KIT_TABLES
from service_kit.db import Database, create_tables, make_engine
from service_kit.inbox import first_time
from service_kit.outbox import OutboxMessage

SITES = {"site-a": KeyPair.generate(), "site-b": KeyPair.generate()}
IMAGE = ImageRef(digest="sha256:" + "1" * 64, name="img")
BENCHMARK = BenchmarkSpec(benchmark_id="bm", name="Benchmark", preparator=IMAGE, reference_model=IMAGE,
                          evaluator=IMAGE, metrics=(MetricSpec(name="auc"),), primary_metric="auc")
JOB = JobSpec(job_id="job-1", benchmark_id="bm", model_id="model-1", dataset_id="data-a", site_id="site-a",
              model_image="sha256:" + "a" * 64, evaluator_image="sha256:" + "b" * 64,
              dataset_hash="sha256:" + "c" * 64, case_count=40, metrics=BENCHMARK.metrics)


def site_result(auc: float = 0.8, *, key: KeyPair = SITES["site-a"]) -> Envelope[SiteResult]:
    metrics = {"auc": auc}
    result = SiteResult(job_id=JOB.job_id, benchmark_id=JOB.benchmark_id, model_id=JOB.model_id,
                        dataset_id=JOB.dataset_id, site_id=JOB.site_id, model_image=JOB.model_image,
                        evaluator_image=JOB.evaluator_image, dataset_hash=JOB.dataset_hash, metrics=metrics,
                        case_count=40, metrics_hash=metrics_hash(metrics), worker_id="worker-1",
                        finished_at=datetime.now(UTC))
    return key.sign(Envelope.wrap(result, source="site:site-a"))


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(make_engine(f"sqlite+aiosqlite:///{tmp_path / 'leaderboard.db'}"))
    await create_tables(database.engine, [*KIT_TABLES, *TABLES])
    yield database
    await database.close()


async def learn(db: Database, *, sites: bool = True, job: bool = True) -> None:
    async with db.transaction() as session:
        for site_id, key in SITES.items() if sites else ():
            await learn_actor(session, Envelope.wrap(ActorRegistered(
                actor_id=site_id, role=Role.SITE, public_key=key.public_key, key_id=key.key_id,
                display_name=site_id), source="service:registry"))
        await learn_benchmark(session, Envelope.wrap(BenchmarkRegistered(owner_id="owner", benchmark=BENCHMARK),
                                                     source="service:registry"))
        if job:
            await learn_job(session, Envelope.wrap(JobScheduled(job=JOB), source="service:scheduling"))


async def deliver(db: Database, envelope: Envelope[SiteResult], subject: str = subjects.results("site-a")) -> None:
    """As the kit's consumer does: the inbox record and the handler in one transaction."""
    record_result = result_recorder(lambda: subject)
    async with db.transaction() as session:
        assert await first_time(session, "leaderboard", envelope.id)
        await record_result(session, envelope)


async def staged(db: Database) -> list[tuple[str, dict[str, Any]]]:
    async with db.transaction() as session:
        rows = (await session.exec(select(OutboxMessage).order_by(col(OutboxMessage.seq)))).all()
    return [(row.subject, json.loads(row.body)["data"]) for row in rows]


async def stored_results(db: Database) -> list[AcceptedResult]:
    async with db.transaction() as session:
        return list((await session.exec(select(AcceptedResult))).all())


def subject_of(kind: type[Payload]) -> str:
    return EVENT_SUBJECTS[kind]


async def test_an_accepted_result_is_stored_with_its_acceptance_and_the_new_board_staged(db: Database):
    await learn(db)

    await deliver(db, site_result(0.8))

    [(accepted_on, accepted), (board_on, board)] = await staged(db)
    assert (accepted_on, board_on) == (subject_of(ResultAccepted), subject_of(LeaderboardUpdated))
    assert (accepted["job_id"], accepted["metrics"], accepted["case_count"]) == ("job-1", {"auc": 0.8}, 40)
    assert LeaderboardUpdated.model_validate(board).rows[0].pooled == {"auc": 0.8}
    assert [row.job_id for row in await stored_results(db)] == ["job-1"]


async def test_a_rejected_result_stores_nothing_and_stages_only_its_rejection(db: Database):
    await learn(db)
    out_of_range = site_result(1.5)

    await deliver(db, out_of_range)

    [(subject, rejected)] = await staged(db)
    assert subject == subject_of(ResultRejected)
    assert rejected["message_id"] == out_of_range.id
    assert rejected["reason"] == "metric_value: auc = 1.5 is outside its declared range [0.0, 1.0]"
    assert await stored_results(db) == []


async def test_a_result_for_a_job_not_known_yet_raises_so_it_is_delivered_again(db: Database):
    await learn(db, job=False)

    with pytest.raises(NotYetKnown, match="job job-1 is not known to the leaderboard yet"):
        await deliver(db, site_result())

    assert await staged(db) == [] and await stored_results(db) == []


async def test_a_result_signed_with_a_key_not_known_yet_raises_so_it_is_delivered_again(db: Database):
    await learn(db, sites=False)

    with pytest.raises(NotYetKnown, match=f"key {SITES['site-a'].key_id} belongs to no actor"):
        await deliver(db, site_result())


async def test_a_forged_result_is_rejected_at_once_even_when_its_job_is_not_known_yet(db: Database):
    await learn(db, job=False)

    await deliver(db, site_result(key=SITES["site-b"]))

    [(_, rejected)] = await staged(db)
    assert rejected["reason"].startswith("signer_site: ")


async def test_a_replica_racing_to_store_a_second_result_for_the_same_job_fails_and_is_retried(db: Database):
    await learn(db)
    await deliver(db, site_result(0.8))

    with pytest.raises(IntegrityError):
        async with db.transaction() as session:  # a replica that checked before the first result was committed
            await Store(session).record(site_result(0.9))

    assert [row.metrics for row in await stored_results(db)] == [{"auc": 0.8}]
