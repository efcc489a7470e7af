"""Scheduling handlers: learn from events, and after each, plan and dispatch the benchmark's missing jobs; record
what sites report of their jobs, and answer where each job stands."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from faststream import Context
from faststream.context import ContextRepo
from sqlmodel import col, select

from contracts import messages as m
from contracts import subjects
from contracts.envelope import Envelope, aware, utcnow
from contracts.signing import KeyPair
from scheduling.domain import PlannedDataset, dataset_check, model_check, plan_jobs
from contracts.catalog import service_of
from scheduling.models import Benchmark, Dataset, DeadLetter, ImageKey, Job, LetterReplay, Member, Model
from service_kit.actors import authenticate, remember_actor, remember_suspension, remember_rotation, suspended_ids
from service_kit.edge import Delivery, NotYetKnown, Refused
from service_kit.together import Arrival
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
    suspended = await suspended_ids(session)  # a suspended site or owner gets no job, again or anew
    known = [x for x in (await session.exec(select(Model))).all()
             if x.model_id in model_ids and not x.archived and x.owner_id not in suspended]
    models, owners = {x.model_id: x.digest for x in known}, {x.model_id: x.owner_id for x in known}
    archives = {x.digest: m.Archive.model_validate(x.archive) for x in known if x.archive}
    keys = {(k.image, k.site_id): k.sealed_key for k in (await session.exec(select(ImageKey))).all()
            if k.image in models.values()}
    datasets = [PlannedDataset(d.dataset_id, d.site_id, d.content_hash, d.case_count)
                for d in (await session.exec(select(Dataset).where(Dataset.benchmark_id == benchmark_id))).all()
                if d.dataset_id in dataset_ids and not d.archived and d.site_id not in suspended]
    jobs = (await session.exec(select(Job.job_id, Job.status, Job.retried_as).where(
        Job.benchmark_id == benchmark_id))).all()
    planned = plan_jobs(m.BenchmarkSpec.model_validate(benchmark.spec), models, datasets, {j for j, _, _ in jobs},
                        expires_at=utcnow() + dispatch.ttl, owners=owners, archives=archives, keys=keys,
                        cancelled={j for j, status, later in jobs  # what no longer stands for its pair
                                   if status == m.JobState.CANCELLED.value or later is not None})
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
    await record(uow, report, delivery.subject, await uow.session.get(Job, report.data.job_id, with_for_update=True))


async def record_reports(arrivals: Sequence[Arrival], uow: Transaction, context: ContextRepo) -> None:
    """`record_report` for each report of one fetch, in turn, in one unit of work (`service_kit.together`): their
    jobs locked and read in one query, in the order of their ids (two replicas' batches never wait on each other in a
    circle), where one message each would cost a transaction each."""
    ids = sorted({arrival.envelope.data.job_id for arrival in arrivals})  # type: ignore[attr-defined]
    jobs = {job.job_id: job for job in (await uow.session.exec(select(Job).where(col(Job.job_id).in_(ids)).order_by(
        col(Job.job_id)).with_for_update())).all()}
    for arrival in arrivals:
        with arrival.traced():  # the JobStateChanged it stages continues the report's trace
            await record(uow, arrival.envelope, arrival.subject, jobs.get(arrival.envelope.data.job_id))  # type: ignore


async def record(uow: Transaction, report: Envelope[m.SiteReport], subject: str, job: Job | None) -> None:
    """The report on `job` (its row, locked), checked (its subject, its signature, its job) before it changes
    anything."""
    said = report.data
    if subject != subjects.reports(said.site_id):
        raise Refused(f"a report naming site {said.site_id} came on {subject}; each site reports on its own")
    actor = await authenticate(uow.session, report, m.Role.SITE)
    if actor.actor_id != said.site_id:
        raise Refused(f"a report naming site {said.site_id} is signed by {actor.actor_id}")
    if job is None or job.site_id != said.site_id:
        raise Refused(f"site {said.site_id} reports on job {said.job_id}, which was never sent to it")
    if job.status in (m.JobState.DONE, m.JobState.CANCELLED) or (said.at < aware(job.updated_at)
                                                                 and not job.from_letter):
        log.info("job %s is %s since %s: the %s report of %s does not change it", job.job_id, job.status,
                 job.updated_at, said.state, said.at)
        return
    job.status, job.reason, job.updated_at, job.attempts = said.state.value, said.reason, said.at, said.attempt
    job.from_letter = False
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
                       reason=job.reason, updated_at=aware(job.updated_at), check=check_of(job),
                       attempts=job.attempts, retried_as=job.retried_as)


async def list_jobs(query: Envelope[m.ListJobs], uow: UnitOfWork) -> m.JobList:
    asked = query.data
    chosen = select(Job)
    for column, wanted in ((Job.benchmark_id, asked.benchmark_id), (Job.site_id, asked.site_id),
                           (Job.status, asked.state.value if asked.state else None)):
        if wanted is not None:
            chosen = chosen.where(column == wanted)
    rows = (await uow.session.exec(chosen.order_by(Job.updated_at.desc()).limit(asked.limit))).all()  # type: ignore[attr-defined]
    return m.JobList(jobs=tuple(status_of(job) for job in rows))


async def get_job_row(session, start: str) -> Job:  # type: ignore[no-untyped-def]
    """A job by its id, or by the unique start of one (the tables show the first characters), and a round of it by
    that start and its round (`job-11dc49d-r1`)."""
    if (exact := await session.get(Job, start)) is not None:
        return exact  # type: ignore[no-any-return]
    named = re.fullmatch(r"(?P<start>.+?)(?P<round>-r\d+)?", start)
    assert named is not None
    begins = Job.job_id.startswith(named["start"], autoescape=True)  # type: ignore[attr-defined]
    found = [job for job in (await session.exec(select(Job).where(begins).limit(1000))).all()
             if job.job_id.endswith(named["round"] or "") and (named["round"] or round_of(job.job_id) == job.job_id)]
    if len(found) != 1:
        more = "more than one job begins with it; give more of its id" if found else "no job has it"
        raise Refused(f"job {start}: {more}; `assay job list` shows the jobs there are")
    return found[0]  # type: ignore[no-any-return]


async def get_job(query: Envelope[m.GetJob], uow: UnitOfWork) -> m.JobDetails:
    job = await get_job_row(uow.session, query.data.job_id)
    return m.JobDetails(status=status_of(job), job=m.JobSpec.model_validate(job.spec))


RETRYABLE = (m.JobState.REFUSED.value, m.JobState.FAILED.value)
ROUND = re.compile(r"^(?P<base>.+?)(?:-r\d+)?$")


def round_of(job_id: str) -> str:
    """The job a round runs again: `job-…` for `job-…-r2`."""
    return ROUND.fullmatch(job_id)["base"]  # type: ignore[index]


async def retry_jobs(command: Envelope[m.RetryJobs], uow: UnitOfWork, dispatch: Jobs) -> m.CommandReply:
    """Run again what was refused or failed, once its cause is fixed: each job a new round (`<id>-r<n>`), signed and
    sent to its site anew, its old row pointing to it. The operator may retry any job, a benchmark's owner its
    benchmark's, a site its own; a job whose pair or entity is withdrawn stays as it is."""
    cmd, session = command.data, uow.session
    actor = await authenticate(session, command, m.Role.OPERATOR, m.Role.BENCHMARK_OWNER, m.Role.SITE)
    chosen = select(Job).where(col(Job.retried_as).is_(None))
    if cmd.job_id is not None:
        job = (await get_job_row(session, cmd.job_id))
        chosen = chosen.where(Job.job_id == job.job_id)
    for column, wanted in ((Job.benchmark_id, cmd.benchmark_id), (Job.site_id, cmd.site_id)):
        if wanted is not None:
            chosen = chosen.where(column == wanted)
    jobs = (await session.exec(chosen.order_by(col(Job.job_id)))).all()
    owners = {b.benchmark_id: b.owner_id for b in (await session.exec(select(Benchmark))).all()}

    def may(job: Job) -> bool:
        return (m.Role.OPERATOR.value in (actor.role, *actor.also)
                or actor.actor_id in (owners.get(job.benchmark_id), job.site_id))

    if cmd.job_id is not None:
        if not jobs:
            raise Refused(f"job {cmd.job_id} was retried already; `assay job show {cmd.job_id}` names the round "
                          "that runs it again")
        if not may(jobs[0]):
            raise Refused(f"{actor.actor_id} may not retry job {jobs[0].job_id}: the operator, the owner of benchmark "
                          f"{jobs[0].benchmark_id} and site {jobs[0].site_id} may")
        if jobs[0].status not in RETRYABLE:
            raise Refused(f"job {jobs[0].job_id} is {jobs[0].status}: only a REFUSED or FAILED job is retried")
    retried, wanted = [], await Wanted.now(session)
    for job in jobs:
        if job.status in RETRYABLE and may(job) and await wanted(session, job):
            retried.append((job.job_id, await again(uow, job, dispatch)))
    if cmd.job_id is not None and not retried:
        raise Refused(f"job {cmd.job_id} is not run again: its pair's consent was withdrawn, or its benchmark, model "
                      "or dataset archived, or its site or model owner suspended")
    said = "; ".join(f"{old} as {new}" for old, new in retried)
    return m.CommandReply(ok=True, message=f"{len(retried)} job(s) sent again" + (f": {said}" if said else
                                                                                      ": none REFUSED or FAILED"))


