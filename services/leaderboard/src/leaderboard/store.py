"""The leaderboard's unit of work over its tables, inside the transaction the kit opened for one message."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from contracts.envelope import Envelope, aware, utcnow
from contracts.messages import BenchmarkRegistered, BenchmarkSpec, Confusion, Histograms, JobSpec, SiteResult
from leaderboard.board import Score
from leaderboard.domain import Signer
from leaderboard.models import AcceptedResult, Archived, BoardDue, KnownBenchmark, PairConsent, ParkedResult
from leaderboard.withdrawn import Consents, Withdrawal, withdrawals
from service_kit.actors import KnownActor, RetiredKey
from service_kit.inbox import digest


class Store:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def remember_benchmark(self, event: BenchmarkRegistered) -> None:
        """The first registration of a benchmark wins: its metrics are what results are checked against."""
        spec = event.benchmark
        if await self.session.get(KnownBenchmark, spec.benchmark_id) is None:
            self.session.add(KnownBenchmark(benchmark_id=spec.benchmark_id, owner_id=event.owner_id,
                                            spec=spec.model_dump(mode="json")))

    async def edit_benchmark(self, spec: BenchmarkSpec) -> None:
        """The registry let its owner change it (nothing that defines results, once it has any)."""
        row = await self.session.get(KnownBenchmark, spec.benchmark_id)
        if row is not None:
            row.spec = spec.model_dump(mode="json")
            self.session.add(row)

    async def archive(self, kind: str, entity_id: str, at: datetime, by: str, reason: str) -> None:
        if await self.session.get(Archived, (kind, entity_id)) is None:
            self.session.add(Archived(kind=kind, entity_id=entity_id, at=at, by=by, reason=reason))

    async def archived(self) -> dict[tuple[str, str], Withdrawal]:
        rows = (await self.session.exec(select(Archived))).all()
        return {(r.kind, r.entity_id): Withdrawal(r.at, r.by, r.reason, what="archived") for r in rows}

    async def suspended(self) -> dict[str, Withdrawal]:
        rows = (await self.session.exec(select(KnownActor).where(col(KnownActor.suspended).is_not(None)))).all()
        return {r.actor_id: Withdrawal(r.suspended_at or datetime.min, "the operator", r.suspended or "",
                                       what=f"suspended (its {'site' if r.role == 'site' else 'owner'})")
                for r in rows}

    async def withdrawn(self, benchmark_id: str,
                        results: Iterable[tuple[str, str | None, str, str]]) -> dict[tuple[str, str], Withdrawal]:
        """Every withdrawal that concerns these results of the benchmark (see `leaderboard.withdrawn`)."""
        return withdrawals(await self.consents(benchmark_id), await self.archived(), await self.suspended(), results)

    async def owner(self, benchmark_id: str) -> str | None:
        row = await self.session.get(KnownBenchmark, benchmark_id)
        return None if row is None else row.owner_id

    async def benchmark(self, benchmark_id: str, *, lock: bool = False) -> BenchmarkSpec | None:
        """`lock`: hold the row until commit, so replicas re-rank one benchmark one result at a time."""
        row = await self.session.get(KnownBenchmark, benchmark_id, with_for_update=lock)
        return None if row is None else BenchmarkSpec.model_validate(row.spec)

    async def hold(self, waiting_for: str) -> None:
        """Serialise, until commit, the transactions that park and release results waiting for the same thing, so a
        result parked while its key arrives is never left behind (PostgreSQL runs them side by side; SQLite one at a
        time already)."""
        if self.session.bind.dialect.name == "postgresql":  # type: ignore[union-attr]
            await self.session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": waiting_for})

    async def park(self, result: Envelope[SiteResult], subject: str, waiting_for: str) -> None:
        body = result.model_dump_json().encode()
        if await self.session.get(ParkedResult, digest(body)) is None:
            self.session.add(ParkedResult(digest=digest(body), waiting_for=waiting_for, subject=subject, body=body))

    async def unpark(self, *, waiting_for: str | None = None,
                     parked_before: datetime | None = None) -> list[tuple[Envelope[SiteResult], str, str]]:
        """The parked results waiting for `waiting_for`, or parked before `parked_before`, taken out of the park:
        each with the subject it came on and what it waited for."""
        query = select(ParkedResult).order_by(col(ParkedResult.parked_at))
        if waiting_for is not None:
            query = query.where(ParkedResult.waiting_for == waiting_for)
        if parked_before is not None:
            query = query.where(col(ParkedResult.parked_at) < parked_before)
        rows = (await self.session.exec(query)).all()
        for row in rows:
            await self.session.delete(row)
        return [(Envelope[SiteResult].model_validate_json(row.body), row.subject, row.waiting_for) for row in rows]

    async def signer(self, key_id: str) -> Signer | None:
        """The actor holding `key_id`, or that held it until it retired it (with when)."""
        actor = (await self.session.exec(select(KnownActor).where(KnownActor.key_id == key_id))).first()
        if actor is not None:
            return Signer(actor_id=actor.actor_id, role=actor.role, public_key=actor.public_key,
                          also=tuple(actor.also))
        if (retired := await self.session.get(RetiredKey, key_id)) is None:
            return None
        holder = await self.session.get(KnownActor, retired.actor_id)
        return None if holder is None else Signer(actor_id=holder.actor_id, role=holder.role,
                                                  public_key=retired.public_key, retired_at=retired.retired_at,
                                                  also=tuple(holder.also))

    async def knows(self, actor_id: str) -> bool:
        """Whether `actor_id` is registered here (with the one key it may sign with: the first registration wins)."""
        return await self.session.get(KnownActor, actor_id) is not None

    async def counted_for(self, job: JobSpec) -> str | None:
        """The job whose result counts for the model and dataset `job` binds, if one was accepted (`job` itself, or
        another round of the pair)."""
        if await self.session.get(AcceptedResult, job.job_id) is not None:
            return job.job_id
        bound = job.binding
        return (await self.session.exec(select(AcceptedResult.job_id).where(
            AcceptedResult.benchmark_id == bound.benchmark_id, AcceptedResult.model_id == bound.model_id,
            AcceptedResult.dataset_id == bound.dataset_id).limit(1))).first()

    async def record(self, envelope: Envelope[SiteResult]) -> None:
        self.session.add(self.row_of(envelope))
        await self.session.flush()  # a racing replica's row for the same job fails here, and this message is retried

    @staticmethod
    def row_of(envelope: Envelope[SiteResult]) -> AcceptedResult:
        return AcceptedResult(**Store.values_of(envelope, utcnow()))

    @staticmethod
    def values_of(envelope: Envelope[SiteResult], accepted_at: datetime) -> dict[str, Any]:
        """The columns of the result's row (a batch inserts them as plain rows: `GatheredStore.record`)."""
        result, bound = envelope.data, envelope.data.binding
        evidence = result.evidence
        replicated = sorted(evidence.replicates) if evidence else []
        return dict(
            accepted_at=accepted_at, job_id=result.job_id, message_id=envelope.id, benchmark_id=bound.benchmark_id,
            model_id=bound.model_id, dataset_id=bound.dataset_id, site_id=result.site_id,
            model_owner=result.job.data.model_owner,
            metrics=dict(result.metrics), case_count=bound.case_count, metrics_hash=result.metrics_hash,
            worker_id=result.worker_id, finished_at=result.finished_at,
            aggregates=evidence.model_dump(mode="json", exclude={"replicates"}) if evidence else {},
            replicated=replicated,
            replicates=np.array([evidence.replicates[name] for name in replicated], dtype=np.float64).tobytes()
            if evidence and replicated else None,
        )

    async def listing(self, benchmark_id: str) -> list[Listed]:
        """What the benchmark's accepted results are, without their replicates, in the order they were accepted."""
        rows = (await self.session.exec(
            select(AcceptedResult.model_id, AcceptedResult.job_id, AcceptedResult.site_id, AcceptedResult.model_owner,
                   AcceptedResult.metrics, AcceptedResult.case_count, AcceptedResult.dataset_id,
                   AcceptedResult.finished_at)
            .where(AcceptedResult.benchmark_id == benchmark_id)
            .order_by(col(AcceptedResult.accepted_at), col(AcceptedResult.job_id))
        )).all()
        return [Listed(model, job, site, owner, f"{json.dumps(metrics, sort_keys=True)} {cases}", dataset, finished)
                for model, job, site, owner, metrics, cases, dataset, finished in rows]

    async def scores(self, benchmark_id: str, models: Sequence[str], jobs: set[str]) -> list[Score]:
        """The accepted results of these models in the benchmark that count (`jobs`), as the board needs them."""
        # the columns a score needs, as plain rows: ORM objects (and their identity map) cost more than the reading
        rows = (await self.session.exec(
            select(AcceptedResult.job_id, AcceptedResult.model_id, AcceptedResult.site_id, AcceptedResult.metrics,
                   AcceptedResult.case_count, AcceptedResult.aggregates, AcceptedResult.replicated,
                   AcceptedResult.replicates)
            .where(AcceptedResult.benchmark_id == benchmark_id, col(AcceptedResult.model_id).in_(list(models)))
        )).all()
        return [score_of(row) for row in rows if row.job_id in jobs]  # type: ignore[arg-type]

    async def owe_board(self, benchmark_id: str, model_id: str) -> None:
        """Note, with the result that changed it, that the board of `benchmark_id` must be announced for `model_id`
        (the caller holds the benchmark's row: results and announcements of one benchmark take turns)."""
        due = await self.session.get(BoardDue, benchmark_id) or BoardDue(benchmark_id=benchmark_id)
        if model_id not in due.models:
            due.models = [*due.models, model_id]  # a new list: the JSON column sees the change
        self.session.add(due)

    async def boards_due(self) -> list[tuple[str, datetime]]:
        """The benchmarks whose boards are owed an announcement, and since when, longest owed first."""
        return [(benchmark_id, since) for benchmark_id, since in (await self.session.exec(
            select(BoardDue.benchmark_id, BoardDue.since).order_by(col(BoardDue.since)))).all()]

    async def take_due(self, benchmark_id: str, *, owed_since: datetime | None = None) -> list[str]:
        """The models the board of `benchmark_id` is owed an announcement for, no longer owed once this transaction
        commits; none when another replica announced it meanwhile, or (given `owed_since`) when it has been owed again
        only since a moment after `owed_since` (its window is still open)."""
        due = await self.session.get(BoardDue, benchmark_id, populate_existing=True)
        if due is None or (owed_since is not None and aware(due.since) > owed_since):
            return []
        await self.session.delete(due)
        return list(due.models)

    async def consents(self, benchmark_id: str) -> Consents:
        rows = (await self.session.exec(select(PairConsent).where(PairConsent.benchmark_id == benchmark_id))).all()
        return Consents(revoked={(r.kind, r.entity_id): Withdrawal(r.revoked_at, r.revoked_by, r.reason)
                                 for r in rows if r.revoked_at is not None},
                        approved={(r.kind, r.entity_id): r.approved_at for r in rows if r.approved_at is not None})

    async def note_consent(self, benchmark_id: str, kind: str, entity_id: str, at: datetime, *,
                           revoked: tuple[str, str] | None = None) -> None:
        """Keep the later of each: a revocation (`revoked`: by whom, why) or an approval at `at`."""
        row = await self.session.get(PairConsent, (benchmark_id, kind, entity_id), with_for_update=True) or \
            PairConsent(benchmark_id=benchmark_id, kind=kind, entity_id=entity_id)
        if revoked is not None and (row.revoked_at is None or aware(row.revoked_at) < aware(at)):
            row.revoked_at, (row.revoked_by, row.reason) = at, revoked
        if revoked is None and (row.approved_at is None or aware(row.approved_at) < aware(at)):
            row.approved_at = at
        self.session.add(row)


@dataclass(frozen=True)
class Listed:
    model_id: str
    job_id: str
    site_id: str
    model_owner: str | None
    said: str  # its metrics and cases: a row changed in the database makes its model pooled again
    dataset_id: str
    finished_at: datetime


def score_of(row: AcceptedResult) -> Score:
    aggregates = row.aggregates or {}
    replicates: dict[str, np.ndarray] = {}
    if row.replicates is not None and row.replicated:
        rows = np.frombuffer(row.replicates, dtype=np.float64).reshape(len(row.replicated), -1)
        replicates = dict(zip(row.replicated, rows, strict=True))
    confusion, histograms = aggregates.get("confusion"), aggregates.get("histograms")
    return Score(model_id=row.model_id, site_id=row.site_id, metrics=row.metrics, case_count=row.case_count,
                 replicates=replicates, confusion=Confusion.model_validate(confusion) if confusion else None,
                 histograms=Histograms.model_validate(histograms) if histograms else None)
