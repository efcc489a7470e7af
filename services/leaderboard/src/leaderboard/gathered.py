"""The store as a batch of results reads it (`record_results`): what `judge` asks of each result is read for all of
them at once, after the batch's benchmarks are locked as one result locks its own, and what one result records the
next one sees, so each is judged as it would be alone, in turn. Only what was found is kept: anything not found (a
key nobody registered, a benchmark not known yet) is asked of the database again, as `judge` asks it alone."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sqlmodel import col, select

from contracts.envelope import Envelope, utcnow
from contracts.messages import BenchmarkSpec, JobSpec, SiteResult
from leaderboard.domain import Signer
from leaderboard.models import AcceptedResult, BoardDue
from leaderboard.store import Store
from leaderboard.withdrawn import Consents, Withdrawal, withdrawals
from service_kit.actors import KnownActor
from service_kit.db import add_at_commit

Pair = tuple[str, str, str]  # (benchmark, model, dataset): what counts once


class GatheredStore(Store):
    def __init__(self, session) -> None:  # type: ignore[no-untyped-def]
        super().__init__(session)
        self._benchmarks: dict[str, BenchmarkSpec] = {}
        self._signers: dict[str, Signer] = {}
        self._counted_jobs: set[str] = set()
        self._counted_pairs: dict[Pair, str] = {}
        self._consents: dict[str, Consents] = {}
        self._archived: dict[tuple[str, str], Withdrawal] | None = None
        self._suspended: dict[str, Withdrawal] | None = None
        self._due: dict[str, BoardDue] = {}

    async def preload(self, results: Sequence[Envelope[SiteResult]]) -> None:
        """Lock the benchmarks the results name, in one order (two replicas' batches never wait on each other in a
        circle), then read the results' signers and what already counts for their jobs and pairs."""
        jobs = [result.data.job.data for result in results]
        for benchmark_id in sorted({job.binding.benchmark_id for job in jobs}):
            if (benchmark := await super().benchmark(benchmark_id, lock=True)) is not None:
                self._benchmarks[benchmark_id] = benchmark
        key_ids = {result.signature.key_id for result in results if result.signature is not None}
        for actor in (await self.session.exec(select(KnownActor).where(col(KnownActor.key_id).in_(key_ids)))).all():
            self._signers[actor.key_id] = Signer(actor_id=actor.actor_id, role=actor.role,
                                                 public_key=actor.public_key, also=tuple(actor.also))
        bound = [job.binding for job in jobs]
        rows = (await self.session.exec(select(
            AcceptedResult.job_id, AcceptedResult.benchmark_id, AcceptedResult.model_id, AcceptedResult.dataset_id)
            .where(col(AcceptedResult.job_id).in_({job.job_id for job in jobs})
                   | (col(AcceptedResult.benchmark_id).in_({b.benchmark_id for b in bound})
                      & col(AcceptedResult.model_id).in_({b.model_id for b in bound})
                      & col(AcceptedResult.dataset_id).in_({b.dataset_id for b in bound}))))).all()
        for job_id, benchmark_id, model_id, dataset_id in rows:
            self._count(job_id, (benchmark_id, model_id, dataset_id))

    def _count(self, job_id: str, pair: Pair) -> None:
        self._counted_jobs.add(job_id)
        self._counted_pairs.setdefault(pair, job_id)

    async def benchmark(self, benchmark_id: str, *, lock: bool = False) -> BenchmarkSpec | None:
        return self._benchmarks.get(benchmark_id) or await super().benchmark(benchmark_id, lock=lock)

    async def signer(self, key_id: str) -> Signer | None:
        return self._signers.get(key_id) or await super().signer(key_id)

    async def counted_for(self, job: JobSpec) -> str | None:
        if job.job_id in self._counted_jobs:
            return job.job_id
        bound = job.binding
        return self._counted_pairs.get((bound.benchmark_id, bound.model_id, bound.dataset_id))

    async def withdrawn(self, benchmark_id: str,
                        results: Iterable[tuple[str, str | None, str, str]]) -> dict[tuple[str, str], Withdrawal]:
        if benchmark_id not in self._consents:
            self._consents[benchmark_id] = await self.consents(benchmark_id)
        if self._archived is None or self._suspended is None:
            self._archived, self._suspended = await self.archived(), await self.suspended()
        return withdrawals(self._consents[benchmark_id], self._archived, self._suspended, results)

    async def owe_board(self, benchmark_id: str, model_id: str) -> None:
        """As `Store.owe_board`, with the owed row held for the whole batch: the session keeps a clean row only weakly,
        so one dropped between two results was read again for each (a SELECT, after an autoflush of all the batch had
        staged so far: every result's rows written one result at a time, where the commit writes them all at once)."""
        if (due := self._due.get(benchmark_id)) is None:
            due = await self.session.get(BoardDue, benchmark_id) or BoardDue(benchmark_id=benchmark_id)
            self._due[benchmark_id] = due
        if model_id not in due.models:
            due.models = [*due.models, model_id]  # a new list: the JSON column sees the change
        self.session.add(due)

    async def record(self, envelope: Envelope[SiteResult]) -> None:
        """Kept with the batch, its row written with the others at the commit (`add_at_commit`: nothing in the batch
        reads it back; `counted_for` asks what `_count` kept). A racing replica's row for the same job fails the
        commit, and each result then goes alone."""
        add_at_commit(self.session, AcceptedResult.__table__, self.values_of(envelope, utcnow()))  # type: ignore
        bound = envelope.data.binding
        self._count(envelope.data.job_id, (bound.benchmark_id, bound.model_id, bound.dataset_id))