@dataclass(frozen=True)
class Wanted:
    """Whether a job's pair is still one to run: approved, nothing of it archived, nobody of it suspended (the
    actors and the approved pairs read once, for every job one command retries)."""

    suspended: frozenset[str]
    members: frozenset[tuple[str, str, str]]  # (benchmark, kind, entity)

    @classmethod
    async def now(cls, session) -> Wanted:  # type: ignore[no-untyped-def]
        suspended = await suspended_ids(session)
        members = (await session.exec(select(Member.benchmark_id, Member.kind, Member.entity_id))).all()
        return cls(frozenset(suspended), frozenset(tuple(row) for row in members))

    async def __call__(self, session, job: Job) -> bool:  # type: ignore[no-untyped-def]
        benchmark = await session.get(Benchmark, job.benchmark_id)
        model, dataset = await session.get(Model, job.model_id), await session.get(Dataset, job.dataset_id)
        if benchmark is None or benchmark.archived or (model is not None and model.archived) or (
                dataset is not None and dataset.archived):
            return False
        if job.site_id in self.suspended or (model is not None and model.owner_id in self.suspended):
            return False
        if job.spec.get("check"):  # a check before joining answers its request, whatever the consent says yet
            return True
        return {(job.benchmark_id, "model", job.model_id), (job.benchmark_id, "dataset", job.dataset_id)} <= \
            self.members


