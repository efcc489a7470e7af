"""Approval handlers: the operator's word on each benchmark, and two-party consent on each pair (request, invite,
approve, reject, revoke, auto-approval policies), every step kept in the pair's append-only history."""

from __future__ import annotations

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from approval import consent, domain
from approval.models import ApprovalPolicy, Association, AssociationEntry, Benchmark, Entity
from contracts import messages as m
from contracts.envelope import Envelope, utcnow
from service_kit.actors import authenticate, remember_actor, remember_suspension, remember_rotation
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
                 step, *roles: m.Role, joining: bool = False) -> m.CommandReply:  # type: ignore[no-untyped-def]
    """Authenticate, load the pair, take the step (a function of the pair, the actor who signed and the policy), save.
    `joining`: a request or invitation, which only a benchmark the operator approved takes. What is already so (the
    same command sent twice) says so and changes nothing."""
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
    return m.CommandReply(ok=True, message=outcome(after, after.history[-1]))


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
    """The entity's owner asks to join (or accepts an invitation); the benchmark's policy may approve at once."""
    cmd = command.data
    role = m.Role.MODEL_OWNER if cmd.kind is m.EntityKind.MODEL else m.Role.SITE
    return await decide(uow, command, cmd.benchmark_id, cmd.kind, cmd.entity_id,
                        lambda pair, actor, policy: consent.request(pair, actor.actor_id, utcnow(), policy,
                                                                    actor.organisation), role, joining=True)


async def invite_association(command: Envelope[m.InviteAssociation], uow: UnitOfWork) -> m.CommandReply:
    cmd = command.data
    return await decide(uow, command, cmd.benchmark_id, cmd.kind, cmd.entity_id,
                        lambda pair, actor, _: consent.invite(pair, actor.actor_id, utcnow()), m.Role.BENCHMARK_OWNER,
                        joining=True)


async def approve_association(command: Envelope[m.ApproveAssociation], uow: UnitOfWork) -> m.CommandReply:
    cmd = command.data
    return await decide(uow, command, cmd.benchmark_id, cmd.kind, cmd.entity_id,
                        lambda pair, actor, _: consent.approve(pair, actor.actor_id, utcnow()), m.Role.BENCHMARK_OWNER)


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
        history = (await session.exec(select(AssociationEntry).where(
            AssociationEntry.benchmark_id == row.benchmark_id, AssociationEntry.kind == row.kind,
            AssociationEntry.entity_id == row.entity_id).order_by(col(AssociationEntry.id)))).all()
        shown.append(m.AssociationView(
            benchmark_id=row.benchmark_id, kind=m.EntityKind(row.kind), entity_id=row.entity_id,
            entity_owner=entity_owner, status=row.status,
            history=tuple(m.HistoryEntry(action=h.action, actor=h.actor, at=h.at, reason=h.reason,
                                         by_policy=h.by_policy) for h in history)))
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
        uow.session.add(Benchmark(benchmark_id=spec.benchmark_id, owner_id=registered.data.owner_id))


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
    consumers=tuple(Consumer(learn) for learn in (learn_actor, learn_benchmark, learn_model, learn_dataset,
                                                  learn_archival, learn_suspension, learn_rotation)),
    publishes=tuple(Outlet.event(e) for e in (
        m.BenchmarkApproved, m.BenchmarkRejected, m.AssociationRequested, m.AssociationInvited, m.AssociationApproved,
        m.AssociationRejected, m.AssociationRevoked, m.ApprovalPolicySet)),
)
