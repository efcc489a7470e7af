"""Approval handlers: the operator's word on each benchmark, and two-party consent on each pair (request, invite,
approve, reject, revoke, auto-approval policies), every step kept in the pair's append-only history."""

from __future__ import annotations

import json
from collections.abc import Callable

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from approval import consent, domain
from approval.models import FAILED, ApprovalPolicy, Association, AssociationEntry, Benchmark, Check, Entity
from contracts import messages as m
from contracts import subjects
from contracts.envelope import Envelope, utcnow
from contracts.sealing import SealError
from service_kit.actors import KnownActor, authenticate, remember_actor, remember_suspension, remember_rotation
from service_kit.edge import NotYetKnown, Refused
from service_kit.wiring import Consumer, Outlet, Request, Wiring
from service_kit.work import UnitOfWork

SERVICE = "approval"
PENDING = (consent.Status.REQUESTED, consent.Status.INVITED)
SIDES = (m.Role.BENCHMARK_OWNER, m.Role.MODEL_OWNER, m.Role.SITE)  # who may be a side of a pair


async def _benchmark(session: AsyncSession, benchmark_id: str) -> Benchmark:
    benchmark = await session.get(Benchmark, benchmark_id)
    if benchmark is None:
        raise NotYetKnown(f"benchmark {benchmark_id!r} is not known (register it first)")
    return benchmark


async def approve_benchmark(command: Envelope[m.ApproveBenchmark], uow: UnitOfWork) -> m.CommandReply:
    operator = await authenticate(uow.session, command, m.Role.OPERATOR)
    benchmark = await _benchmark(uow.session, command.data.benchmark_id)
    if benchmark.approved:
        return m.CommandReply(ok=True, message=f"benchmark {benchmark.benchmark_id} is already approved")
    benchmark.approved, benchmark.rejected = True, None
    uow.session.add(benchmark)
    uow.emit(m.BenchmarkApproved(benchmark_id=benchmark.benchmark_id, approved_by=operator.actor_id))
    return m.CommandReply(ok=True, message=f"benchmark {benchmark.benchmark_id} approved: OPERATION")


async def reject_benchmark(command: Envelope[m.RejectBenchmark], uow: UnitOfWork) -> m.CommandReply:
    operator = await authenticate(uow.session, command, m.Role.OPERATOR)
    benchmark = await _benchmark(uow.session, command.data.benchmark_id)
    if benchmark.approved:
        raise Refused(f"benchmark {benchmark.benchmark_id} is approved already; it can be archived, not rejected")
    benchmark.rejected = command.data.reason
    uow.session.add(benchmark)
    uow.emit(m.BenchmarkRejected(benchmark_id=benchmark.benchmark_id, rejected_by=operator.actor_id,
                                 reason=command.data.reason))
    return m.CommandReply(ok=True, message=f"benchmark {benchmark.benchmark_id} rejected: {command.data.reason}")


