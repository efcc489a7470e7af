"""Scheduling handlers: learn from events, and after each, plan and dispatch the benchmark's missing jobs; record
what sites report of their jobs, and answer where each job stands."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from faststream import Context
from sqlmodel import col, select

from contracts import messages as m
from contracts import subjects
from contracts.envelope import Envelope, aware, utcnow
from contracts.signing import KeyPair
from scheduling.domain import PlannedDataset, dataset_check, model_check, plan_jobs
from scheduling.models import Benchmark, Dataset, ImageKey, Job, Member, Model
from service_kit.actors import KnownActor, authenticate, remember_actor, remember_suspension, remember_rotation
from service_kit.edge import Delivery, NotYetKnown, Refused
from service_kit.wiring import Consumer, Outlet, Request, Wiring
from service_kit.work import Transaction, UnitOfWork

log = logging.getLogger(__name__)
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
    if benchmark is None or not benchmark.approved or benchmark.archived:
        return 0
    members = (await session.exec(select(Member).where(Member.benchmark_id == benchmark_id))).all()
    model_ids = {x.entity_id for x in members if x.kind == "model"}
    dataset_ids = {x.entity_id for x in members if x.kind == "dataset"}
    suspended = set((await session.exec(select(KnownActor.actor_id).where(
        col(KnownActor.suspended).is_not(None)))).all())  # a suspended site or owner gets no job, again or anew
    known = [x for x in (await session.exec(select(Model))).all()
             if x.model_id in model_ids and not x.archived and x.owner_id not in suspended]
    models, owners = {x.model_id: x.digest for x in known}, {x.model_id: x.owner_id for x in known}
    archives = {x.digest: m.Archive.model_validate(x.archive) for x in known if x.archive}
    keys = {(k.image, k.site_id): k.sealed_key for k in (await session.exec(select(ImageKey))).all()
            if k.image in models.values()}
    datasets = [PlannedDataset(d.dataset_id, d.site_id, d.content_hash, d.case_count)
                for d in (await session.exec(select(Dataset).where(Dataset.benchmark_id == benchmark_id))).all()
                if d.dataset_id in dataset_ids and not d.archived and d.site_id not in suspended]
    jobs = (await session.exec(select(Job.job_id, Job.status).where(Job.benchmark_id == benchmark_id))).all()
    planned = plan_jobs(m.BenchmarkSpec.model_validate(benchmark.spec), models, datasets, {j for j, _ in jobs},
                        expires_at=utcnow() + dispatch.ttl, owners=owners, archives=archives, keys=keys,
                        cancelled={j for j, status in jobs if status == m.JobState.CANCELLED.value})
    for job in planned:
        dispatched(uow, job, dispatch)
    return len(planned)


def dispatched(uow: Transaction, job: m.JobSpec, dispatch: Dispatch) -> None:
    """Stage one job: its row, its JobScheduled event, and the signed job on its site's queue."""
    uow.session.add(Job(job_id=job.job_id, benchmark_id=job.binding.benchmark_id, model_id=job.binding.model_id,
                        dataset_id=job.binding.dataset_id, site_id=job.site_id, spec=job.model_dump(mode="json")))
    uow.emit(m.JobScheduled(job=job), id=f"scheduled-{job.job_id}")
    uow.send(subjects.jobs(job.site_id), dispatch.key.sign(Envelope.wrap(job, source=f"service:{SERVICE}",
                                                                        id=job.job_id)))


