"""The leaderboard on the bus: learns actors, benchmarks and jobs from events, records signed results, answers queries."""

from __future__ import annotations

import logging

from contracts import subjects
from contracts.envelope import Envelope
from contracts.messages import (
    ActorRegistered, BenchmarkRegistered, JobScheduled, Leaderboard, LeaderboardUpdated, ResultAccepted,
    ResultRejected, ShowLeaderboard, SiteResult,
)
from leaderboard import domain
from leaderboard.store import Store
from service_kit.actors import remember_actor
from service_kit.edge import Delivery, NotYetKnown
from service_kit.wiring import Consumer, Outlet, Request, Wiring
from service_kit.work import UnitOfWork

log = logging.getLogger(__name__)

SERVICE = "leaderboard"


async def learn_actor(registered: Envelope[ActorRegistered], uow: UnitOfWork) -> None:
    await remember_actor(uow.session, registered.data)


async def learn_benchmark(registered: Envelope[BenchmarkRegistered], uow: UnitOfWork) -> None:
    await Store(uow.session).remember_benchmark(registered.data)


async def learn_job(scheduled: Envelope[JobScheduled], uow: UnitOfWork) -> None:
    await Store(uow.session).remember_job(scheduled.data.job)


async def record_result(result: Envelope[SiteResult], uow: UnitOfWork, delivery: Delivery) -> None:
    """Verify, then store and re-rank; a result that fails a check is rejected with the reason, never retried.

    A result whose signer, job or benchmark this service has not heard of yet raises NotYetKnown: the events
    may still be on their way, so it is delivered again with backoff and finally dead-lettered.
    """
    store, site_result = Store(uow.session), result.data
    signer = None
    if result.signature is not None:
        signer = await store.signer(result.signature.key_id)
        if signer is None:
            raise NotYetKnown(f"key {result.signature.key_id} belongs to no actor the leaderboard knows yet")
    verdict = domain.check_origin(result, subject=delivery.subject, signer=signer)
    if verdict.ok:
        job = await store.job(site_result.job_id)
        if job is None:
            raise NotYetKnown(f"job {site_result.job_id} is not known to the leaderboard yet")
        benchmark = await store.benchmark(job.binding.benchmark_id, lock=True)
        if benchmark is None:
            raise NotYetKnown(f"benchmark {job.binding.benchmark_id} is not known to the leaderboard yet")
        verdict = domain.check_binding(site_result, job=job, benchmark=benchmark,
                                       accepted_before=await store.has_result(job.job_id))
    if not verdict.ok:
        log.warning("rejected result %s of job %s from site %s: %s",
                    result.id, site_result.job_id, site_result.site_id, verdict.reason)
        uow.emit(ResultRejected(message_id=result.id, site_id=site_result.site_id, job_id=site_result.job_id,
                                reason=verdict.reason))
        return
    await store.record(result)
    uow.emit(ResultAccepted(job_id=site_result.job_id, site_id=site_result.site_id, binding=site_result.binding,
                            metrics=dict(site_result.metrics)))
    board = domain.aggregate(benchmark, await store.scores(benchmark.benchmark_id))
    uow.emit(domain.standing(board, site_result.binding.model_id))


async def show_leaderboard(query: Envelope[ShowLeaderboard], uow: UnitOfWork) -> Leaderboard:
    """The current board of a benchmark: empty rows until a result is accepted; NotYetKnown for an unknown one."""
    store = Store(uow.session)
    benchmark = await store.benchmark(query.data.benchmark_id)
    if benchmark is None:
        raise NotYetKnown(f"benchmark {query.data.benchmark_id} is not known to the leaderboard (yet)")
    return domain.aggregate(benchmark, await store.scores(benchmark.benchmark_id))


WIRING = Wiring(
    owner=SERVICE, source=f"service:{SERVICE}",
    consumers=(Consumer(learn_actor), Consumer(learn_benchmark), Consumer(learn_job),
               Consumer(record_result, subject=subjects.RESULTS_ALL)),
    requests=(Request(show_leaderboard),),
    publishes=tuple(Outlet.event(e) for e in (ResultAccepted, ResultRejected, LeaderboardUpdated)),
)