class Pairs:
    """A pair's consent as the plain core sees it, loaded from and saved to the tables."""

    def __init__(self, uow: UnitOfWork) -> None:
        self.uow, self.session = uow, uow.session

    async def load(self, benchmark_id: str, kind: m.EntityKind, entity_id: str,
                   joining: bool = False) -> tuple[consent.Pair, Benchmark]:
        """The pair; `joining` (a request, an invitation) needs its entity known here. A decision about an entity not
        known yet has nothing to decide: the pair has no history, and the core says so."""
        benchmark = await _benchmark(self.session, benchmark_id)
        entity = await self.session.get(Entity, (kind.value, entity_id))
        if entity is None and joining:
            raise NotYetKnown(f"{kind.value} {entity_id!r} is not known (register it first)")
        if entity is None:
            entity = Entity(kind=kind.value, entity_id=entity_id, owner_id="", benchmark_id=benchmark_id)
        rows = (await self.session.exec(
            select(AssociationEntry).where(AssociationEntry.benchmark_id == benchmark_id,
                                           AssociationEntry.kind == kind.value,
                                           AssociationEntry.entity_id == entity_id)
            .order_by(col(AssociationEntry.id)))).all()
        history = tuple(consent.Entry(consent.Action(r.action), r.actor, r.at, r.reason, r.by_policy) for r in rows)
        pair = consent.Pair(benchmark_owner=benchmark.owner_id, entity_owner=entity.owner_id,
                            entity=f"{kind.value} {entity_id}", benchmark=benchmark_id, history=history)
        if kind is m.EntityKind.DATASET and entity.benchmark_id != benchmark_id:
            raise Refused(f"dataset {entity_id} was prepared for benchmark {entity.benchmark_id}, not {benchmark_id}")
        return pair, benchmark

    async def policy(self, benchmark_id: str, kind: m.EntityKind) -> consent.Policy:
        row = await self.session.get(ApprovalPolicy, (benchmark_id, kind.value))
        return consent.Policy() if row is None else consent.Policy(row.mode, frozenset(row.allowed))

    async def save(self, before: consent.Pair, after: consent.Pair, kind: m.EntityKind, entity_id: str) -> None:
        """Add the new entries, keep the pair's status beside them, and announce each step."""
        key = dict(benchmark_id=after.benchmark, kind=kind.value, entity_id=entity_id)
        for entry in after.history[len(before.history):]:
            self.session.add(AssociationEntry(**key, action=entry.action.value, actor=entry.actor, at=entry.at,
                                              reason=entry.reason, by_policy=entry.by_policy))
            self.uow.emit(announcement(entry, after.benchmark, kind, entity_id))
            if entry.action is consent.Action.REQUESTED and (old := await self.session.get(Check, tuple(key.values()))):
                await self.session.delete(old)  # a new request runs a new check: the last one's word is gone
        row = await self.session.get(Association, (after.benchmark, kind.value, entity_id))
        if row is None:
            row = Association(**key, requested_by=after.asked_by or "")
        row.status, row.requested_by = str(after.status), after.asked_by or row.requested_by
        row.approved_by = after.history[-1].actor if after.schedulable else None
        self.session.add(row)


def announcement(entry: consent.Entry, benchmark_id: str, kind: m.EntityKind, entity_id: str) -> m.Payload:
    pair = dict(benchmark_id=benchmark_id, kind=kind, entity_id=entity_id)
    action = consent.Action
    if entry.action is action.REQUESTED:
        return m.AssociationRequested(**pair, requested_by=entry.actor)
    if entry.action is action.INVITED:
        return m.AssociationInvited(**pair, invited_by=entry.actor)
    if entry.action in (action.APPROVED, action.ACCEPTED):
        return m.AssociationApproved(**pair, approved_by=entry.actor, by_policy=entry.by_policy)
    if entry.action is action.REJECTED:
        return m.AssociationRejected(**pair, rejected_by=entry.actor, reason=entry.reason)
    return m.AssociationRevoked(**pair, revoked_by=entry.actor, reason=entry.reason)


async def decide(uow: UnitOfWork, command: Envelope[m.Payload], benchmark_id: str, kind: m.EntityKind, entity_id: str,
                 step, *roles: m.Role, joining: bool = False,  # type: ignore[no-untyped-def]
                 then: Callable[[consent.Pair], str] = lambda _: "") -> m.CommandReply:
    """Authenticate, load the pair, take the step (a function of the pair, the actor who signed and the policy), save.
    `joining`: a request or invitation, which only a benchmark the operator approved takes. What is already so (the
    same command sent twice) says so and changes nothing. `then` adds what the pair's new state means to the reply."""
    actor = await authenticate(uow.session, command, *roles)
    pairs = Pairs(uow)
    pair, benchmark = await pairs.load(benchmark_id, kind, entity_id, joining)
    if joining and (reason := domain.refuse_request(benchmark)) is not None:
        raise Refused(reason)
    if joining and (entity := await uow.session.get(Entity, (kind.value, entity_id))) and entity.archived:
        raise Refused(f"{kind.value} {entity_id} is archived: it joins nothing any more")
    try:
        after = step(pair, actor, await pairs.policy(benchmark_id, kind))
    except consent.Already as already:
        return m.CommandReply(ok=True, message=str(already))
    except consent.Refusal as refusal:
        raise Refused(str(refusal)) from None
    await pairs.save(pair, after, kind, entity_id)
    return m.CommandReply(ok=True, message=outcome(after, after.history[-1]) + then(after))