async def again(uow: Transaction, job: Job, dispatch: Dispatch) -> str:
    """The next round of `job`: its spec as it was signed, under the next round's id and a new expiry."""
    base = round_of(job.job_id)
    rounds = (await uow.session.exec(select(Job.job_id).where(
        Job.job_id.startswith(base, autoescape=True)))).all()  # type: ignore[attr-defined]
    taken = [j for j in rounds if round_of(j) == base]
    spec = m.JobSpec.model_validate(job.spec).model_copy(update={
        "job_id": f"{base}-r{len(taken)}", "expires_at": utcnow() + dispatch.ttl})
    job.retried_as, job.reason = spec.job_id, f"{job.reason}; retried as {spec.job_id}"[:2000]
    uow.session.add(job)
    dispatched(uow, spec, dispatch)
    return spec.job_id


async def record_dead_letter(letter: Envelope[m.DeadLetter], uow: UnitOfWork, delivery: Delivery) -> None:
    """Keep what a consumer gave up on, for the operator. A site that gave up on a job it never reported on (a
    message it could not read, say) leaves that job FAILED with the reason, never SCHEDULED for ever; a site speaks
    only of its own queue's jobs."""
    said, session = letter.data, uow.session
    if await session.get(DeadLetter, letter.id) is None:
        session.add(DeadLetter(letter_id=letter.id, consumer=said.consumer, subject=said.subject,
                               message_id=said.message_id, deliveries=said.deliveries, error=said.error[:4000],
                               at=letter.time, stream=said.stream, sequence=said.sequence))
    site = subjects.site_of_queue(said.consumer)
    if site is None or delivery.subject != subjects.dead_letter(said.consumer):
        return
    job = await session.get(Job, said.message_id, with_for_update=True)
    if job is None or job.site_id != site or job.status not in (*OPEN, m.JobState.RUNNING.value):
        return
    if job.status == m.JobState.HELD.value:
        return  # its result waits at the site: what was dead-lettered is a replay of it
    reason = f"its site gave up on it after {said.deliveries} deliveries: {said.error}"[:2000]
    job.status, job.reason, job.updated_at, job.from_letter = m.JobState.FAILED.value, reason, letter.time, True
    session.add(job)
    uow.emit(state_changed(job, m.JobState.FAILED, reason))


