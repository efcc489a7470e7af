"""Registry handlers: signed commands create entities and stage the events that announce them."""

from __future__ import annotations

from sqlmodel import select

from contracts import messages as m
from contracts.envelope import Envelope, utcnow
from contracts.signing import key_id_of
from registry import lifecycle
from registry.listing import listed
from registry.models import Benchmark, Dataset, Model, Organisation, Status
from service_kit.actors import KnownActor, RetiredKey, authenticate, remember_rotation
from service_kit.edge import NotYetKnown, Refused
from service_kit.wiring import Consumer, Outlet, Request, Wiring
from service_kit.work import Transaction, UnitOfWork

SERVICE = "registry"


async def register_actor(command: Envelope[m.RegisterActor], uow: UnitOfWork) -> m.CommandReply:
    await authenticate(uow.session, command, m.Role.OPERATOR)
    cmd = command.data
    already = m.CommandReply(ok=True, message=f"actor {cmd.actor_id} is already registered")
    existing = await uow.session.get(KnownActor, cmd.actor_id)
    if existing is not None:
        if (existing.public_key, existing.role) == (cmd.public_key, cmd.role):
            return already
        raise Refused(f"actor_id {cmd.actor_id!r} is taken by another key or role; choose another id")
    if cmd.organisation is not None and await uow.session.get(Organisation, cmd.organisation) is None:
        raise Refused(f"organisation {cmd.organisation!r} is not registered; enrol it first (assay organisation "
                      "register)")
    if m.Role.OPERATOR in cmd.also or (cmd.role is m.Role.OPERATOR and cmd.also):
        raise Refused("the operator's role is held alone")
    holder = (await uow.session.exec(select(KnownActor).where(KnownActor.key_id == key_id_of(cmd.public_key)))).first()
    if holder is not None:
        if (holder.actor_id, holder.role) == (cmd.actor_id, cmd.role):  # a replica enrolled it since the first read
            return already
        raise Refused(f"public_key is already enrolled as actor {holder.actor_id}; every actor has its own key")
    enrol(uow, cmd.actor_id, cmd.role, cmd.public_key, cmd.display_name, also=cmd.also,
          organisation=cmd.organisation)
    more = f" (also {', '.join(r.value for r in cmd.also)})" if cmd.also else ""
    of = f" of {cmd.organisation}" if cmd.organisation else ""
    return m.CommandReply(ok=True, message=f"registered {cmd.role.value} {cmd.actor_id}{more}{of}")


async def register_organisation(command: Envelope[m.RegisterOrganisation], uow: UnitOfWork) -> m.CommandReply:
    operator = await authenticate(uow.session, command, m.Role.OPERATOR)
    cmd = command.data
    if (existing := await uow.session.get(Organisation, cmd.organisation_id)) is not None:
        if existing.name == cmd.name:
            return m.CommandReply(ok=True, message=f"organisation {cmd.organisation_id} is already registered")
        raise Refused(f"organisation_id {cmd.organisation_id!r} is taken; choose another id")
    uow.session.add(Organisation(organisation_id=cmd.organisation_id, name=cmd.name))
    uow.emit(m.OrganisationRegistered(organisation_id=cmd.organisation_id, name=cmd.name,
                                      registered_by=operator.actor_id))
    return m.CommandReply(ok=True, message=f"registered organisation {cmd.organisation_id}; register its actors "
                                           f"with --organisation {cmd.organisation_id}")


async def rotate_key(command: Envelope[m.RotateKey], uow: UnitOfWork) -> m.CommandReply:
    """An actor replaces its key, signing with the one it replaces."""
    actor = await authenticate(uow.session, command)
    new_key, new_id = command.data.public_key, key_id_of(command.data.public_key)
    if new_id == actor.key_id:
        return m.CommandReply(ok=True, message=f"actor {actor.actor_id} holds this key already")
    taken = (await uow.session.exec(select(KnownActor).where(KnownActor.key_id == new_id))).first()
    if taken is not None or await uow.session.get(RetiredKey, new_id) is not None:
        raise Refused("public_key is enrolled already (or was once): every actor has a key of its own, used once")
    event = m.ActorKeyRotated(actor_id=actor.actor_id, role=m.Role(actor.role), public_key=new_key, key_id=new_id,
                              previous_key_id=actor.key_id)
    await remember_rotation(uow.session, event, utcnow())
    uow.emit(event)
    return m.CommandReply(ok=True, message=f"actor {actor.actor_id} signs with key {new_id} from now on; key "
                                           f"{event.previous_key_id} is retired (what it signed before stays valid)")


