"""Approval handlers: benchmark approval by the operator and two-party association consent."""

from __future__ import annotations

from faststream.nats import NatsRouter
from sqlmodel.ext.asyncio.session import AsyncSession

from approval import domain
from approval.models import Association, Benchmark, Entity
from contracts import messages as m
from contracts.catalog import COMMAND_SUBJECTS, EVENT_SUBJECTS
from contracts.envelope import Envelope
from service_kit.actors import CommandRejected, NotYetKnown, authenticate, remember_actor
from service_kit.app import Service
from service_kit.bus import command_handler, durable_subscriber
from service_kit.outbox import stage_event

SOURCE = "service:approval"


async def _benchmark(session: AsyncSession, benchmark_id: str) -> Benchmark:
    benchmark = await session.get(Benchmark, benchmark_id)
    if benchmark is None:
        raise NotYetKnown(f"benchmark {benchmark_id!r} is not known (register it first)")
    return benchmark


async def approve_benchmark(session: AsyncSession, env: Envelope[m.ApproveBenchmark]) -> m.CommandReply:
    operator = await authenticate(session, env, m.Role.OPERATOR)
    benchmark = await _benchmark(session, env.data.benchmark_id)
    if benchmark.approved:
        return m.CommandReply(ok=True, message=f"benchmark {benchmark.benchmark_id} is already approved")
    benchmark.approved = True
    session.add(benchmark)
    stage_event(session, SOURCE, m.BenchmarkApproved(benchmark_id=benchmark.benchmark_id, approved_by=operator.actor_id))
    return m.CommandReply(ok=True, message=f"benchmark {benchmark.benchmark_id} approved: OPERATION",
                          entity_id=benchmark.benchmark_id)


async def request_association(session: AsyncSession, env: Envelope[m.RequestAssociation]) -> m.CommandReply:
    cmd = env.data
    role = m.Role.MODEL_OWNER if cmd.kind is m.EntityKind.MODEL else m.Role.SITE
    requester = await authenticate(session, env, role)
    benchmark = await _benchmark(session, cmd.benchmark_id)
    entity = await session.get(Entity, (cmd.kind.value, cmd.entity_id))
    if entity is None:
        raise NotYetKnown(f"{cmd.kind.value} {cmd.entity_id!r} is not known (register it first)")
    if (reason := domain.refuse_request(benchmark, entity, requester.actor_id, cmd.kind)) is not None:
        raise CommandRejected(reason)
    key = (cmd.benchmark_id, cmd.kind.value, cmd.entity_id)
    if (existing := await session.get(Association, key)) is not None:
        return m.CommandReply(ok=True, message=f"already {existing.status.lower()}")
    session.add(Association(benchmark_id=cmd.benchmark_id, kind=cmd.kind.value, entity_id=cmd.entity_id,
                            requested_by=requester.actor_id))
    stage_event(session, SOURCE, m.AssociationRequested(benchmark_id=cmd.benchmark_id, kind=cmd.kind,
                                                        entity_id=cmd.entity_id, requested_by=requester.actor_id))
    return m.CommandReply(ok=True, message=f"{cmd.kind.value} {cmd.entity_id} asked to join {cmd.benchmark_id}; "
                          "waiting for the benchmark owner")


async def approve_association(session: AsyncSession, env: Envelope[m.ApproveAssociation]) -> m.CommandReply:
    cmd = env.data
    approver = await authenticate(session, env, m.Role.BENCHMARK_OWNER)
    benchmark = await _benchmark(session, cmd.benchmark_id)
    association = await session.get(Association, (cmd.benchmark_id, cmd.kind.value, cmd.entity_id))
    if (reason := domain.refuse_approval(benchmark, association, approver.actor_id)) is not None:
        raise CommandRejected(reason)
    assert association is not None
    if association.status == "APPROVED":
        return m.CommandReply(ok=True, message="already approved")
    association.status, association.approved_by = "APPROVED", approver.actor_id
    session.add(association)
    stage_event(session, SOURCE, m.AssociationApproved(benchmark_id=cmd.benchmark_id, kind=cmd.kind,
                                                       entity_id=cmd.entity_id, approved_by=approver.actor_id))
    return m.CommandReply(ok=True, message=f"{cmd.kind.value} {cmd.entity_id} approved for {cmd.benchmark_id}")


async def learn_actor(session: AsyncSession, env: Envelope[m.ActorRegistered]) -> None:
    await remember_actor(session, env.data)


async def learn_benchmark(session: AsyncSession, env: Envelope[m.BenchmarkRegistered]) -> None:
    if await session.get(Benchmark, env.data.benchmark.benchmark_id) is None:
        session.add(Benchmark(benchmark_id=env.data.benchmark.benchmark_id, owner_id=env.data.owner_id))


async def learn_model(session: AsyncSession, env: Envelope[m.ModelRegistered]) -> None:
    if await session.get(Entity, ("model", env.data.model_id)) is None:
        session.add(Entity(kind="model", entity_id=env.data.model_id, owner_id=env.data.owner_id))


async def learn_dataset(session: AsyncSession, env: Envelope[m.DatasetRegistered]) -> None:
    if await session.get(Entity, ("dataset", env.data.dataset_id)) is None:
        session.add(Entity(kind="dataset", entity_id=env.data.dataset_id, owner_id=env.data.site_id,
                           benchmark_id=env.data.benchmark_id))


def build_router(service: Service) -> NatsRouter:
    router = NatsRouter()
    for payload, handle in ((m.ApproveBenchmark, approve_benchmark), (m.RequestAssociation, request_association),
                            (m.ApproveAssociation, approve_association)):
        command_handler(router, subject=COMMAND_SUBJECTS[payload], service="approval", payload=payload,
                        db=service.db, handle=handle)
    for event, learn in ((m.ActorRegistered, learn_actor), (m.BenchmarkRegistered, learn_benchmark),
                         (m.ModelRegistered, learn_model), (m.DatasetRegistered, learn_dataset)):
        durable_subscriber(router, subject=EVENT_SUBJECTS[event], durable=f"approval-{event.__name__.lower()}",
                           payload=event, db=service.db, publish=service.publish, handle=learn)
    return router