async def learn_request(requested: Envelope[m.AssociationRequested], uow: UnitOfWork, dispatch: Jobs) -> None:
    """A request to join runs its check first: a model on the benchmark's demo data at its check site, or the
    benchmark's reference model on a dataset at the dataset's site. One check per request; none for a benchmark
    without demo data (a model) or that is archived."""
    pair, session = requested.data, uow.session
    benchmark = await session.get(Benchmark, pair.benchmark_id)
    if benchmark is None:
        raise NotYetKnown(f"benchmark {pair.benchmark_id} asked to join before its registration arrived")
    spec, expires = m.BenchmarkSpec.model_validate(benchmark.spec), utcnow() + dispatch.ttl
    if benchmark.archived:
        return
    if pair.kind is m.EntityKind.MODEL:
        if (model := await session.get(Model, pair.entity_id)) is None:
            raise NotYetKnown(f"model {pair.entity_id} asked to join before its registration arrived")
        sealed = await session.get(ImageKey, (model.digest, spec.check_site)) if spec.check_site else None
        job = model_check(spec, requested.id, model.model_id, model.digest, expires, owner=model.owner_id,
                          archive=m.Archive.model_validate(model.archive) if model.archive else None,
                          key=sealed.sealed_key if sealed else None)
    else:
        if (dataset := await session.get(Dataset, pair.entity_id)) is None:
            raise NotYetKnown(f"dataset {pair.entity_id} asked to join before its registration arrived")
        job = dataset_check(spec, requested.id, PlannedDataset(dataset.dataset_id, dataset.site_id,
                                                              dataset.content_hash, dataset.case_count),
                            expires, owner=benchmark.owner_id)
    if job is not None and await session.get(Job, job.job_id) is None:
        dispatched(uow, job, dispatch)


async def learn_benchmark(registered: Envelope[m.BenchmarkRegistered], uow: UnitOfWork, dispatch: Jobs) -> None:
    spec = registered.data.benchmark
    if await uow.session.get(Benchmark, spec.benchmark_id) is None:
        uow.session.add(Benchmark(benchmark_id=spec.benchmark_id, spec=spec.model_dump(mode="json"),
                                  owner_id=registered.data.owner_id))
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
        archive = model.image.archive.model_dump(mode="json") if model.image.archive else None
        uow.session.add(Model(model_id=model.model_id, digest=model.image.digest, owner_id=model.owner_id,
                              archive=archive))
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


OPEN = (m.JobState.SCHEDULED.value, m.JobState.HELD.value)  # not run yet, or run and waiting at its site


async def learn_revocation(revoked: Envelope[m.AssociationRevoked], uow: UnitOfWork) -> None:
    """Consent withdrawn: the pair is planned no more, and its open jobs are cancelled, each with the reason."""
    pair = revoked.data
    member = await uow.session.get(Member, (pair.benchmark_id, pair.kind.value, pair.entity_id))
    if member is not None:
        await uow.session.delete(member)
    column = Job.model_id if pair.kind is m.EntityKind.MODEL else Job.dataset_id
    await cancel_open(uow, select(Job).where(Job.benchmark_id == pair.benchmark_id, column == pair.entity_id),
                      f"{pair.kind.value} {pair.entity_id} was revoked from {pair.benchmark_id} by "
                      f"{pair.revoked_by}: {pair.reason}")


async def learn_archival(archived: Envelope[m.EntityArchived], uow: UnitOfWork) -> None:
    """An archived benchmark, model or dataset is never planned again, and its open jobs are cancelled."""
    gone = archived.data
    table, column = {m.EntityType.BENCHMARK: (Benchmark, Job.benchmark_id), m.EntityType.MODEL: (Model, Job.model_id),
                     m.EntityType.DATASET: (Dataset, Job.dataset_id)}.get(gone.kind, (None, None))
    if table is None:
        return
    if (row := await uow.session.get(table, gone.entity_id)) is not None:
        row.archived = True
        uow.session.add(row)
    await cancel_open(uow, select(Job).where(column == gone.entity_id),
                      f"{gone.kind.value} {gone.entity_id} was archived by {gone.archived_by}: {gone.reason}")


async def learn_rotation(rotated: Envelope[m.ActorKeyRotated], uow: UnitOfWork) -> None:
    """The actor's new key from now on; the old one kept, retired, for what it signed before."""
    await remember_rotation(uow.session, rotated.data, rotated.time)


async def learn_suspension(suspended: Envelope[m.ActorSuspended], uow: UnitOfWork) -> None:
    """A suspended site runs nothing more, a suspended owner's models run nowhere: their open jobs are cancelled."""
    actor = await remember_suspension(uow.session, suspended.data, suspended.time)
    models = [x.model_id for x in (await uow.session.exec(select(Model).where(Model.owner_id == actor.actor_id))).all()]
    reason = f"{actor.role} {actor.actor_id} was suspended by the operator: {suspended.data.reason}"
    await cancel_open(uow, select(Job).where((Job.site_id == actor.actor_id) | col(Job.model_id).in_(models)), reason)


