"""`assay verify`: rebuild a benchmark's board from the streams alone and compare it with the leaderboard's.

The streams hold everything the board follows from: the registry's actors and benchmarks, the approvals and the
scheduler's jobs in EVENTS (each signed by its service), and the sites' signed results in RESULTS. Every signature
and binding is checked again here, every figure recomputed, and each difference from the service's board named. It
reads the streams and asks one query; it needs no service's database.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from contracts import subjects
from contracts.catalog import event_type
from contracts.envelope import Envelope, Payload
from contracts.messages import (
    ActorKeyRotated,
    ActorRegistered,
    ActorSuspended,
    AssociationApproved,
    AssociationRevoked,
    BenchmarkApproved,
    BenchmarkEdited,
    BenchmarkRegistered,
    BenchmarkSpec,
    EntityArchived,
    EntityKind,
    Leaderboard,
    SiteResult,
)
from leaderboard.board import Score, aggregate
from leaderboard.domain import Signer, check_binding, check_job, check_origin
from leaderboard.withdrawn import Consents, Withdrawal, counts, marked, retirement, withdrawals
from service_kit.edge import Refused
from service_kit.trust import Trust

Message = tuple[str, bytes]  # the subject it was stored under, and its bytes
TOLERANCE = 1e-9  # the service adds the same numbers in another order: they may differ in the last bits


@dataclass
class Rebuilt:
    board: Leaderboard | None = None
    accepted: int = 0
    refused: list[str] = field(default_factory=list)    # results the checks refuse, and why
    checks: int = 0                                     # checks before joining, verified, never counted
    problems: list[str] = field(default_factory=list)   # events not signed by the service that publishes them


@dataclass
class World:
    """What the events say, once each event's signature is checked."""

    actors: dict[str, ActorRegistered] = field(default_factory=dict)          # by key id; the first one counts
    benchmarks: dict[str, BenchmarkRegistered] = field(default_factory=dict)  # the first registration counts
    approved_benchmarks: set[str] = field(default_factory=set)
    approved: set[tuple[str, EntityKind, str]] = field(default_factory=set)
    consents: dict[str, Consents] = field(default_factory=dict)  # by benchmark: its pairs' revocations, approvals
    archived: dict[tuple[str, str], Withdrawal] = field(default_factory=dict)  # (kind, id) -> its archival
    suspended: dict[str, Withdrawal] = field(default_factory=dict)  # actor -> its suspension
    retired: dict[str, datetime] = field(default_factory=dict)  # key id -> when its actor replaced it

    def consent(self, benchmark_id: str) -> Consents:
        return self.consents.setdefault(benchmark_id, Consents(revoked={}, approved={}))


def learn(events: Iterable[Message], trust: Trust, problems: list[str]) -> World:
    world, registered = World(), set()
    for subject, body in events:
        kind = event_type(subject)
        if kind not in (ActorRegistered, BenchmarkRegistered, BenchmarkApproved, AssociationApproved,
                        AssociationRevoked, BenchmarkEdited, EntityArchived, ActorSuspended, ActorKeyRotated):
            continue
        envelope: Envelope[Payload] = Envelope[kind].model_validate_json(body)  # type: ignore[valid-type]
        try:
            trust.check(envelope)
        except Refused as exc:
            problems.append(f"event {envelope.id} on {subject}: {exc}")
            continue
        event = envelope.data
        if isinstance(event, ActorRegistered) and event.actor_id not in registered:
            registered.add(event.actor_id)
            world.actors.setdefault(event.key_id, event)
        elif isinstance(event, BenchmarkRegistered):
            world.benchmarks.setdefault(event.benchmark.benchmark_id, event)
        elif isinstance(event, BenchmarkEdited) and event.benchmark.benchmark_id in world.benchmarks:
            key = event.benchmark.benchmark_id
            world.benchmarks[key] = world.benchmarks[key].model_copy(update={"benchmark": event.benchmark})
        elif isinstance(event, ActorKeyRotated) and event.previous_key_id in world.actors:
            earlier = world.actors[event.previous_key_id]
            world.retired.setdefault(event.previous_key_id, envelope.time)
            world.actors.setdefault(event.key_id, earlier.model_copy(update={"public_key": event.public_key,
                                                                             "key_id": event.key_id}))
        elif isinstance(event, ActorSuspended):
            world.suspended.setdefault(event.actor_id, Withdrawal(
                envelope.time, "the operator", event.reason,
                what=f"suspended (its {'site' if event.role == 'site' else 'owner'})"))
        elif isinstance(event, EntityArchived):
            world.archived.setdefault((event.kind.value, event.entity_id), Withdrawal(
                envelope.time, event.archived_by, event.reason, what="archived"))
        elif isinstance(event, BenchmarkApproved):
            world.approved_benchmarks.add(event.benchmark_id)
        elif isinstance(event, AssociationApproved):
            world.approved.add((event.benchmark_id, event.kind, event.entity_id))
            approvals = world.consent(event.benchmark_id).approved
            approvals[(event.kind.value, event.entity_id)] = max(envelope.time, approvals.get(
                (event.kind.value, event.entity_id), envelope.time))
        elif isinstance(event, AssociationRevoked):
            revoked = world.consent(event.benchmark_id).revoked
            last = revoked.get((event.kind.value, event.entity_id))
            if last is None or last.at < envelope.time:
                revoked[(event.kind.value, event.entity_id)] = Withdrawal(envelope.time, event.revoked_by, event.reason)
    return world