def outcome(pair: consent.Pair, last: consent.Entry) -> str:
    status, where = pair.status, pair.benchmark
    if status is consent.Status.REQUESTED:
        return f"{pair.entity} asked to join {where}; waiting for the benchmark owner"
    if status is consent.Status.INVITED:
        return f"{pair.entity} invited to join {where}; its owner accepts with `assay association request`"
    if status is consent.Status.APPROVED:
        return f"{pair.entity} approved for {where}" + (" by the benchmark's approval policy" if last.by_policy else "")
    if status is consent.Status.REJECTED:
        return f"{pair.entity} rejected for {where}: {last.reason}"
    return f"{pair.entity} revoked from {where}: {last.reason}; its open jobs are cancelled, its results marked"


async def request_association(command: Envelope[m.RequestAssociation], uow: UnitOfWork) -> m.CommandReply:
    """The entity's owner asks to join (or accepts an invitation). Its check runs first (a dataset's always, a model's
    where the benchmark has demo data); the benchmark's policy may approve it at once, or once its check passed."""
    cmd = command.data
    role = m.Role.MODEL_OWNER if cmd.kind is m.EntityKind.MODEL else m.Role.SITE
    benchmark = await uow.session.get(Benchmark, cmd.benchmark_id)  # `decide` says so when it is unknown
    checking = cmd.kind is m.EntityKind.DATASET or (benchmark is not None and benchmark.checks_models)
    what = "on the benchmark's demo data" if cmd.kind is m.EntityKind.MODEL else "with its reference model"

    def where_its_check_is(pair: consent.Pair) -> str:
        if not checking or pair.status is not consent.Status.REQUESTED:
            return ""
        return (f", who sees its check ({what}) in `assay association show {cmd.benchmark_id} --{cmd.kind.value} "
                f"{cmd.entity_id}`")

    return await decide(uow, command, cmd.benchmark_id, cmd.kind, cmd.entity_id,
                        lambda pair, actor, policy: consent.request(pair, actor.actor_id, utcnow(), policy,
                                                                    actor.organisation, checking),
                        role, joining=True, then=where_its_check_is)


async def failed_check(session: AsyncSession, pair: m.PairOf) -> tuple[Check | None, str | None]:
    """The pair's check, and why it failed (None: it passed, runs still, or there is none)."""
    check = await session.get(Check, (pair.benchmark_id, pair.kind.value, pair.entity_id))
    return check, f"{check.state.lower()}: {check.reason}" if check is not None and check.state in FAILED else None


async def invite_association(command: Envelope[m.InviteAssociation], uow: UnitOfWork) -> m.CommandReply:
    cmd = command.data
    _, failed = await failed_check(uow.session, cmd)
    return await decide(uow, command, cmd.benchmark_id, cmd.kind, cmd.entity_id,
                        lambda pair, actor, _: consent.invite(pair, actor.actor_id, utcnow(), failed),
                        m.Role.BENCHMARK_OWNER, joining=True)