async def learn_edit(edited: Envelope[m.BenchmarkEdited], uow: UnitOfWork, dispatch: Jobs) -> None:
    """Jobs planned from now on carry the benchmark as edited (its limits, say); those planned stay as signed."""
    spec = edited.data.benchmark
    if (benchmark := await uow.session.get(Benchmark, spec.benchmark_id)) is None:
        raise NotYetKnown(f"benchmark {spec.benchmark_id} edited before its registration arrived")
    benchmark.spec = spec.model_dump(mode="json")
    uow.session.add(benchmark)
    await plan(uow, spec.benchmark_id, dispatch)


async def cancel_open(uow: UnitOfWork, jobs, reason: str) -> None:  # type: ignore[no-untyped-def]
    """Each open job of `jobs` is cancelled: announced, and put, signed, under its key of the cancelled bucket, which
    its site looks up before it runs a job (a job waiting in the queue of a site that is offline is never run)."""
    for job in (await uow.session.exec(jobs)).all():
        if job.status in OPEN:
            job.status, job.reason, job.updated_at = m.JobState.CANCELLED.value, reason, utcnow()
            uow.session.add(job)
            uow.emit(state_changed(job, m.JobState.CANCELLED, reason))
            uow.send(subjects.cancelled(job.site_id, job.job_id), uow.signed(
                m.JobCancelled(job_id=job.job_id, site_id=job.site_id, reason=reason[:2000]),
                id=f"cancelled-{job.job_id}"))


async def grant_image_key(grant: Envelope[m.GrantImageKey], uow: UnitOfWork, dispatch: Jobs) -> m.CommandReply:
    """The owner of a private image gives one site its key; the image's jobs at that site are planned now."""
    cmd = grant.data
    owner = await authenticate(uow.session, grant, m.Role.MODEL_OWNER)
    models = (await uow.session.exec(select(Model).where(Model.digest == cmd.image))).all()
    if not models:
        raise NotYetKnown(f"no model with image {cmd.image} is known here (yet)")
    if any(model.owner_id != owner.actor_id for model in models):
        raise Refused(f"image {cmd.image} is not {owner.actor_id}'s: only its owner gives its key")
    if not any(model.archive and model.archive.get("encrypted") for model in models):
        raise Refused(f"image {cmd.image} was not pushed private (`assay model push --private`): it needs no key")
    held = await uow.session.get(ImageKey, (cmd.image, cmd.site_id))
    if held is None:
        held = ImageKey(image=cmd.image, site_id=cmd.site_id, sealed_key=cmd.sealed_key, granted_by=owner.actor_id)
    held.sealed_key = cmd.sealed_key  # a key given again replaces the first: jobs planned from now on carry it
    uow.session.add(held)
    await uow.session.flush()
    planned = 0
    ids = {model.model_id for model in models}
    for member in (await uow.session.exec(select(Member).where(Member.kind == "model"))).all():
        if member.entity_id in ids:
            planned += await plan(uow, member.benchmark_id, dispatch)
    return m.CommandReply(ok=True, message=f"site {cmd.site_id} holds the key of {cmd.image}; {planned} job(s) "
                                           "planned for it now")


async def learn_actor(registered: Envelope[m.ActorRegistered], uow: UnitOfWork) -> None:
    """Sites' keys: what a site reports of its jobs is signed with its own."""
    await remember_actor(uow.session, registered.data)


async def record_report(report: Envelope[m.SiteReport], uow: UnitOfWork, delivery: Delivery) -> None:
    """A site's word on one of its jobs (refused, failed, held, declined): signed by that site, about a job sent to
    it, on its own subject. A later word replaces an earlier one; nothing replaces a result on the board."""
    said = report.data
    if delivery.subject != subjects.reports(said.site_id):
        raise Refused(f"a report naming site {said.site_id} came on {delivery.subject}; each site reports on its own")
    actor = await authenticate(uow.session, report, m.Role.SITE)
    if actor.actor_id != said.site_id:
        raise Refused(f"a report naming site {said.site_id} is signed by {actor.actor_id}")
    job = await uow.session.get(Job, said.job_id, with_for_update=True)
    if job is None or job.site_id != said.site_id:
        raise Refused(f"site {said.site_id} reports on job {said.job_id}, which was never sent to it")
    if job.status in (m.JobState.DONE, m.JobState.CANCELLED) or said.at < aware(job.updated_at):
        log.info("job %s is %s since %s: the %s report of %s does not change it", job.job_id, job.status,
                 job.updated_at, said.state, said.at)
        return
    job.status, job.reason, job.updated_at = said.state.value, said.reason, said.at
    uow.session.add(job)
    uow.emit(state_changed(job, said.state, said.reason))


