"""Registry handlers: signed commands create entities and stage the events that announce them."""

from __future__ import annotations

from typing import Any

from faststream.nats import NatsRouter
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from contracts import messages as m
from contracts.catalog import COMMAND_SUBJECTS, EVENT_SUBJECTS
from contracts.envelope import Envelope
from contracts.signing import key_id_of
from registry.models import Benchmark, Dataset, Model, Status
from service_kit.actors import CommandRejected, KnownActor, NotYetKnown, authenticate
from service_kit.app import Service
from service_kit.bus import command_handler, durable_subscriber
from service_kit.outbox import stage_event

SOURCE = "service:registry"


async def register_actor(session: AsyncSession, env: Envelope[m.RegisterActor]) -> m.CommandReply:
    await authenticate(session, env, m.Role.OPERATOR)
    cmd = env.data
    existing = await session.get(KnownActor, cmd.actor_id)
    if existing is not None:
        if existing.public_key == cmd.public_key and existing.role == cmd.role:
            return m.CommandReply(ok=True, message=f"actor {cmd.actor_id} is already registered", entity_id=cmd.actor_id)
        raise CommandRejected(f"actor_id {cmd.actor_id!r} is taken by another key or role; choose another id")
    holder = (await session.exec(select(KnownActor).where(KnownActor.key_id == key_id_of(cmd.public_key)))).first()
    if holder is not None:
        raise CommandRejected(f"public_key is already enrolled as actor {holder.actor_id}; every actor has its own key")
    enrol(session, cmd.actor_id, cmd.role, cmd.public_key, cmd.display_name)
    return m.CommandReply(ok=True, message=f"registered {cmd.role.value} {cmd.actor_id}", entity_id=cmd.actor_id)


def enrol(session: AsyncSession, actor_id: str, role: m.Role, public_key: str, display_name: str,
          event_id: str | None = None) -> None:
    """Record an actor and announce it, so every service learns its key."""
    event = m.ActorRegistered(actor_id=actor_id, role=role, public_key=public_key, key_id=key_id_of(public_key),
                              display_name=display_name)
    session.add(KnownActor(**event.model_dump(mode="json")))
    stage_event(session, SOURCE, event, id=event_id)


async def register_benchmark(session: AsyncSession, env: Envelope[m.RegisterBenchmark]) -> m.CommandReply:
    owner = await authenticate(session, env, m.Role.BENCHMARK_OWNER)
    spec = env.data.benchmark
    if await session.get(Benchmark, spec.benchmark_id) is not None:
        raise CommandRejected(f"benchmark_id {spec.benchmark_id!r} already exists; choose another id")
    session.add(Benchmark(benchmark_id=spec.benchmark_id, owner_id=owner.actor_id, spec=spec.model_dump(mode="json")))
    stage_event(session, SOURCE, m.BenchmarkRegistered(owner_id=owner.actor_id, benchmark=spec))
    return m.CommandReply(ok=True, message=f"benchmark {spec.benchmark_id} registered (DEVELOPMENT); "
                          "the operator must approve it", entity_id=spec.benchmark_id)


async def register_model(session: AsyncSession, env: Envelope[m.RegisterModel]) -> m.CommandReply:
    owner = await authenticate(session, env, m.Role.MODEL_OWNER)
    cmd = env.data
    if await session.get(Model, cmd.model_id) is not None:
        raise CommandRejected(f"model_id {cmd.model_id!r} already exists; choose another id")
    session.add(Model(model_id=cmd.model_id, owner_id=owner.actor_id, name=cmd.name,
                      digest=cmd.image.digest, image_name=cmd.image.name))
    stage_event(session, SOURCE, m.ModelRegistered(model_id=cmd.model_id, owner_id=owner.actor_id,
                                                   name=cmd.name, image=cmd.image))
    return m.CommandReply(ok=True, message=f"model {cmd.model_id} registered as {cmd.image.digest}",
                          entity_id=cmd.model_id)


async def register_dataset(session: AsyncSession, env: Envelope[m.RegisterDataset]) -> m.CommandReply:
    site = await authenticate(session, env, m.Role.SITE)
    cmd = env.data
    benchmark = await session.get(Benchmark, cmd.benchmark_id)
    if benchmark is None:
        raise NotYetKnown(f"benchmark {cmd.benchmark_id!r} is not registered")
    if benchmark.status == Status.ARCHIVED:
        raise CommandRejected(f"benchmark {cmd.benchmark_id!r} is archived")
    expected = benchmark.spec["preparator"]["digest"]
    if cmd.preparator_digest != expected:
        raise CommandRejected(f"preparator_digest {cmd.preparator_digest} is not the benchmark's preparator "
                              f"{expected}; prepare the data with the benchmark's preparator")
    if await session.get(Dataset, cmd.dataset_id) is not None:
        raise CommandRejected(f"dataset_id {cmd.dataset_id!r} already exists; choose another id")
    session.add(Dataset(dataset_id=cmd.dataset_id, site_id=site.actor_id, benchmark_id=cmd.benchmark_id,
                        name=cmd.name, content_hash=cmd.content_hash, case_count=cmd.case_count,
                        statistics=cmd.statistics))
    stage_event(session, SOURCE, m.DatasetRegistered(
        dataset_id=cmd.dataset_id, site_id=site.actor_id, benchmark_id=cmd.benchmark_id, name=cmd.name,
        content_hash=cmd.content_hash, case_count=cmd.case_count, statistics=cmd.statistics))
    return m.CommandReply(ok=True, message=f"dataset {cmd.dataset_id} registered (metadata only)",
                          entity_id=cmd.dataset_id)


async def get_benchmark(session: AsyncSession, env: Envelope[m.GetBenchmark]) -> m.BenchmarkRegistered:
    benchmark = await session.get(Benchmark, env.data.benchmark_id)
    if benchmark is None:
        raise NotYetKnown(f"benchmark {env.data.benchmark_id!r} is not registered")
    return m.BenchmarkRegistered(owner_id=benchmark.owner_id,
                                 benchmark=m.BenchmarkSpec.model_validate(benchmark.spec))


async def mark_operational(session: AsyncSession, env: Envelope[m.BenchmarkApproved]) -> None:
    benchmark = await session.get(Benchmark, env.data.benchmark_id)
    if benchmark is None:
        raise NotYetKnown(f"benchmark {env.data.benchmark_id} approved before it was registered here")
    benchmark.status = Status.OPERATION
    session.add(benchmark)


def build_router(service: Service) -> NatsRouter:
    router = NatsRouter()
    commands: list[tuple[type[m.Payload], Any, bool]] = [
        (m.RegisterActor, register_actor, True), (m.RegisterBenchmark, register_benchmark, True),
        (m.RegisterModel, register_model, True), (m.RegisterDataset, register_dataset, True),
        (m.GetBenchmark, get_benchmark, False),
    ]
    for payload, handle, idempotent in commands:
        command_handler(router, subject=COMMAND_SUBJECTS[payload], service="registry", payload=payload,
                        db=service.db, handle=handle, idempotent=idempotent)
    durable_subscriber(router, subject=EVENT_SUBJECTS[m.BenchmarkApproved], durable="registry-benchmark-approved",
                       payload=m.BenchmarkApproved, db=service.db, publish=service.publish, handle=mark_operational)
    return router