async def approve_association(command: Envelope[m.ApproveAssociation], uow: UnitOfWork) -> m.CommandReply:
    """The benchmark's owner consents; a request whose check failed only with an override, kept in the history."""
    cmd = command.data
    check, failed = await failed_check(uow.session, cmd)
    running = check is not None and check.state not in (*FAILED, "PASSED")
    return await decide(uow, command, cmd.benchmark_id, cmd.kind, cmd.entity_id,
                        lambda pair, actor, _: consent.approve(pair, actor.actor_id, utcnow(), cmd.override, failed),
                        m.Role.BENCHMARK_OWNER,
                        then=lambda pair: f", before its check finished ({check.state})" if running else "")


async def reject_association(command: Envelope[m.RejectAssociation], uow: UnitOfWork) -> m.CommandReply:
    cmd = command.data
    return await decide(uow, command, cmd.benchmark_id, cmd.kind, cmd.entity_id,
                        lambda pair, actor, _: consent.reject(pair, actor.actor_id, cmd.reason, utcnow()), *SIDES)


async def revoke_association(command: Envelope[m.RevokeAssociation], uow: UnitOfWork) -> m.CommandReply:
    cmd = command.data
    return await decide(uow, command, cmd.benchmark_id, cmd.kind, cmd.entity_id,
                        lambda pair, actor, _: consent.revoke(pair, actor.actor_id, cmd.reason, utcnow()), *SIDES)


async def set_approval_policy(command: Envelope[m.SetApprovalPolicy], uow: UnitOfWork) -> m.CommandReply:
    cmd = command.data
    owner = await authenticate(uow.session, command, m.Role.BENCHMARK_OWNER)
    benchmark = await _benchmark(uow.session, cmd.benchmark_id)
    if benchmark.owner_id != owner.actor_id:
        raise Refused(f"only the owner of benchmark {cmd.benchmark_id} ({benchmark.owner_id}) sets its policies")
    if cmd.mode is m.ApprovalMode.ALLOW and not cmd.allowed:
        raise Refused("an allow-list policy needs the actors or organisations it approves (--allow ID, repeated)")
    row = await uow.session.get(ApprovalPolicy, (cmd.benchmark_id, cmd.kind.value)) or ApprovalPolicy(
        benchmark_id=cmd.benchmark_id, kind=cmd.kind.value, mode=cmd.mode.value)
    row.mode, row.allowed = cmd.mode.value, sorted(cmd.allowed) if cmd.mode is m.ApprovalMode.ALLOW else []
    uow.session.add(row)
    uow.emit(m.ApprovalPolicySet(benchmark_id=cmd.benchmark_id, kind=cmd.kind, mode=cmd.mode,
                                 allowed=tuple(row.allowed), set_by=owner.actor_id))
    who = {"never": "none: the owner decides each", "always": "every one",
           "allow": f"those of {', '.join(row.allowed)}"}[cmd.mode.value]
    return m.CommandReply(ok=True, message=f"{cmd.kind.value} requests to {cmd.benchmark_id} approved at once: {who}")


async def list_associations(query: Envelope[m.ListAssociations], uow: UnitOfWork) -> m.AssociationList:
    """What the asker may see: its benchmarks' pairs, its own entities' pairs, or (the operator) all."""
    asker = await authenticate(uow.session, query)
    session = uow.session
    owners = {b.benchmark_id: b.owner_id for b in (await session.exec(select(Benchmark))).all()}
    entities = {(e.kind, e.entity_id): e.owner_id for e in (await session.exec(select(Entity))).all()}
    checks = {(c.benchmark_id, c.kind, c.entity_id): c for c in (await session.exec(select(Check))).all()}
    rows = (await session.exec(select(Association).order_by(col(Association.benchmark_id), col(Association.kind),
                                                            col(Association.entity_id)))).all()
    shown = []
    for row in rows:
        entity_owner = entities.get((row.kind, row.entity_id), "")
        if query.data.benchmark_id not in (None, row.benchmark_id):
            continue
        if asker.role != m.Role.OPERATOR and asker.actor_id not in (owners.get(row.benchmark_id), entity_owner):
            continue
        if query.data.pending and row.status not in PENDING:
            continue
        check = checks.get((row.benchmark_id, row.kind, row.entity_id))
        history = (await session.exec(select(AssociationEntry).where(
            AssociationEntry.benchmark_id == row.benchmark_id, AssociationEntry.kind == row.kind,
            AssociationEntry.entity_id == row.entity_id).order_by(col(AssociationEntry.id)))).all()
        shown.append(m.AssociationView(
            benchmark_id=row.benchmark_id, kind=m.EntityKind(row.kind), entity_id=row.entity_id,
            entity_owner=entity_owner, status=row.status,
            history=tuple(m.HistoryEntry(action=h.action, actor=h.actor, at=h.at, reason=h.reason,
                                         by_policy=h.by_policy) for h in history),
            check=None if check is None else m.CheckView(job_id=check.job_id, site_id=check.site_id, state=check.state,
                                                         reason=check.reason, metrics=check.metrics, at=check.at)))
    return m.AssociationList(associations=tuple(shown))