async def suspend_actor(command: Envelope[m.SuspendActor], uow: UnitOfWork) -> m.CommandReply:
    """The operator stops an actor: every service refuses what it signs from now on."""
    operator = await authenticate(uow.session, command, m.Role.OPERATOR)
    cmd = command.data
    actor = await uow.session.get(KnownActor, cmd.actor_id)
    if actor is None:
        raise NotYetKnown(f"actor {cmd.actor_id!r} is not registered")
    if actor.actor_id == operator.actor_id:
        raise Refused("the operator cannot suspend itself")
    if actor.suspended is not None:
        return m.CommandReply(ok=True, message=f"actor {cmd.actor_id} is already suspended: {actor.suspended}")
    actor.suspended, actor.suspended_at = cmd.reason, utcnow()
    uow.session.add(actor)
    uow.emit(m.ActorSuspended(actor_id=actor.actor_id, role=m.Role(actor.role), suspended_by=operator.actor_id,
                              reason=cmd.reason))
    return m.CommandReply(ok=True, message=f"actor {cmd.actor_id} suspended: nothing it signs is accepted from now "
                                           "on; its open jobs are cancelled, its results stay on the board, marked")


def enrol(uow: Transaction, actor_id: str, role: m.Role, public_key: str, display_name: str,
          event_id: str | None = None, also: tuple[m.Role, ...] = (), organisation: str | None = None) -> None:
    """Record an actor and announce it, so every service learns its key."""
    event = m.ActorRegistered(actor_id=actor_id, role=role, public_key=public_key, key_id=key_id_of(public_key),
                              display_name=display_name, also=tuple(dict.fromkeys(r for r in also if r != role)),
                              organisation=organisation)
    uow.session.add(KnownActor(**event.model_dump(mode="json")))
    uow.emit(event, id=event_id)


async def refuse_check_site(session, owner: KnownActor, spec: m.BenchmarkSpec) -> None:  # type: ignore[no-untyped-def]
    """The compatibility checks run at the benchmark owner's own site worker: a registered site that is the owner
    itself (holding the site role too) or of the owner's organisation."""
    if spec.check_site is None:
        return
    site = await session.get(KnownActor, spec.check_site)
    if site is None or m.Role.SITE not in (site.role, *site.also):
        raise Refused(f"check_site {spec.check_site!r} is not a registered site; the operator registers the "
                      "benchmark owner's own site first (assay actor register ... --role site)")
    if site.actor_id != owner.actor_id and (owner.organisation is None or site.organisation != owner.organisation):
        raise Refused(f"check_site {spec.check_site} is not {owner.actor_id}'s own: models are checked at a site of "
                      f"the benchmark owner's organisation ({owner.organisation or 'it belongs to none'})")


async def register_benchmark(command: Envelope[m.RegisterBenchmark], uow: UnitOfWork) -> m.CommandReply:
    owner = await authenticate(uow.session, command, m.Role.BENCHMARK_OWNER)
    spec = command.data.benchmark
    if await uow.session.get(Benchmark, spec.benchmark_id) is not None:
        raise Refused(f"benchmark_id {spec.benchmark_id!r} already exists; choose another id")
    await refuse_check_site(uow.session, owner, spec)
    uow.session.add(Benchmark(benchmark_id=spec.benchmark_id, owner_id=owner.actor_id,
                              spec=spec.model_dump(mode="json")))
    uow.emit(m.BenchmarkRegistered(owner_id=owner.actor_id, benchmark=spec))
    return m.CommandReply(ok=True, message=f"benchmark {spec.benchmark_id} registered (DEVELOPMENT); "
                          "the operator must approve it")


async def register_model(command: Envelope[m.RegisterModel], uow: UnitOfWork) -> m.CommandReply:
    owner = await authenticate(uow.session, command, m.Role.MODEL_OWNER)
    cmd = command.data
    if await uow.session.get(Model, cmd.model_id) is not None:
        raise Refused(f"model_id {cmd.model_id!r} already exists; a changed model is a new version: register it "
                      f"under a new id with --version-of {cmd.model_id}")
    if cmd.previous is not None:
        earlier = await uow.session.get(Model, cmd.previous)
        if earlier is None or earlier.owner_id != owner.actor_id:
            raise Refused(f"model {cmd.previous} is not a model of {owner.actor_id}: a new version follows one's own")
    uow.session.add(Model(model_id=cmd.model_id, owner_id=owner.actor_id, name=cmd.name,
                          digest=cmd.image.digest, image_name=cmd.image.name, previous=cmd.previous))
    uow.emit(m.ModelRegistered(model_id=cmd.model_id, owner_id=owner.actor_id, name=cmd.name, image=cmd.image,
                               previous=cmd.previous))
    version = f", a new version of {cmd.previous} (which stays as it was)" if cmd.previous else ""
    return m.CommandReply(ok=True, message=f"model {cmd.model_id} registered as {cmd.image.digest}{version}")


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


