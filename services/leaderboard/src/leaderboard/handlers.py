"""The leaderboard on the bus: learns actors, benchmarks and jobs from events, records signed results, answers queries."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from faststream.nats import NatsBroker, NatsRouter
from sqlmodel.ext.asyncio.session import AsyncSession

from contracts import subjects
from contracts.catalog import COMMAND_SUBJECTS, EVENT_SUBJECTS
from contracts.envelope import Envelope
from contracts.messages import (
    ActorRegistered, BenchmarkRegistered, JobScheduled, LeaderboardUpdated, ResultAccepted, ResultRejected,
    ShowLeaderboard, SiteResult,
)
from leaderboard import domain
from leaderboard.store import Store
from service_kit.actors import NotYetKnown, remember_actor
from service_kit.bus import Handler, Publisher, command_handler, durable_subscriber
from service_kit.db import Database
from service_kit.outbox import stage_event

log = logging.getLogger(__name__)

SERVICE = "leaderboard"
SOURCE = f"service:{SERVICE}"

DeliveredSubject = Callable[[], str]


def delivered_subject(broker: NatsBroker) -> DeliveredSubject:
    """The subject the message now being handled arrived on (the kit's handlers are given only its envelope)."""

    def subject() -> str:
        message = broker.context.get_local("message")
        if message is None:
            raise RuntimeError("no message is being handled, so there is no subject")
        return str(message.raw_message.subject)

    return subject


async def learn_actor(session: AsyncSession, envelope: Envelope[Any]) -> None:
    await remember_actor(session, envelope.data)


async def learn_benchmark(session: AsyncSession, envelope: Envelope[Any]) -> None:
    await Store(session).remember_benchmark(envelope.data)


async def learn_job(session: AsyncSession, envelope: Envelope[Any]) -> None:
    await Store(session).remember_job(envelope.data.job)


def result_recorder(subject_of: DeliveredSubject) -> Handler:
    """The handler of signed site results; `subject_of` tells it the subject each one arrived on."""

    async def record_result(session: AsyncSession, envelope: Envelope[Any]) -> None:
        """Verify, then store and re-rank; a result that fails a check is rejected with the reason, never retried.

        A result whose signer, job or benchmark this service has not heard of yet raises NotYetKnown: the events
        may still be on their way, so the kit redelivers it with backoff and finally dead-letters it.
        """
        result: SiteResult = envelope.data
        store = Store(session)
        signer = None
        if envelope.signature is not None:
            signer = await store.signer(envelope.signature.key_id)
            if signer is None:
                raise NotYetKnown(f"key {envelope.signature.key_id} belongs to no actor the leaderboard knows yet")
        verdict = domain.check_origin(envelope, subject=subject_of(), signer=signer)
        if verdict.ok:
            job = await store.job(result.job_id)
            if job is None:
                raise NotYetKnown(f"job {result.job_id} is not known to the leaderboard yet")
            benchmark = await store.benchmark(job.benchmark_id, lock=True)
            if benchmark is None:
                raise NotYetKnown(f"benchmark {job.benchmark_id} is not known to the leaderboard yet")
            verdict = domain.check_binding(result, job=job, benchmark=benchmark,
                                           accepted_before=await store.has_result(job.job_id))
        if not verdict.ok:
            log.warning("rejected result %s of job %s from site %s: %s",
                        envelope.id, result.job_id, result.site_id, verdict.reason)
            stage_event(session, SOURCE, ResultRejected(message_id=envelope.id, site_id=result.site_id,
                                                        job_id=result.job_id, reason=verdict.reason))
            return
        await store.record(envelope)
        stage_event(session, SOURCE, ResultAccepted(
            job_id=result.job_id, benchmark_id=result.benchmark_id, model_id=result.model_id,
            dataset_id=result.dataset_id, site_id=result.site_id, metrics=dict(result.metrics),
            case_count=result.case_count,
        ))
        stage_event(session, SOURCE, domain.aggregate(benchmark, await store.scores(benchmark.benchmark_id)))

    return record_result


async def show_leaderboard(session: AsyncSession, envelope: Envelope[Any]) -> LeaderboardUpdated:
    """The current board of a benchmark: empty rows until a result is accepted; NotYetKnown for an unknown one."""
    query: ShowLeaderboard = envelope.data
    store = Store(session)
    benchmark = await store.benchmark(query.benchmark_id)
    if benchmark is None:
        raise NotYetKnown(f"benchmark {query.benchmark_id} is not known to the leaderboard (yet)")
    return domain.aggregate(benchmark, await store.scores(benchmark.benchmark_id))


def build_router(db: Database, publish: Publisher, subject_of: DeliveredSubject) -> NatsRouter:
    router = NatsRouter()
    learned: list[tuple[type[Any], str, Handler]] = [
        (ActorRegistered, "leaderboard-actor-registered", learn_actor),
        (BenchmarkRegistered, "leaderboard-benchmark-registered", learn_benchmark),
        (JobScheduled, "leaderboard-job-scheduled", learn_job),
    ]
    for payload, durable, handle in learned:
        durable_subscriber(router, subject=EVENT_SUBJECTS[payload], durable=durable, payload=payload, db=db,
                           publish=publish, handle=handle)
    durable_subscriber(router, subject=subjects.RESULTS_ALL, durable=SERVICE, payload=SiteResult, db=db,
                       publish=publish, handle=result_recorder(subject_of))
    command_handler(router, subject=COMMAND_SUBJECTS[ShowLeaderboard], service=SERVICE, payload=ShowLeaderboard,
                    db=db, handle=show_leaderboard, idempotent=False)
    return router
