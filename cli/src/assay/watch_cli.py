"""`assay watch`: the events that concern you, live, one line each: a request waiting for your approval, your
request decided, its check passed (or, as a job of yours, failed), a new result of your model, a job of yours failed
or cancelled, an invitation to you."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from assay.home import speak_as
from contracts import messages as m
from contracts import subjects
from contracts.catalog import event_type
from contracts.envelope import Envelope

console = Console()
TROUBLE = (m.JobState.FAILED, m.JobState.REFUSED, m.JobState.CANCELLED, m.JobState.DECLINED)


@dataclass
class Mine:
    """What the watcher owns: its benchmarks, its models and (a site) its datasets; learned again as it registers."""

    actor: str
    benchmarks: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    datasets: set[str] = field(default_factory=set)

    def owns(self, kind: m.EntityKind, entity_id: str) -> bool:
        return entity_id in (self.models if kind is m.EntityKind.MODEL else self.datasets)


def concerns(event: m.Payload, mine: Mine) -> str | None:
    """The line to show for `event`, or None when it is not the watcher's business. Learns what it registers."""
    if isinstance(event, m.ModelRegistered) and event.owner_id == mine.actor:
        mine.models.add(event.model_id)
    if isinstance(event, m.DatasetRegistered) and event.site_id == mine.actor:
        mine.datasets.add(event.dataset_id)
    if isinstance(event, m.BenchmarkRegistered) and event.owner_id == mine.actor:
        mine.benchmarks.add(event.benchmark.benchmark_id)
    if isinstance(event, m.AssociationRequested) and event.benchmark_id in mine.benchmarks \
            and event.requested_by != mine.actor:
        return (f"waiting for you: {event.requested_by} asks {event.kind.value} {event.entity_id} into "
                f"{event.benchmark_id} (assay association approve {event.benchmark_id} --{event.kind.value} "
                f"{event.entity_id})")
    if isinstance(event, m.AssociationInvited) and mine.owns(event.kind, event.entity_id):
        return (f"invited: {event.invited_by} invites {event.kind.value} {event.entity_id} into {event.benchmark_id} "
                f"(assay association accept {event.benchmark_id} --{event.kind.value} {event.entity_id})")
    pair = isinstance(event, m.AssociationApproved | m.AssociationRejected | m.AssociationRevoked)
    if pair and (mine.owns(event.kind, event.entity_id) or event.benchmark_id in mine.benchmarks):  # type: ignore[union-attr]
        what = {m.AssociationApproved: "approved", m.AssociationRejected: "rejected",
                m.AssociationRevoked: "revoked"}[type(event)]
        why = getattr(event, "reason", "")
        return (f"{what}: {event.kind.value} {event.entity_id} in {event.benchmark_id}"  # type: ignore[union-attr]
                + (f": {why}" if why else ""))
    if isinstance(event, m.ResultAccepted) and (event.binding.model_id in mine.models
                                                or event.binding.benchmark_id in mine.benchmarks
                                                or event.site_id == mine.actor):
        return (f"new result: model {event.binding.model_id} at {event.site_id} on {event.binding.benchmark_id} "
                f"(assay leaderboard show {event.binding.benchmark_id} --as {mine.actor})")
    if isinstance(event, m.CheckCompleted) and (mine.owns(event.kind, event.entity_id)
                                                or event.benchmark_id in mine.benchmarks):
        return (f"check passed: {event.kind.value} {event.entity_id} for {event.benchmark_id}, at {event.site_id} "
                f"(its metrics: assay association show {event.benchmark_id} --{event.kind.value} {event.entity_id})")
    if isinstance(event, m.JobStateChanged) and event.state in TROUBLE and (
            event.model_id in mine.models or event.site_id == mine.actor or event.benchmark_id in mine.benchmarks):
        return (f"job {event.job_id[:13]} {event.state.value.lower()}: model {event.model_id} at {event.site_id}: "
                f"{event.reason}")
    return None


def watch(actor: Annotated[str, typer.Option("--as", help="whose business to follow", callback=speak_as)],
          as_json: Annotated[bool, typer.Option("--json", help="each event as a JSON line")] = False,
          count: Annotated[int, typer.Option(help="stop after this many (0: until Ctrl-C)")] = 0) -> None:
    """Follow, live, the events that concern you, one line each (Ctrl-C stops)."""
    from assay.cli import _home, _send

    home = _home()
    mine = Mine(actor)
    for kind, into in ((m.EntityType.BENCHMARK, mine.benchmarks), (m.EntityType.MODEL, mine.models),
                       (m.EntityType.DATASET, mine.datasets)):
        listed = m.EntityList.model_validate(_send(m.ListEntities(kind=kind, owner=actor), actor))
        into.update(entity.entity_id for entity in listed.entities)
    console.print(f"[dim]watching for {actor}: {len(mine.benchmarks)} benchmark(s), {len(mine.models)} model(s), "
                  f"{len(mine.datasets)} dataset(s); Ctrl-C stops[/dim]", highlight=False)
    try:
        asyncio.run(_follow(home.nats_url(), mine, as_json, count))
    except KeyboardInterrupt:
        pass


async def _follow(url: str, mine: Mine, as_json: bool, count: int) -> None:
    from assay.client import connected

    shown = 0
    done = asyncio.Event()
    async with connected(url) as (nc, _):
        async def seen(msg) -> None:  # type: ignore[no-untyped-def]
            nonlocal shown
            kind = event_type(msg.subject)
            if kind is None or done.is_set():
                return
            try:
                event = Envelope[kind].model_validate_json(msg.data).data  # type: ignore[valid-type]
            except ValueError:
                return  # not a v1 event as this CLI knows them: the services dead-letter it
            if (line := concerns(event, mine)) is None:
                return
            if as_json:
                print(json.dumps({"type": event.TYPE, "line": line, "data": event.model_dump(mode="json")}),
                      flush=True)
            else:
                console.print(escape(line), highlight=False)
            shown += 1
            if count and shown >= count:
                done.set()

        await nc.subscribe(subjects.EVENTS_ALL, cb=seen)
        await nc.flush()
        console.print("[dim]ready[/dim]", highlight=False)
        await done.wait()
