"""Registry handlers: signed commands create entities and stage the events that announce them."""

from __future__ import annotations

from sqlmodel import select

from contracts import messages as m
from contracts.envelope import Envelope
from contracts.signing import key_id_of
from registry.listing import listed
from registry.models import Benchmark, Dataset, Model, Status
from service_kit.actors import KnownActor, authenticate
from service_kit.edge import NotYetKnown, Refused
from service_kit.wiring import Consumer, Outlet, Request, Wiring
from service_kit.work import Transaction, UnitOfWork

SERVICE = "registry"


async def register_actor(command: Envelope[m.RegisterActor], uow: UnitOfWork) -> m.CommandReply:
    await authenticate(uow.session, command, m.Role.OPERATOR)
    cmd = command.data
    existing = await uow.session.get(KnownActor, cmd.actor_id)
    if existing is not None:
        if existing.public_key == cmd.public_key and existing.role == cmd.role:
            return m.CommandReply(ok=True, message=f"actor {cmd.actor_id} is already registered")
        raise Refused(f"actor_id {cmd.actor_id!r} is taken by another key or role; choose another id")
    holder = (await uow.session.exec(select(KnownActor).where(KnownActor.key_id == key_id_of(cmd.public_key)))).first()
    if holder is not None:
        raise Refused(f"public_key is already enrolled as actor {holder.actor_id}; every actor has its own key")
    enrol(uow, cmd.actor_id, cmd.role, cmd.public_key, cmd.display_name)
    return m.CommandReply(ok=True, message=f"registered {cmd.role.value} {cmd.actor_id}")


def enrol(uow: Transaction, actor_id: str, role: m.Role, public_key: str, display_name: str,
          event_id: str | None = None) -> None:
    """Record an actor and announce it, so every service learns its key."""
    event = m.ActorRegistered(actor_id=actor_id, role=role, public_key=public_key, key_id=key_id_of(public_key),
                              display_name=display_name)
    uow.session.add(KnownActor(**event.model_dump(mode="json")))
    uow.emit(event, id=event_id)


async def register_benchmark(command: Envelope[m.RegisterBenchmark], uow: UnitOfWork) -> m.CommandReply:
    owner = await authenticate(uow.session, command, m.Role.BENCHMARK_OWNER)
    spec = command.data.benchmark
    if await uow.session.get(Benchmark, spec.benchmark_id) is not None:
        raise Refused(f"benchmark_id {spec.benchmark_id!r} already exists; choose another id")
    uow.session.add(Benchmark(benchmark_id=spec.benchmark_id, owner_id=owner.actor_id,
                              spec=spec.model_dump(mode="json")))
    uow.emit(m.BenchmarkRegistered(owner_id=owner.actor_id, benchmark=spec))
    return m.CommandReply(ok=True, message=f"benchmark {spec.benchmark_id} registered (DEVELOPMENT); "
                          "the operator must approve it")


async def register_model(command: Envelope[m.RegisterModel], uow: UnitOfWork) -> m.CommandReply:
    owner = await authenticate(uow.session, command, m.Role.MODEL_OWNER)
    cmd = command.data
    if await uow.session.get(Model, cmd.model_id) is not None:
        raise Refused(f"model_id {cmd.model_id!r} already exists; choose another id")
    uow.session.add(Model(model_id=cmd.model_id, owner_id=owner.actor_id, name=cmd.name,
                          digest=cmd.image.digest, image_name=cmd.image.name))
    uow.emit(m.ModelRegistered(model_id=cmd.model_id, owner_id=owner.actor_id, name=cmd.name, image=cmd.image))
    return m.CommandReply(ok=True, message=f"model {cmd.model_id} registered as {cmd.image.digest}")


async def register_dataset(command: Envelope[m.RegisterDataset], uow: UnitOfWork) -> m.CommandReply:
    site = await authenticate(uow.session, command, m.Role.SITE)
    cmd = command.data
    benchmark = await uow.session.get(Benchmark, cmd.benchmark_id)
    if benchmark is None:
        raise NotYetKnown(f"benchmark {cmd.benchmark_id!r} is not registered")
    if benchmark.status == Status.ARCHIVED:
        raise Refused(f"benchmark {cmd.benchmark_id!r} is archived")
    expected = benchmark.spec["preparator"]["digest"]
    if cmd.preparator_digest != expected:
        raise Refused(f"preparator_digest {cmd.preparator_digest} is not the benchmark's preparator "
                      f"{expected}; prepare the data with the benchmark's preparator")
    if await uow.session.get(Dataset, cmd.dataset_id) is not None:
        raise Refused(f"dataset_id {cmd.dataset_id!r} already exists; choose another id")
    uow.session.add(Dataset(dataset_id=cmd.dataset_id, site_id=site.actor_id, benchmark_id=cmd.benchmark_id,
                            name=cmd.name, content_hash=cmd.content_hash, case_count=cmd.case_count,
                            statistics=cmd.statistics))
    uow.emit(m.DatasetRegistered(
        dataset_id=cmd.dataset_id, site_id=site.actor_id, benchmark_id=cmd.benchmark_id, name=cmd.name,
        content_hash=cmd.content_hash, case_count=cmd.case_count, statistics=cmd.statistics))
    return m.CommandReply(ok=True, message=f"dataset {cmd.dataset_id} registered (metadata only)")


async def get_benchmark(query: Envelope[m.GetBenchmark], uow: UnitOfWork) -> m.BenchmarkDetails:
    benchmark = await uow.session.get(Benchmark, query.data.benchmark_id)
    if benchmark is None:
        raise NotYetKnown(f"benchmark {query.data.benchmark_id!r} is not registered")
    return m.BenchmarkDetails(owner_id=benchmark.owner_id, status=benchmark.status,
                              benchmark=m.BenchmarkSpec.model_validate(benchmark.spec))


async def list_entities(query: Envelope[m.ListEntities], uow: UnitOfWork) -> m.EntityList:
    """What exists of one kind, for any registered actor who signs the query."""
    await authenticate(uow.session, query)
    return await listed(uow.session, query.data)


async def mark_operational(approved: Envelope[m.BenchmarkApproved], uow: UnitOfWork) -> None:
    benchmark = await uow.session.get(Benchmark, approved.data.benchmark_id)
    if benchmark is None:
        raise NotYetKnown(f"benchmark {approved.data.benchmark_id} approved before it was registered here")
    benchmark.status = Status.OPERATION
    uow.session.add(benchmark)


WIRING = Wiring(
    owner=SERVICE, source=f"service:{SERVICE}",
    requests=tuple(Request(handle) for handle in (register_actor, register_benchmark, register_model,
                                                  register_dataset, get_benchmark, list_entities)),
    consumers=(Consumer(mark_operational),),
    publishes=tuple(Outlet.event(event) for event in (m.ActorRegistered, m.BenchmarkRegistered, m.ModelRegistered,
                                                       m.DatasetRegistered)),
)