def score_of(result: SiteResult) -> Score:
    evidence = result.evidence
    return Score(model_id=result.binding.model_id, site_id=result.site_id, metrics=result.metrics,
                 case_count=result.binding.case_count,
                 replicates={name: np.asarray(values, dtype=np.float64)
                             for name, values in (evidence.replicates.items() if evidence else ())},
                 confusion=evidence.confusion if evidence else None,
                 histograms=evidence.histograms if evidence else None)


def judged(envelope: Envelope[SiteResult], subject: str, world: World, benchmark: BenchmarkSpec, trust: Trust,
           counted: dict[tuple[str, str], str]) -> str | None:
    """Why the result may not count, or None: the leaderboard's checks, and the two consents of its pair."""
    result = envelope.data
    verdict = check_job(result, scheduler_key=trust.keys["scheduling"])
    if verdict.ok:
        key_id = envelope.signature.key_id if envelope.signature else ""
        actor = world.actors.get(key_id)
        signer = None if actor is None else Signer(actor.actor_id, actor.role, actor.public_key,
                                                   world.retired.get(key_id), tuple(actor.also))
        verdict = check_origin(envelope, subject=subject, signer=signer)
    if verdict.ok:
        verdict = check_binding(result, job=result.job.data, benchmark=benchmark,
                                accepted_before=counted.get((result.binding.model_id, result.binding.dataset_id)))
    if not verdict.ok:
        return verdict.reason
    if result.job.data.check is not None:  # a check before joining: verified like any result, its pair only asked
        return None
    bound = result.binding
    if bound.benchmark_id not in world.approved_benchmarks:
        return f"benchmark {bound.benchmark_id} was never approved by the operator"
    for kind, entity in ((EntityKind.MODEL, bound.model_id), (EntityKind.DATASET, bound.dataset_id)):
        if (bound.benchmark_id, kind, entity) not in world.approved:
            return f"{kind.value} {entity} was never approved for benchmark {bound.benchmark_id}"
    return None


def rebuild(benchmark_id: str, events: Iterable[Message], results: Iterable[Message], trust: Trust) -> Rebuilt:
    """The board of `benchmark_id` as the streams make it, with what they refuse and why."""
    rebuilt = Rebuilt()
    world = learn(events, trust, rebuilt.problems)
    registered = world.benchmarks.get(benchmark_id)
    if registered is None:
        rebuilt.problems.append(f"benchmark {benchmark_id} is not registered in the EVENTS stream")
        return rebuilt
    benchmark, valid = registered.benchmark, []
    counted: dict[tuple[str, str], str] = {}  # (model, dataset) -> the job whose result counts
    for subject, body in results:
        if not subjects.matches(subjects.RESULTS_ALL, subject):
            continue  # a site's report on a job: not a result
        envelope = Envelope[SiteResult].model_validate_json(body)
        if envelope.data.binding.benchmark_id != benchmark_id:
            continue
        if (reason := judged(envelope, subject, world, benchmark, trust, counted)) is not None:
            rebuilt.refused.append(f"result {envelope.id} of job {envelope.data.job_id}: {reason}")
            continue
        if envelope.data.job.data.check is not None:
            rebuilt.checks += 1  # never on the board
            continue
        counted[(envelope.data.binding.model_id, envelope.data.binding.dataset_id)] = envelope.data.job_id
        valid.append(envelope)
    withdrawn = withdrawals(world.consent(benchmark_id), world.archived, world.suspended,
                            [(e.data.binding.model_id, e.data.job.data.model_owner, e.data.site_id,
                              e.data.binding.dataset_id) for e in valid])
    scores, datasets = [], {}
    for envelope in valid:
        bound = envelope.data.binding
        if not counts(bound.model_id, bound.dataset_id, envelope.data.finished_at, withdrawn):
            rebuilt.refused.append(f"result {envelope.id} of job {envelope.data.job_id}: finished after its "
                                   "consent was withdrawn, its entity archived or its actor suspended")
            continue
        scores.append(score_of(envelope.data))
        datasets.setdefault(bound.model_id, set()).add(bound.dataset_id)
    rebuilt.board = marked(aggregate(benchmark, scores), datasets, withdrawn).model_copy(
        update={"archived": retirement(world.archived, benchmark_id)})
    rebuilt.accepted = len(scores)
    return rebuilt