async def learn_archival(archived: Envelope[m.EntityArchived], uow: UnitOfWork) -> None:
    gone = archived.data
    row = (await uow.session.get(Benchmark, gone.entity_id) if gone.kind is m.EntityType.BENCHMARK
           else await uow.session.get(Entity, (gone.kind.value, gone.entity_id)))
    if row is not None:
        row.archived = True
        uow.session.add(row)


async def learn_rotation(rotated: Envelope[m.ActorKeyRotated], uow: UnitOfWork) -> None:
    """The actor's new key from now on; the old one kept, retired, for what it signed before."""
    await remember_rotation(uow.session, rotated.data, rotated.time)


async def learn_suspension(suspended: Envelope[m.ActorSuspended], uow: UnitOfWork) -> None:
    await remember_suspension(uow.session, suspended.data, suspended.time)


async def learn_actor(registered: Envelope[m.ActorRegistered], uow: UnitOfWork) -> None:
    await remember_actor(uow.session, registered.data)


async def learn_benchmark(registered: Envelope[m.BenchmarkRegistered], uow: UnitOfWork) -> None:
    spec = registered.data.benchmark
    if await uow.session.get(Benchmark, spec.benchmark_id) is None:
        uow.session.add(Benchmark(benchmark_id=spec.benchmark_id, owner_id=registered.data.owner_id,
                                  checks_models=spec.demo_data is not None))


async def learn_edit(edited: Envelope[m.BenchmarkEdited], uow: UnitOfWork) -> None:
    """Demo data given (or taken away) while in development: models' requests from now on run a check (or none)."""
    spec = edited.data.benchmark
    benchmark = await _benchmark(uow.session, spec.benchmark_id)
    benchmark.checks_models = spec.demo_data is not None
    uow.session.add(benchmark)


async def learn_check_job(scheduled: Envelope[m.JobScheduled], uow: UnitOfWork) -> None:
    """A request's check was planned: the approver sees it waiting."""
    job = scheduled.data.job
    if job.check is None:  # an evaluation's, which its subject keeps from this consumer: nothing to learn
        return
    key = (job.binding.benchmark_id, job.check.kind.value, job.check.entity_id)
    row = await uow.session.get(Check, key) or Check(benchmark_id=key[0], kind=key[1], entity_id=key[2],
                                                      job_id=job.job_id, site_id=job.site_id, at=scheduled.time)
    row.job_id, row.site_id, row.state, row.reason, row.metrics, row.at = (job.job_id, job.site_id, "SCHEDULED", "",
                                                                          {}, scheduled.time)
    uow.session.add(row)


async def _check_row(uow: UnitOfWork, benchmark_id: str, check: m.CheckOf, job_id: str) -> Check | None:
    """The pair's check row, if it is still this job's (None: a newer request's check replaced it)."""
    row = await uow.session.get(Check, (benchmark_id, check.kind.value, check.entity_id))
    if row is None:  # its JobScheduled is on the way (or a new request cleared the row and its check's is)
        raise NotYetKnown(f"check job {job_id} of {check.kind.value} {check.entity_id} is not planned here yet")
    return row if row.job_id == job_id else None


