"""What an operator's collector receives: the four services and a site worker, each configured with an OTLP endpoint
(`otlp_endpoint`, as ASSAY_<SERVICE>_OTLP_ENDPOINT and ASSAY_SITE_OTLP_ENDPOINT set it) on a real nats-server, export
over OTLP/HTTP to a receiver built on opentelemetry-proto. One job's trace runs from the command that approved its
dataset through the scheduler and the site's container runs to the leaderboard's verdict, and the metrics come too."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import nats
import pytest

from assay_telemetry.metrics import (
    CONTAINER_RUNS,
    DEAD_LETTERS,
    JOBS,
    OUTBOX_LAG,
    OUTBOX_PENDING,
    PROCESS_DURATION,
    QUEUE,
    RESULTS,
)
from contracts import messages as m
from contracts.catalog import SERVICES
from tests.support.federation import Federation, fake_containers, next_events
from tests.support.otlp import ReceivedSpan, Receiver, receiving

METRICS = {"auc": 0.8, "sensitivity": 0.7}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as received:
        yield received


@pytest.fixture
async def federation(nats_url: str, tmp_path: Path, receiver: Receiver):  # type: ignore[no-untyped-def]
    fed = Federation(nats_url, tmp_path, lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db")
    fed.connection["otlp_endpoint"] = receiver.url  # every service's settings, as its environment would give them
    await fed.start_services()
    yield fed
    await fed.stop()


async def until(holds: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 60) -> None:
    """Ask again until `holds` says yes (a state with no event of its own to wait on)."""
    try:
        async with asyncio.timeout(timeout_s):
            while not await holds():
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"never: {what}") from None


def trace_of(spans: list[ReceivedSpan], trace_id: str) -> dict[str, ReceivedSpan]:
    return {s.span_id: s for s in spans if s.trace_id == trace_id}


async def test_one_jobs_trace_and_the_metrics_reach_the_collector(federation: Federation, receiver: Receiver) -> None:
    await federation.start_site("site-a", fake_containers(METRICS), otlp_endpoint=receiver.url)
    await federation.benchmark()
    await federation.model("model-1")
    await federation.dataset("site-a", "ds-a")
    [accepted] = await next_events(federation.nats_url, "assay.v1.evt.result.accepted", 1)
    job_id = accepted["data"]["job_id"]

    async def all_done() -> bool:
        jobs = (await federation.send(m.ListJobs(site_id="site-a"), "operator"))["jobs"]
        return len(jobs) == 2 and all(job["state"] == "DONE" for job in jobs)  # the dataset's check and the job

    await until(all_done, "the scheduler has both jobs DONE")
    nc = await nats.connect(federation.nats_url)  # a message the site cannot read: dead-lettered
    await nc.jetstream().publish("assay.v1.jobs.site-a", b"not a job", headers={"Nats-Msg-Id": "garbage-1"})
    await nc.close()
    await next_events(federation.nats_url, "assay.v1.dlq.site-site-a-jobs", 1)
    await federation.stop()  # each process sends what it still holds: its batched spans and its last metrics
    federation.apps.clear()
    assert receiver.refused == []

    # one trace, from the command to the board: the job's delivery at the site names the job
    spans = receiver.spans
    [delivery] = [s for s in spans if s.service == "site-worker-site-a" and s.name == "assay.v1.jobs.site-a process"
                  and s.attributes.get("assay.job_id") == job_id]
    trace = trace_of(spans, delivery.trace_id)
    assert all(s.parent_id in trace for s in trace.values() if s.parent_id), "every parent is in the trace"
    [root] = [s for s in trace.values() if not s.parent_id]
    assert (root.service, root.name) == ("approval", "assay.v1.cmd.approval.approve_association process")
    ancestors, step = [], delivery
    while step.parent_id:
        step = trace[step.parent_id]
        ancestors.append((step.service, step.name))
    assert ancestors == [("scheduling", "assay.v1.evt.association.approved process"), (root.service, root.name)]
    runs = [s for s in trace.values() if s.parent_id == delivery.span_id and s.name.startswith("container ")]
    assert sorted(s.name for s in runs) == ["container evaluate", "container infer"]
    assert all(s.end_ns > s.start_ns and s.attributes["assay.outcome"] == "ok" for s in runs)
    [verdict] = [s for s in trace.values()
                 if s.service == "leaderboard" and s.name == "assay.v1.results.site-a process"]
    assert verdict.parent_id == delivery.span_id and verdict.attributes["assay.job_id"] == job_id
    # the job id finds its spans in every process that handled it, whatever trace they are in; approval reads only
    # check jobs' events, so an evaluation job never reaches it
    assert {s.service for s in spans if s.attributes.get("assay.job_id") == job_id} == {
        "scheduling", "site-worker-site-a", "leaderboard"}
    assert not [s.name for s in spans if s.name.endswith(" create") or "_INBOX" in s.name]

    def value(metric: str, service: str, **attributes: str) -> float:
        wanted = {f"assay.{k}": v for k, v in attributes.items()}
        return sum(p.value for (source, _), p in receiver.latest(metric).items()
                   if source == service and wanted.items() <= p.attributes.items())

    assert value(JOBS.name, "scheduling", state="DONE", benchmark_id="bench", site_id="site-a") == 2
    assert value(JOBS.name, "scheduling", state="FAILED", site_id="site-a") == 0  # every state is reported
    assert {p.attributes["assay.state"] for p in receiver.latest(JOBS.name).values()} == set(m.JobState)
    assert value(QUEUE.name, "scheduling", site_id="site-a") == 0
    assert value(RESULTS.name, "leaderboard", outcome="accepted") == 1
    assert value(RESULTS.name, "leaderboard", outcome="check") == 1
    assert value(CONTAINER_RUNS.name, "site-worker-site-a", task="infer", outcome="ok", site_id="site-a") == 2
    assert value(CONTAINER_RUNS.name, "site-worker-site-a", task="evaluate", outcome="ok") == 2
    assert value(DEAD_LETTERS.name, "site-worker-site-a", consumer="site-site-a-jobs") == 1
    assert {service for service, _ in receiver.latest(OUTBOX_PENDING.name)} == set(SERVICES)
    assert all(p.value == 0 for p in receiver.latest(OUTBOX_PENDING.name).values())  # all published at the end
    assert all(value(OUTBOX_LAG.name, service) > 0 for service in SERVICES)
    assert value(PROCESS_DURATION.name, "scheduling") > 0  # faststream's, for every message handled
    units = {p.metric: p.unit for p in receiver.points}
    assert (units[CONTAINER_RUNS.name], units[JOBS.name]) == ("s", "{job}")


async def test_a_command_and_the_event_it_causes_leave_no_empty_spans_and_few_span_names(federation, receiver):
    """A CLI command comes with no trace context and its reply goes to a one-off inbox: faststream opened and at once
    ended a `create` span for it, and for every message published, and named each reply after its inbox."""
    await federation.benchmark()  # a benchmark owner enrolled, the benchmark registered (approval learns it), approved
    for name in ("vendor", "another-vendor"):
        await federation.enrol(name, m.Role.MODEL_OWNER)
    await federation.stop()
    federation.apps.clear()

    spans = receiver.spans
    assert not [s.name for s in spans if s.name.endswith(" create")]
    assert all(s.parent_id in {p.span_id for p in spans} for s in spans if s.parent_id), "no parent is missing"
    commands = [s for s in spans
                if s.service == "registry" and s.name == "assay.v1.cmd.registry.register_actor process"]
    assert len(commands) >= 3 and not [s for s in commands if s.parent_id], "a command's handling starts its trace"
    replies = [s for s in spans if s.parent_id in {c.span_id for c in commands} and s.kind == "PRODUCER"
               and s.attributes["messaging.destination.name"].startswith("_INBOX.")]
    assert len(replies) == len(commands) and {s.name for s in replies} == {"(reply) publish"}
    assert all(s.attributes["messaging.destination.temporary"] for s in replies)
    assert not [s.name for s in spans if "_INBOX" in s.name]
    # the event a command staged: its publish and its consumers' handling are children of the command's span
    [registered] = [s for s in spans if s.name == "assay.v1.cmd.registry.register_benchmark process"]
    assert {(s.service, s.name) for s in spans if s.parent_id == registered.span_id} >= {
        ("registry", "(reply) publish"), ("registry", "assay.v1.evt.benchmark.registered publish"),
        ("approval", "assay.v1.evt.benchmark.registered process")}
