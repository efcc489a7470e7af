"""The leaderboard on the bus: learns actors and benchmarks from events, records signed results, answers queries."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from faststream import Context
from faststream.context import ContextRepo

from assay_telemetry.metrics import CHECK, OUTCOME, RESULTS
from contracts import subjects
from contracts.envelope import Envelope, utcnow
from contracts.sealing import seal
from contracts.messages import (
    ActorKeyRotated,
    ActorRegistered,
    ActorSuspended,
    AssociationApproved,
    AssociationRevoked,
    BenchmarkEdited,
    EntityArchived,
    BenchmarkRegistered,
    BenchmarkSpec,
    CheckCompleted,
    Leaderboard,
    LeaderboardUpdated,
    ResultAccepted,
    ResultRejected,
    ShowLeaderboard,
    SiteResult,
)
from leaderboard import domain
from leaderboard.current import Boards
from leaderboard.gathered import GatheredStore
from leaderboard.withdrawn import counts, marked, marks, retirement, withdrawals
from leaderboard.sharing import NOBODY, Asker, view
from leaderboard.store import Listed, Store
from service_kit.actors import authenticate, remember_actor, remember_suspension, remember_rotation
from service_kit.edge import Delivery, NotYetKnown, Refused, outside_window
from service_kit.trust import Trust
from service_kit.together import Arrival
from service_kit.wiring import Consumer, Outlet, Request, Wiring
from service_kit.work import Transaction, UnitOfWork

log = logging.getLogger(__name__)

SERVICE = "leaderboard"


@dataclass(frozen=True)
class ParkingTerms:
    wait: timedelta  # how long a result may wait for its site's key or its benchmark


Parking = Annotated[ParkingTerms, Context("parking")]
Trusted = Annotated[Trust, Context("trust")]  # every service's public key; the scheduler's signs the jobs
Made = Annotated[Boards, Context("boards")]  # the models this process pooled, each pooled again when its results change


async def current(store: Store, benchmark: BenchmarkSpec, boards: Boards) -> tuple[Leaderboard, list[Listed]]:
    """The whole board of `benchmark` as its accepted results make it now (those that count: see
    `leaderboard.withdrawn`), with each withdrawal marked on its rows; and the listing of what counts."""
    every, archived = await store.listing(benchmark.benchmark_id), await store.archived()
    withdrawn = withdrawals(await store.consents(benchmark.benchmark_id), archived, await store.suspended(),
                            [(r.model_id, r.model_owner, r.site_id, r.dataset_id) for r in every])
    listing = [r for r in every if counts(r.model_id, r.dataset_id, r.finished_at, withdrawn)]
    jobs = {r.job_id for r in listing}
    board = await boards.board(benchmark, [(r.model_id, r.job_id, r.said) for r in listing],
                               lambda models: store.scores(benchmark.benchmark_id, models, jobs))
    datasets: dict[str, set[str]] = {}
    for r in listing:
        datasets.setdefault(r.model_id, set()).add(r.dataset_id)
    board = marked(board, datasets, withdrawn).model_copy(
        update={"archived": retirement(archived, benchmark.benchmark_id)})
    return board, listing


async def learn_rotation(rotated: Envelope[ActorKeyRotated], uow: UnitOfWork) -> None:
    """The actor's new key from now on; the old one kept, retired, for what it signed before."""
    await remember_rotation(uow.session, rotated.data, rotated.time)


async def learn_suspension(suspended: Envelope[ActorSuspended], uow: UnitOfWork) -> None:
    """Nothing a suspended site signs from now on counts; its results and its owner's models' already on the board
    stay, marked."""
    await remember_suspension(uow.session, suspended.data, suspended.time)


async def learn_edit(edited: Envelope[BenchmarkEdited], uow: UnitOfWork) -> None:
    store = Store(uow.session)
    if await store.benchmark(edited.data.benchmark.benchmark_id) is None:
        raise NotYetKnown(f"benchmark {edited.data.benchmark.benchmark_id} edited before its registration arrived")
    await store.edit_benchmark(edited.data.benchmark)


async def learn_archival(archived: Envelope[EntityArchived], uow: UnitOfWork) -> None:
    gone = archived.data
    await Store(uow.session).archive(gone.kind.value, gone.entity_id, archived.time, gone.archived_by, gone.reason)


