"""Scheduling handlers: learn from events, and after each, plan and dispatch the benchmark's missing jobs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from faststream import Context
from sqlmodel import select

from contracts import messages as m
from contracts import subjects
from contracts.envelope import Envelope, utcnow
from contracts.signing import KeyPair
from scheduling.domain import PlannedDataset, plan_jobs
from scheduling.models import Benchmark, Dataset, Job, Member, Model
from service_kit.edge import NotYetKnown
from service_kit.wiring import Consumer, Outlet, Wiring
from service_kit.work import Transaction, UnitOfWork

SERVICE = "scheduling"


@dataclass(frozen=True)
class Dispatch:
    """How jobs leave: signed with the scheduler's key (sites run only jobs it signed), valid for `ttl`."""

    key: KeyPair
    ttl: timedelta


Jobs = Annotated[Dispatch, Context("dispatch")]


async def plan(uow: Transaction, benchmark_id: str, dispatch: Dispatch) -> int:
    """Stage the missing jobs of a benchmark: a JobScheduled event and the signed job on its site's queue."""
    session = uow.session
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
    planned = plan_jobs(m.BenchmarkSpec.model_validate(benchmark.spec), models, datasets, existing,
                        expires_at=utcnow() + dispatch.ttl)
    for job in planned:
        session.add(Job(job_id=job.job_id, benchmark_id=benchmark_id, model_id=job.binding.model_id,
                        dataset_id=job.binding.dataset_id, site_id=job.site_id))
        uow.emit(m.JobScheduled(job=job), id=f"scheduled-{job.job_id}")
        uow.send(subjects.jobs(job.site_id), dispatch.key.sign(Envelope.wrap(job, source=f"service:{SERVICE}",
                                                                            id=job.job_id)))
    return len(planned)


async def learn_benchmark(registered: Envelope[m.BenchmarkRegistered], uow: UnitOfWork, dispatch: Jobs) -> None:
    spec = registered.data.benchmark
    if await uow.session.get(Benchmark, spec.benchmark_id) is None:
        uow.session.add(Benchmark(benchmark_id=spec.benchmark_id, spec=spec.model_dump(mode="json")))
    await plan(uow, spec.benchmark_id, dispatch)


async def learn_approval(approved: Envelope[m.BenchmarkApproved], uow: UnitOfWork, dispatch: Jobs) -> None:
    benchmark = await uow.session.get(Benchmark, approved.data.benchmark_id)
    if benchmark is None:
        raise NotYetKnown(f"benchmark {approved.data.benchmark_id} approved before its registration arrived")
    benchmark.approved = True
    uow.session.add(benchmark)
    await plan(uow, benchmark.benchmark_id, dispatch)


async def learn_model(registered: Envelope[m.ModelRegistered], uow: UnitOfWork, dispatch: Jobs) -> None:
    model = registered.data
    if await uow.session.get(Model, model.model_id) is None:
        uow.session.add(Model(model_id=model.model_id, digest=model.image.digest))
    await uow.session.flush()
    for member in (await uow.session.exec(select(Member).where(Member.entity_id == model.model_id))).all():
        await plan(uow, member.benchmark_id, dispatch)


async def learn_dataset(registered: Envelope[m.DatasetRegistered], uow: UnitOfWork, dispatch: Jobs) -> None:
    dataset = registered.data
    if await uow.session.get(Dataset, dataset.dataset_id) is None:
        uow.session.add(Dataset(dataset_id=dataset.dataset_id, site_id=dataset.site_id,
                                benchmark_id=dataset.benchmark_id, content_hash=dataset.content_hash,
                                case_count=dataset.case_count))
    await plan(uow, dataset.benchmark_id, dispatch)


async def learn_association(approved: Envelope[m.AssociationApproved], uow: UnitOfWork, dispatch: Jobs) -> None:
    member = approved.data
    if await uow.session.get(Member, (member.benchmark_id, member.kind.value, member.entity_id)) is None:
        uow.session.add(Member(benchmark_id=member.benchmark_id, kind=member.kind.value, entity_id=member.entity_id))
    await uow.session.flush()
    await plan(uow, member.benchmark_id, dispatch)


async def mark_done(accepted: Envelope[m.ResultAccepted], uow: UnitOfWork) -> None:
    job = await uow.session.get(Job, accepted.data.job_id)
    if job is not None:
        job.status = "DONE"
        uow.session.add(job)


WIRING = Wiring(
    owner=SERVICE, source=f"service:{SERVICE}",
    consumers=tuple(Consumer(handle) for handle in (learn_benchmark, learn_approval, learn_model, learn_dataset,
                                                     learn_association, mark_done)),
    publishes=(Outlet.event(m.JobScheduled), Outlet(subjects.JOBS_ALL, m.JobSpec)),
)