async def edit_benchmark(command: Envelope[m.EditBenchmark], uow: UnitOfWork) -> m.CommandReply:
    """A benchmark's owner changes its spec: anything but its id in DEVELOPMENT; in OPERATION nothing that defines
    results (its images, metrics, pooling, prediction format), which would make its board mean two things."""
    owner = await authenticate(uow.session, command, m.Role.BENCHMARK_OWNER)
    spec = command.data.benchmark
    row = await uow.session.get(Benchmark, spec.benchmark_id)
    if row is None:
        raise NotYetKnown(f"benchmark {spec.benchmark_id!r} is not registered")
    if row.owner_id != owner.actor_id:
        raise Refused(f"benchmark {spec.benchmark_id} belongs to {row.owner_id}, not to {owner.actor_id}")
    if row.status == Status.ARCHIVED:
        raise Refused(f"benchmark {spec.benchmark_id} is archived: it changes no more")
    changed = lifecycle.changed(m.BenchmarkSpec.model_validate(row.spec), spec)
    if not changed:
        return m.CommandReply(ok=True, message=f"benchmark {spec.benchmark_id}: nothing changed")
    if row.status == Status.OPERATION and (frozen := [name for name in changed if name in lifecycle.FROZEN]):
        raise Refused(f"{', '.join(frozen)} of benchmark {spec.benchmark_id} cannot change in OPERATION: they define "
                      "the results already on its board; register a new benchmark (a new id) to change them")
    await refuse_check_site(uow.session, owner, spec)
    row.spec = spec.model_dump(mode="json")
    uow.session.add(row)
    uow.emit(m.BenchmarkEdited(benchmark=spec, changed=tuple(changed), edited_by=owner.actor_id))
    return m.CommandReply(ok=True, message=f"benchmark {spec.benchmark_id} edited: {', '.join(changed)}")


async def archive_entity(command: Envelope[m.ArchiveEntity], uow: UnitOfWork) -> m.CommandReply:
    """Its owner retires a benchmark, a model or a dataset: never scheduled again, its results marked archived."""
    cmd = command.data
    if cmd.kind is m.EntityType.ACTOR:
        raise Refused("an actor is not archived; the operator suspends it")
    actor = await authenticate(uow.session, command, *lifecycle.OWNERS[cmd.kind])
    table = {m.EntityType.BENCHMARK: Benchmark, m.EntityType.MODEL: Model, m.EntityType.DATASET: Dataset}[cmd.kind]
    row = await uow.session.get(table, cmd.entity_id)
    if row is None:
        raise NotYetKnown(f"{cmd.kind.value} {cmd.entity_id!r} is not registered")
    owner = row.site_id if cmd.kind is m.EntityType.DATASET else row.owner_id
    if owner != actor.actor_id:
        raise Refused(f"{cmd.kind.value} {cmd.entity_id} belongs to {owner}, not to {actor.actor_id}")
    if row.status == Status.ARCHIVED:
        return m.CommandReply(ok=True, message=f"{cmd.kind.value} {cmd.entity_id} is already archived")
    row.status = Status.ARCHIVED
    uow.session.add(row)
    uow.emit(m.EntityArchived(kind=cmd.kind, entity_id=cmd.entity_id, archived_by=actor.actor_id, reason=cmd.reason))
    return m.CommandReply(ok=True, message=f"{cmd.kind.value} {cmd.entity_id} archived: never scheduled again; its "
                                           "results stay on the board, marked")


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
    requests=tuple(Request(handle) for handle in (register_actor, register_organisation, rotate_key, suspend_actor,
                                                  register_benchmark,
                                                  register_model,
                                                  register_dataset, edit_benchmark, archive_entity, get_benchmark,
                                                  list_entities)),
    consumers=(Consumer(mark_operational),),
    publishes=tuple(Outlet.event(event) for event in (m.ActorRegistered, m.BenchmarkRegistered, m.ModelRegistered,
                                                       m.DatasetRegistered, m.BenchmarkEdited, m.EntityArchived,
                                                       m.ActorSuspended, m.ActorKeyRotated,
                                                       m.OrganisationRegistered)),
)