async def learn_check_state(changed: Envelope[m.JobStateChanged], uow: UnitOfWork) -> None:
    """Its site held, refused or failed the check, its owner declined to release it, or it was cancelled: the
    approver sees the state and the reason."""
    said = changed.data
    if said.check is None:
        return
    if (row := await _check_row(uow, said.benchmark_id, said.check, said.job_id)) is None:
        return
    row.state, row.reason, row.at = said.state.value, said.reason, changed.time
    uow.session.add(row)


async def learn_check_result(completed: Envelope[m.CheckCompleted], uow: UnitOfWork) -> None:
    """The check passed: its metrics go beside the request, and the benchmark's policy may approve it now."""
    done = completed.data
    if (row := await _check_row(uow, done.benchmark_id, m.CheckOf(kind=done.kind, entity_id=done.entity_id),
                                done.job_id)) is None:
        return
    try:
        metrics = json.loads(uow.unsealed(done.sealed_metrics))
    except (SealError, ValueError) as exc:  # the leaderboard signed it: a fault of ours, for the dead letters
        raise Refused(f"the metrics of check job {done.job_id} do not open: {exc}") from None
    row.state, row.reason, row.metrics, row.at = "PASSED", "", metrics, completed.time
    uow.session.add(row)
    pairs = Pairs(uow)
    pair, benchmark = await pairs.load(done.benchmark_id, done.kind, done.entity_id)
    entity = await uow.session.get(Entity, (done.kind.value, done.entity_id))
    if domain.refuse_request(benchmark) is not None or entity is None or entity.archived:
        return
    requester = await uow.session.get(KnownActor, pair.asked_by) if pair.asked_by else None
    after = consent.checked(pair, utcnow(), await pairs.policy(done.benchmark_id, done.kind),
                            requester.organisation if requester else None)
    if after is not pair:
        await pairs.save(pair, after, done.kind, done.entity_id)


async def learn_model(registered: Envelope[m.ModelRegistered], uow: UnitOfWork) -> None:
    model = registered.data
    if await uow.session.get(Entity, ("model", model.model_id)) is None:
        uow.session.add(Entity(kind="model", entity_id=model.model_id, owner_id=model.owner_id))


async def learn_dataset(registered: Envelope[m.DatasetRegistered], uow: UnitOfWork) -> None:
    dataset = registered.data
    if await uow.session.get(Entity, ("dataset", dataset.dataset_id)) is None:
        uow.session.add(Entity(kind="dataset", entity_id=dataset.dataset_id, owner_id=dataset.site_id,
                               benchmark_id=dataset.benchmark_id))


WIRING = Wiring(
    owner=SERVICE, source=f"service:{SERVICE}",
    requests=tuple(Request(handle) for handle in (
        approve_benchmark, reject_benchmark, request_association, invite_association, approve_association,
        reject_association, revoke_association, set_approval_policy, list_associations)),
    consumers=(*(Consumer(learn) for learn in (learn_actor, learn_benchmark, learn_model, learn_dataset,
                                               learn_archival, learn_suspension, learn_rotation, learn_edit,
                                               learn_check_result)),
               # the checks' jobs alone: an evaluation job's events are never delivered here
               Consumer(learn_check_job, subject=subjects.job_evt("scheduled", subjects.CHECK)),
               Consumer(learn_check_state, subject=subjects.job_evt("state_changed", subjects.CHECK))),
    publishes=tuple(Outlet.event(e) for e in (
        m.BenchmarkApproved, m.BenchmarkRejected, m.AssociationRequested, m.AssociationInvited, m.AssociationApproved,
        m.AssociationRejected, m.AssociationRevoked, m.ApprovalPolicySet)),
)
