"""Scheduling handlers: learn from events, and after each, plan and dispatch the benchmark's missing jobs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from faststream.nats import NatsRouter
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from contracts import messages as m
from contracts.catalog import EVENT_SUBJECTS
from contracts.envelope import Envelope
from contracts.signing import KeyPair
from contracts.subjects import jobs as jobs_subject
from scheduling.domain import PlannedDataset, plan_jobs
from scheduling.models import Benchmark, Dataset, Job, Member, Model
from service_kit.actors import NotYetKnown
from service_kit.app import Service
from service_kit.bus import durable_subscriber
from service_kit.outbox import stage, stage_event

SOURCE = "service:scheduling"


async def plan(session: AsyncSession, benchmark_id: str, signer: KeyPair) -> int:
    """Stage the missing jobs of a benchmark: a JobScheduled event and the signed job on its site's queue."""
    # the row lock serialises planning per benchmark: two transactions that each add half of a pair
    # (a dataset, its approval) cannot both miss the pair; the second sees the first's rows once it commits
    benchmark = await session.get(Benchmark, benchmark_id, with_for_update=True)
    if benchmark is None or not benchmark.approved:
        return 0
    members = (await session.exec(select(Member).where(Member.benchmark_id == benchmark_id))).all()
    model_ids = {x.entity_id for x in members if x.kind == "model"}
    dataset_ids = {x.entity_id for x in members if x.kind == "dataset"}
    models = {x.model_id: x.digest for x in (await session.exec(select(Model))).all() if x.model_id in model_ids}
    datasets = [PlannedDataset(d.dataset_id, d.site_id, d.content_hash, d.case_count)
                for d in (await session.exec(select(Dataset).where(Dataset.benchmark_id == benchmark_id))).all()
                if d.dataset_id in dataset_ids]
    existing = set((await session.exec(select(Job.job_id).where(Job.benchmark_id == benchmark_id))).all())
    spec = m.BenchmarkSpec.model_validate(benchmark.spec)
    planned = plan_jobs(spec, models, datasets, existing)
    for job in planned:
        session.add(Job(job_id=job.job_id, benchmark_id=job.benchmark_id, model_id=job.model_id,
                        dataset_id=job.dataset_id, site_id=job.site_id))
        stage_event(session, SOURCE, m.JobScheduled(job=job), id=f"scheduled-{job.job_id}")
        stage(session, jobs_subject(job.site_id), signer.sign(Envelope.wrap(job, source=SOURCE, id=job.job_id)))
    return len(planned)


def build_router(service: Service, signer: KeyPair) -> NatsRouter:
    router = NatsRouter()

    def then_plan(learn: Callable[[AsyncSession, Any], Awaitable[str | None]]):  # type: ignore[no-untyped-def]
        async def handle(session: AsyncSession, env: Envelope[Any]) -> None:
            benchmark_id = await learn(session, env.data)
            if benchmark_id is not None:
                await plan(session, benchmark_id, signer)
        return handle

    async def benchmark_registered(session: AsyncSession, e: m.BenchmarkRegistered) -> str:
        if await session.get(Benchmark, e.benchmark.benchmark_id) is None:
            session.add(Benchmark(benchmark_id=e.benchmark.benchmark_id, spec=e.benchmark.model_dump(mode="json")))
        return e.benchmark.benchmark_id

    async def benchmark_approved(session: AsyncSession, e: m.BenchmarkApproved) -> str:
        benchmark = await session.get(Benchmark, e.benchmark_id)
        if benchmark is None:
            raise NotYetKnown(f"benchmark {e.benchmark_id} approved before its registration arrived")
        benchmark.approved = True
        session.add(benchmark)
        return e.benchmark_id

    async def model_registered(session: AsyncSession, e: m.ModelRegistered) -> None:
        if await session.get(Model, e.model_id) is None:
            session.add(Model(model_id=e.model_id, digest=e.image.digest))
        await session.flush()
        for member in (await session.exec(select(Member).where(Member.entity_id == e.model_id))).all():
            await plan(session, member.benchmark_id, signer)

    async def dataset_registered(session: AsyncSession, e: m.DatasetRegistered) -> str:
        if await session.get(Dataset, e.dataset_id) is None:
            session.add(Dataset(dataset_id=e.dataset_id, site_id=e.site_id, benchmark_id=e.benchmark_id,
                                content_hash=e.content_hash, case_count=e.case_count))
        return e.benchmark_id

    async def association_approved(session: AsyncSession, e: m.AssociationApproved) -> str:
        if await session.get(Member, (e.benchmark_id, e.kind.value, e.entity_id)) is None:
            session.add(Member(benchmark_id=e.benchmark_id, kind=e.kind.value, entity_id=e.entity_id))
        await session.flush()
        return e.benchmark_id

    async def result_accepted(session: AsyncSession, e: m.ResultAccepted) -> None:
        job = await session.get(Job, e.job_id)
        if job is not None:
            job.status = "DONE"
            session.add(job)

    learners: list[tuple[type[m.Payload], Any]] = [
        (m.BenchmarkRegistered, benchmark_registered), (m.BenchmarkApproved, benchmark_approved),
        (m.ModelRegistered, model_registered), (m.DatasetRegistered, dataset_registered),
        (m.AssociationApproved, association_approved), (m.ResultAccepted, result_accepted),
    ]
    for event, learn in learners:
        durable_subscriber(router, subject=EVENT_SUBJECTS[event], durable=f"scheduling-{event.__name__.lower()}",
                           payload=event, db=service.db, publish=service.publish, handle=then_plan(learn))
    return router