async def list_dead_letters(query: Envelope[m.ListDeadLetters], uow: UnitOfWork) -> m.DeadLetterList:
    """What the consumers gave up on, newest first: the operator's to see (an error may name what a sender sent)."""
    await authenticate(uow.session, query, m.Role.OPERATOR)
    asked = query.data
    chosen = select(DeadLetter)
    if asked.consumer is not None:
        chosen = chosen.where(DeadLetter.consumer == asked.consumer)
    if asked.letter_id is not None:
        chosen = chosen.where(DeadLetter.letter_id.startswith(asked.letter_id, autoescape=True))  # type: ignore[attr-defined]
    rows = (await uow.session.exec(chosen.order_by(col(DeadLetter.at).desc()).limit(asked.limit))).all()
    replays: dict[tuple[str, str], list[m.LetterReplay]] = {}
    for replay in (await uow.session.exec(select(LetterReplay).where(
            col(LetterReplay.consumer).in_({row.consumer for row in rows})).order_by(col(LetterReplay.at)))).all():
        replays.setdefault((replay.consumer, replay.message_id), []).append(m.LetterReplay(
            outcome=m.ReplayOutcome(replay.outcome), reason=replay.reason, replayed_by=replay.replayed_by,
            at=aware(replay.at)))
    return m.DeadLetterList(letters=tuple(m.DeadLetterView(
        letter_id=row.letter_id, consumer=row.consumer, subject=row.subject, message_id=row.message_id,
        deliveries=row.deliveries, error=row.error, at=aware(row.at), stream=row.stream, sequence=row.sequence,
        replays=tuple(replays.get((row.consumer, row.message_id), ()))) for row in rows))


async def record_replay(replayed: Envelope[m.DeadLetterReplayed], uow: UnitOfWork) -> None:
    """What became of a letter's message that the operator had run again, as the service that ran it said (signed by
    it): kept with every letter of that message, for `assay dead-letters list|show`. A service speaks only of its
    own consumers."""
    said = replayed.data
    if service_of(said.consumer) != said.service:
        raise Refused(f"{said.service} told of a replay of {said.consumer}, which is not one of its consumers")
    if await uow.session.get(LetterReplay, replayed.id) is None:
        uow.session.add(LetterReplay(replay_id=replayed.id, consumer=said.consumer, message_id=said.message_id,
                                     outcome=said.outcome.value, reason=said.reason, replayed_by=said.replayed_by,
                                     at=replayed.time))


async def mark_done(accepted: Envelope[m.ResultAccepted], uow: UnitOfWork) -> None:
    await done(uow, accepted.data.job_id)


async def mark_all_done(arrivals: Sequence[Arrival], uow: Transaction, context: ContextRepo) -> None:
    """`mark_done` for each ResultAccepted of one fetch, in one unit of work (`service_kit.together`): their jobs read
    in one query, where one message each would cost a transaction each."""
    await done(uow, *(arrival.envelope.data.job_id for arrival in arrivals))  # type: ignore[attr-defined]


async def mark_checked(checked: Envelope[m.CheckCompleted], uow: UnitOfWork) -> None:
    """A check's result was verified and went to its approver: the check job is done."""
    await done(uow, checked.data.job_id)


async def done(uow: UnitOfWork, *job_ids: str) -> None:
    for job in (await uow.session.exec(select(Job).where(col(Job.job_id).in_(job_ids)))).all():
        job.status, job.reason, job.updated_at = m.JobState.DONE.value, "", utcnow()
        uow.session.add(job)


WIRING = Wiring(
    owner=SERVICE, source=f"service:{SERVICE}",
    consumers=(*(Consumer(handle) for handle in (learn_actor, learn_benchmark, learn_approval, learn_model,
                                                 learn_dataset, learn_association, learn_revocation, learn_archival,
                                                 learn_edit, learn_suspension, learn_rotation, learn_request,
                                                 mark_checked, record_replay)),
               Consumer(mark_done, batch=64, together=mark_all_done),
               Consumer(record_report, subject=subjects.REPORTS_ALL, batch=64, together=record_reports),
               Consumer(record_dead_letter, subject=subjects.DEAD_LETTERS_ALL)),
    requests=(Request(list_jobs), Request(get_job), Request(grant_image_key), Request(retry_jobs),
              Request(list_dead_letters)),
    publishes=(Outlet.event(m.JobScheduled), Outlet.event(m.JobStateChanged), Outlet(subjects.JOBS_ALL, m.JobSpec),
               Outlet(subjects.CANCELLED_ALL, m.JobCancelled)),
)