def differences(streams: Leaderboard, service: Leaderboard) -> list[str]:
    """Every figure on which the service's board differs from the one the streams give, named."""
    found: list[str] = []
    ours, theirs = {r.model_id: r for r in streams.rows}, {r.model_id: r for r in service.rows}
    for model in sorted(set(ours) - set(theirs)):
        found.append(f"model {model}: the streams rank it, the service's board does not show it")
    for model in sorted(set(theirs) - set(ours)):
        found.append(f"model {model}: on the service's board, but no result the streams hold counts for it")
    for model in sorted(set(ours) & set(theirs)):
        _compare(ours[model].model_dump(), theirs[model].model_dump(), [f"model {model}"], found)
    for name in ("rank_stability", "replicates", "metrics", "primary_metric", "archived"):
        _compare(getattr(streams, name), getattr(service, name), [name], found)
    return found


def _compare(ours: Any, theirs: Any, path: list[str], found: list[str]) -> None:
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        for key in sorted(set(ours) | set(theirs), key=str):
            if key not in theirs or key not in ours:
                where = "the service's board lacks it" if key not in theirs else "the streams do not give it"
                found.append(f"{' · '.join([*path, str(key)])}: {where}")
            else:
                _compare(ours[key], theirs[key], [*path, str(key)], found)
    elif isinstance(ours, Sequence) and not isinstance(ours, str) and isinstance(theirs, Sequence) \
            and not isinstance(theirs, str) and len(ours) == len(theirs):
        for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _compare(a, b, [*path, str(index + 1)], found)
    elif not _same(ours, theirs):
        found.append(f"{' · '.join(path)}: the service says {theirs!r}, the streams give {ours!r}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE)
    return bool(a == b)


async def read_stream(nc: Any, stream: str, subject: str, inbox: str) -> list[Message]:
    """Every message of `stream` on `subject`, oldest first, through a consumer of this reader's own that acks
    nothing and goes when it is done (so it needs read rights only)."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    js = nc.jetstream()
    info = await js.stream_info(stream)
    if not info.state.messages:
        return []
    sub = await js.pull_subscribe(subject, stream=stream, inbox_prefix=f"{inbox}.".encode(), config=ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0))
    found: list[Message] = []
    try:
        while True:
            try:
                batch = await sub.fetch(500, timeout=1.0)
            except TimeoutError:
                break  # nothing on `subject` (or nothing more): the stream had only other subjects
            found += [(msg.subject, msg.data) for msg in batch]
            if batch[-1].metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return found


async def verified(home: Any, benchmark_id: str, actor: str, service_keys: Mapping[str, str], console: Any) -> int:
    """`assay verify`, as an exit code: 0 when the service's board is the one the streams give, else 1."""
    from rich.markup import escape
    from rich.table import Table

    from assay.client import CommandFailed, connected, request
    from contracts.messages import ShowLeaderboard
    from assay.home import bus_creds
    from service_kit.connection import inbox_of

    url = home.nats_url("auditor")
    inbox = inbox_of(url, bus_creds())
    async with connected(url) as (nc, errors):
        events = await read_stream(nc, subjects.EVENTS_STREAM, subjects.EVENTS_ALL, inbox)
        results = await read_stream(nc, subjects.RESULTS_STREAM, subjects.RESULTS_ALL, inbox)
        await nc.flush()
    if errors:  # a refused read looks like an empty stream: never compare with what could not be read
        console.print(f"[red]error:[/red] the server refused to let this user read the streams: "
                      f"{escape(errors[-1])}; verify needs read access to EVENTS and RESULTS (an auditor's)")
        return 1
    console.print(f"read {len(events)} events and {len(results)} results from the streams")
    rebuilt = rebuild(benchmark_id, events, results, Trust(service_keys))
    try:
        service = Leaderboard.model_validate(await request(url, ShowLeaderboard(benchmark_id=benchmark_id),
                                                           actor=actor, key=home.key(actor)))
    except CommandFailed as exc:
        console.print(f"[red]error:[/red] the leaderboard did not answer: {escape(str(exc))}")
        return 1
    if service.view != "full":
        console.print(f"[red]error:[/red] the leaderboard shows {actor} only part of the board ({service.view}); "
                      "verify as an auditor or as the benchmark's owner")
        return 1
    found = rebuilt.problems + (differences(rebuilt.board, service) if rebuilt.board is not None else [])
    summary = Table(title=f"assay verify {benchmark_id}", show_header=False)
    summary.add_row("results counted from the streams", str(rebuilt.accepted))
    summary.add_row("results the checks refuse", str(len(rebuilt.refused)))
    summary.add_row("checks before joining (verified, never counted)", str(rebuilt.checks))
    summary.add_row("models on the service's board", str(len(service.rows)))
    summary.add_row("differences", f"[red]{len(found)}[/red]" if found else "[green]0[/green]")
    console.print(summary)
    for reason in rebuilt.refused:
        console.print(f"  refused: {escape(reason)}")
    for difference in found:
        console.print(f"  [red]differs:[/red] {escape(difference)}")
    if not found:
        console.print(f"[green]ok[/green] the board of {benchmark_id} is the one its signed results give: every "
                      "signature, binding and figure checked")
    return 1 if found else 0