async def learn_revocation(revoked: Envelope[AssociationRevoked], uow: UnitOfWork) -> None:
    pair = revoked.data
    await Store(uow.session).note_consent(pair.benchmark_id, pair.kind.value, pair.entity_id, revoked.time,
                                          revoked=(pair.revoked_by, pair.reason))


async def learn_consent(approved: Envelope[AssociationApproved], uow: UnitOfWork) -> None:
    pair = approved.data
    await Store(uow.session).note_consent(pair.benchmark_id, pair.kind.value, pair.entity_id, approved.time)


async def learn_actor(registered: Envelope[ActorRegistered], uow: UnitOfWork, trust: Trusted) -> None:
    """Learn a key, and judge the results that waited for it."""
    await remember_actor(uow.session, registered.data)
    await release(Store(uow.session), uow, f"key {registered.data.key_id}", trust)


async def learn_benchmark(registered: Envelope[BenchmarkRegistered], uow: UnitOfWork, trust: Trusted) -> None:
    """Learn a benchmark, and judge the results that waited for it."""
    store = Store(uow.session)
    await store.remember_benchmark(registered.data)
    await release(store, uow, f"benchmark {registered.data.benchmark.benchmark_id}", trust)


async def record_result(result: Envelope[SiteResult], uow: UnitOfWork, delivery: Delivery, trust: Trusted,
                        park: Parking) -> None:
    """Verify, then store, and owe its board an announcement (`leaderboard.announce` makes one for a burst); a
    result that fails a check is rejected with the reason, never retried.

    A result carries the job the scheduler signed, so it never waits for another stream. One answering a genuine job
    whose site or benchmark this service has not heard of yet is parked, acknowledged, and judged when that arrives
    (or rejected once it has waited `park.wait`): it never holds the consumer, however many come.
    """
    store = Store(uow.session)
    await judge(store, uow, result, delivery.subject, trust)
    await expire(store, uow, park)


async def record_results(arrivals: Sequence[Arrival], uow: Transaction, context: ContextRepo) -> None:
    """`record_result` for each result of one fetch, in one unit of work (`service_kit.together`): the store reads
    what `judge` asks of each for all of them at once, and each is judged in turn, in its own trace."""
    trust, park = context.get("trust"), context.get("parking")
    store = GatheredStore(uow.session)
    await store.preload([arrival.envelope for arrival in arrivals])
    for arrival in arrivals:
        with arrival.traced():
            await judge(store, uow, arrival.envelope, arrival.subject, trust)  # type: ignore[arg-type]
    await expire(store, uow, park)


async def expire(store: Store, uow: Transaction, park: ParkingTerms) -> None:
    """Reject what has waited in the park longer than it may."""
    for stale, _, waited in await store.unpark(parked_before=utcnow() - park.wait):
        reject(uow, stale, f"{waited}: not known here after {park.wait}; not counted (register it, then re-send)",
               NOT_KNOWN)


async def judge(store: Store, uow: Transaction, result: Envelope[SiteResult], subject: str, trust: Trust) -> None:
    """Reject at once whatever can be judged now: the job must be the scheduler's (its key is known from the start),
    and a key that is not the registered key of the site the result names is refused. Only a genuine job whose site
    or benchmark this service has not heard of yet waits, parked."""
    site_result = result.data
    verdict = domain.check_job(site_result, scheduler_key=trust.keys["scheduling"])
    signer = None
    if verdict.ok and result.signature is not None:
        waiting_for = f"key {result.signature.key_id}"
        signer = await store.signer(result.signature.key_id)
        if signer is None and not await store.knows(site_result.site_id):
            await store.hold(waiting_for)  # then look again: the key may have arrived meanwhile
            if (signer := await store.signer(result.signature.key_id)) is None:
                return await store.park(result, subject, waiting_for)
    if verdict.ok:
        verdict = domain.check_origin(result, subject=subject, signer=signer)
    if verdict.ok:
        job = site_result.job.data
        waiting_for = f"benchmark {job.binding.benchmark_id}"
        if (benchmark := await store.benchmark(job.binding.benchmark_id, lock=True)) is None:
            await store.hold(waiting_for)
            if (benchmark := await store.benchmark(job.binding.benchmark_id, lock=True)) is None:
                return await store.park(result, subject, waiting_for)
        verdict = domain.check_binding(site_result, job=job, benchmark=benchmark,
                                       accepted_before=await store.counted_for(job))
    if verdict.ok and job.check is not None:  # a check before joining: its approver sees it; it never counts
        bound = site_result.binding
        sealed = seal(json.dumps(site_result.metrics).encode(), trust.keys["approval"])
        uow.emit(CheckCompleted(job_id=job.job_id, site_id=site_result.site_id, benchmark_id=bound.benchmark_id,
                                kind=job.check.kind, entity_id=job.check.entity_id, sealed_metrics=sealed,
                                case_count=bound.case_count), id=f"check-{job.job_id}")
        uow.count(RESULTS, {OUTCOME: "check"})
        return
    if verdict.ok:
        bound = site_result.binding
        withdrawn = await store.withdrawn(benchmark.benchmark_id, [(bound.model_id, job.model_owner,
                                                                    site_result.site_id, bound.dataset_id)])
        if not counts(bound.model_id, bound.dataset_id, site_result.finished_at, withdrawn):
            return reject(uow, result, f"withdrawn: {'; '.join(marks(bound.model_id, [bound.dataset_id], withdrawn))}",
                          WITHDRAWN)
    if not verdict.ok:
        return reject(uow, result, verdict.reason, str(verdict.check))
    await store.record(result)
    uow.emit(ResultAccepted(job_id=site_result.job_id, site_id=site_result.site_id, binding=site_result.binding))
    uow.count(RESULTS, {OUTCOME: "accepted"})
    await store.owe_board(benchmark.benchmark_id, site_result.binding.model_id)  # under the benchmark's row lock


