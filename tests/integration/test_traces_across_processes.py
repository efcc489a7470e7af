"""Tracing across processes: three brokers, three providers, one real nats-server, and the outbox relay: one trace
follows a message from the process that staged it to every one that handles it."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.unit.test_tracing import finished, traced_broker


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[str]:
    """A bare nats-server on a random loopback port; its log says when it is ready."""
    binary = Path(sys.prefix, "bin", "nats-server")
    proc = subprocess.Popen([str(binary), "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = ""
    assert proc.stderr is not None
    for line in proc.stderr:
        if listening := re.search(r"Listening for client connections on (\S+)", line):
            url = f"nats://{listening[1]}"
        if "Server is ready" in line:
            break
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining: a full pipe stalls the server
    try:
        assert url, "nats-server did not start"
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def test_one_trace_follows_a_message_from_a_client_through_a_service_to_a_site_worker(nats_server: str) -> None:
    spans = InMemorySpanExporter()
    client, client_tracing = traced_broker("client", spans, nats_server)
    service, service_tracing = traced_broker("scheduling", spans, nats_server)
    worker, worker_tracing = traced_broker("site-worker-hospital-a", spans, nats_server)
    to_site = service.publisher("assay.v1.jobs.hospital-a")
    ran = asyncio.get_running_loop().create_future()

    @service.subscriber("assay.v1.cmd.scheduling.plan")
    async def plan(body: str) -> None:
        await to_site.publish(f"job for {body}")

    @worker.subscriber("assay.v1.jobs.hospital-a")
    async def run_job(body: str) -> None:
        ran.set_result(body)

    async with client, service, worker:
        for subscribing in (service, worker):
            await subscribing.start()
            await subscribing.connection.flush()  # the server has the subscriptions once the round trip is back
        await client.connect()
        await client.publish("benchmark-1", "assay.v1.cmd.scheduling.plan")
        assert await asyncio.wait_for(ran, 10) == "job for benchmark-1"

    recorded = finished(spans, client_tracing, service_tracing, worker_tracing)
    assert len({s.context.trace_id for s in recorded}) == 1
    consumers = {s.resource.attributes["service.name"] for s in recorded if s.kind is SpanKind.CONSUMER}
    producers = {s.resource.attributes["service.name"] for s in recorded if s.kind is SpanKind.PRODUCER}
    assert (producers, consumers) == ({"client", "scheduling"}, {"scheduling", "site-worker-hospital-a"})


async def test_an_event_relayed_from_the_outbox_continues_the_trace_that_staged_it(nats_url: str, tmp_path: Path) -> None:
    from contracts import messages as m
    from contracts.signing import KeyPair
    from service_kit.app import KIT_TABLES
    from service_kit.db import Database, create_tables, make_engine
    from service_kit.outbox import Relay
    from service_kit.wiring import Outlet, Wiring
    from service_kit.work import Transaction

    wiring = Wiring(owner="approval", source="service:approval", publishes=(Outlet.event(m.BenchmarkApproved),))

    spans = InMemorySpanExporter()
    relay_broker, relay_provider = traced_broker("approval", spans, nats_url)
    consumer_broker, consumer_provider = traced_broker("scheduling", spans, nats_url)
    handled = asyncio.get_running_loop().create_future()

    @consumer_broker.subscriber("assay.v1.evt.benchmark.approved")
    async def learn(body: dict) -> None:  # type: ignore[type-arg]
        handled.set_result(body)

    db = Database(make_engine(f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}"))
    await create_tables(db.engine, KIT_TABLES)
    with relay_provider.get_tracer("test").start_as_current_span("approve benchmark") as command:
        async with db.transaction() as session:
            Transaction(session, wiring, KeyPair.generate()).emit(
                m.BenchmarkApproved(benchmark_id="b", approved_by="operator"))
    relay = Relay(db, wiring.declare(relay_broker, units=None).publish)
    await consumer_broker.start()
    await relay_broker.start()
    try:
        assert await relay.flush() == 1  # later, in another task, with no span open
        await asyncio.wait_for(handled, 10)
    finally:
        await relay_broker.stop()
        await consumer_broker.stop()
        await db.close()
    recorded = finished(spans, relay_provider, consumer_provider)
    [consumed] = [s for s in recorded if s.kind is SpanKind.CONSUMER]
    assert consumed.context.trace_id == command.get_span_context().trace_id