def check_of(job: Job) -> m.CheckOf | None:
    return m.CheckOf.model_validate(job.spec["check"]) if job.spec.get("check") else None


def state_changed(job: Job, state: m.JobState, reason: str) -> m.JobStateChanged:
    return m.JobStateChanged(job_id=job.job_id, site_id=job.site_id, benchmark_id=job.benchmark_id,
                             model_id=job.model_id, state=state, reason=reason, check=check_of(job))



def status_of(job: Job) -> m.JobStatus:
    return m.JobStatus(job_id=job.job_id, benchmark_id=job.benchmark_id, model_id=job.model_id,
                       dataset_id=job.dataset_id, site_id=job.site_id, state=m.JobState(job.status),
                       reason=job.reason, updated_at=aware(job.updated_at), check=check_of(job))


async def list_jobs(query: Envelope[m.ListJobs], uow: UnitOfWork) -> m.JobList:
    asked = query.data
    chosen = select(Job)
    for column, wanted in ((Job.benchmark_id, asked.benchmark_id), (Job.site_id, asked.site_id),
                           (Job.status, asked.state.value if asked.state else None)):
        if wanted is not None:
            chosen = chosen.where(column == wanted)
    rows = (await uow.session.exec(chosen.order_by(Job.updated_at.desc()).limit(asked.limit))).all()  # type: ignore[attr-defined]
    return m.JobList(jobs=tuple(status_of(job) for job in rows))


async def get_job(query: Envelope[m.GetJob], uow: UnitOfWork) -> m.JobDetails:
    """A job by its id, or by the unique start of one (the tables show the first characters)."""
    start = query.data.job_id
    begins = Job.job_id.startswith(start, autoescape=True)  # type: ignore[attr-defined]
    found = (await uow.session.exec(select(Job).where(begins).limit(2))).all()
    if len(found) != 1:
        more = "more than one job begins with it; give more of its id" if found else "no job has it"
        raise Refused(f"job {start}: {more}; `assay job list` shows the jobs there are")
    return m.JobDetails(status=status_of(found[0]), job=m.JobSpec.model_validate(found[0].spec))


async def mark_done(accepted: Envelope[m.ResultAccepted], uow: UnitOfWork) -> None:
    await done(uow, accepted.data.job_id)


async def mark_checked(checked: Envelope[m.CheckCompleted], uow: UnitOfWork) -> None:
    """A check's result was verified and went to its approver: the check job is done."""
    await done(uow, checked.data.job_id)


async def done(uow: UnitOfWork, job_id: str) -> None:
    job = await uow.session.get(Job, job_id)
    if job is not None:
        job.status, job.reason, job.updated_at = m.JobState.DONE.value, "", utcnow()
        uow.session.add(job)


WIRING = Wiring(
    owner=SERVICE, source=f"service:{SERVICE}",
    consumers=(*(Consumer(handle) for handle in (learn_actor, learn_benchmark, learn_approval, learn_model,
                                                 learn_dataset, learn_association, learn_revocation, learn_archival,
                                                 learn_edit, learn_suspension, learn_rotation, learn_request,
                                                 mark_done, mark_checked)),
               Consumer(record_report, subject=subjects.REPORTS_ALL)),
    requests=(Request(list_jobs), Request(get_job), Request(grant_image_key)),
    publishes=(Outlet.event(m.JobScheduled), Outlet.event(m.JobStateChanged), Outlet(subjects.JOBS_ALL, m.JobSpec),
               Outlet(subjects.CANCELLED_ALL, m.JobCancelled)),
)