async def release(store: Store, uow: Transaction, waiting_for: str, trust: Trust) -> None:
    await store.hold(waiting_for)
    for parked, subject, _ in await store.unpark(waiting_for=waiting_for):
        await judge(store, uow, parked, subject, trust)


# what a rejection's `assay.check` says besides the checks of domain.Check: the pair was withdrawn before the result
# finished, or its site or benchmark was still not known here when it had waited its time
WITHDRAWN, NOT_KNOWN = "withdrawn", "not_known"


def reject(uow: Transaction, result: Envelope[SiteResult], reason: str, check: str) -> None:
    """Refuse it, with the reason, and count it by the check it failed."""
    log.warning("rejected result %s of job %s from site %s: %s", result.id, result.data.job_id,
                result.data.site_id, reason)
    uow.emit(ResultRejected(message_id=result.id, site_id=result.data.site_id, job_id=result.data.job_id,
                            reason=reason))
    uow.count(RESULTS, {OUTCOME: "rejected", CHECK: check})


async def show_leaderboard(query: Envelope[ShowLeaderboard], uow: UnitOfWork, boards: Made) -> Leaderboard:
    """The board of a benchmark as much as the asker may see of it (by its signature; unsigned: the public view):
    empty rows until a result is accepted; NotYetKnown for an unknown benchmark."""
    store = Store(uow.session)
    benchmark_id = query.data.benchmark_id
    benchmark = await store.benchmark(benchmark_id)
    if benchmark is None:
        raise NotYetKnown(f"benchmark {benchmark_id} is not known to the leaderboard (yet)")
    asker = NOBODY
    if query.signature is not None:  # a signed query is held to a command's window: a captured one ages out
        if late := outside_window(query, utcnow()):
            raise Refused(late)
        actor = await authenticate(uow.session, query)
        asker = Asker(actor.actor_id, actor.role, tuple(actor.also))
    board, listing = await current(store, benchmark, boards)
    return view(board, benchmark, owner_id=await store.owner(benchmark_id) or "", asker=asker,
                model_owners={row.model_id: row.model_owner for row in listing},
                site_order=[row.site_id for row in listing])


WIRING = Wiring(
    owner=SERVICE, source=f"service:{SERVICE}",
    consumers=(Consumer(learn_actor), Consumer(learn_benchmark), Consumer(learn_revocation), Consumer(learn_consent),
               Consumer(learn_edit), Consumer(learn_archival), Consumer(learn_suspension),
               Consumer(learn_rotation),
               # a fetch is one batch (`service_kit.together`): 256 waiting results take 4 commits and 4 relay flushes
               # where 64 a fetch took 16
               Consumer(record_result, subject=subjects.RESULTS_ALL, batch=256, together=record_results)),
    requests=(Request(show_leaderboard),),
    publishes=tuple(Outlet.event(e) for e in (ResultAccepted, ResultRejected, LeaderboardUpdated, CheckCompleted)),
)
