"""Approval handlers: benchmark approval by the operator and two-party association consent."""

from __future__ import annotations

from sqlmodel.ext.asyncio.session import AsyncSession

from approval import domain
from approval.models import Association, Benchmark, Entity
from contracts import messages as m
from contracts.envelope import Envelope
from service_kit.actors import authenticate, remember_actor
from service_kit.edge import NotYetKnown, Refused
from service_kit.wiring import Consumer, Outlet, Request, Wiring
from service_kit.work import UnitOfWork

SERVICE = "approval"


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
    benchmark.approved = True
    uow.session.add(benchmark)
    uow.emit(m.BenchmarkApproved(benchmark_id=benchmark.benchmark_id, approved_by=operator.actor_id))
    return m.CommandReply(ok=True, message=f"benchmark {benchmark.benchmark_id} approved: OPERATION")


async def request_association(command: Envelope[m.RequestAssociation], uow: UnitOfWork) -> m.CommandReply:
    cmd = command.data
    role = m.Role.MODEL_OWNER if cmd.kind is m.EntityKind.MODEL else m.Role.SITE
    requester = await authenticate(uow.session, command, role)
    benchmark = await _benchmark(uow.session, cmd.benchmark_id)
    entity = await uow.session.get(Entity, (cmd.kind.value, cmd.entity_id))
    if entity is None:
        raise NotYetKnown(f"{cmd.kind.value} {cmd.entity_id!r} is not known (register it first)")
    if (reason := domain.refuse_request(benchmark, entity, requester.actor_id, cmd.kind)) is not None:
        raise Refused(reason)
    key = (cmd.benchmark_id, cmd.kind.value, cmd.entity_id)
    if (existing := await uow.session.get(Association, key)) is not None:
        return m.CommandReply(ok=True, message=f"already {existing.status.lower()}")
    uow.session.add(Association(benchmark_id=cmd.benchmark_id, kind=cmd.kind.value, entity_id=cmd.entity_id,
                                requested_by=requester.actor_id))
    uow.emit(m.AssociationRequested(benchmark_id=cmd.benchmark_id, kind=cmd.kind, entity_id=cmd.entity_id,
                                    requested_by=requester.actor_id))
    return m.CommandReply(ok=True, message=f"{cmd.kind.value} {cmd.entity_id} asked to join {cmd.benchmark_id}; "
                          "waiting for the benchmark owner")


async def approve_association(command: Envelope[m.ApproveAssociation], uow: UnitOfWork) -> m.CommandReply:
    cmd = command.data
    approver = await authenticate(uow.session, command, m.Role.BENCHMARK_OWNER)
    benchmark = await _benchmark(uow.session, cmd.benchmark_id)
    association = await uow.session.get(Association, (cmd.benchmark_id, cmd.kind.value, cmd.entity_id))
    if (reason := domain.refuse_approval(benchmark, association, approver.actor_id)) is not None:
        raise Refused(reason)
    assert association is not None
    if association.status == "APPROVED":
        return m.CommandReply(ok=True, message="already approved")
    association.status, association.approved_by = "APPROVED", approver.actor_id
    uow.session.add(association)
    uow.emit(m.AssociationApproved(benchmark_id=cmd.benchmark_id, kind=cmd.kind, entity_id=cmd.entity_id,
                                   approved_by=approver.actor_id))
    return m.CommandReply(ok=True, message=f"{cmd.kind.value} {cmd.entity_id} approved for {cmd.benchmark_id}")


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
    requests=(Request(approve_benchmark), Request(request_association), Request(approve_association)),
    consumers=tuple(Consumer(learn) for learn in (learn_actor, learn_benchmark, learn_model, learn_dataset)),
    publishes=tuple(Outlet.event(e) for e in (m.BenchmarkApproved, m.AssociationRequested, m.AssociationApproved)),
)
