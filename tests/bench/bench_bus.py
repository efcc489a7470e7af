"""What the benchmark reads from the server itself: what a job costs the bus (messages stored, deliveries made), and
when the bus is quiet (no job waiting, no consumer behind)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import nats

from service_kit.connection import servers

JOB_STREAMS = ("EVENTS", "JOBS", "RESULTS", "DEAD_LETTERS")  # the rest (KV, object store) is not written per job


def _kind(subject: str) -> str:
    """A subject without its site (`assay.v1.results.*`), so the sites' subjects add up."""
    parts = subject.split(".")
    return ".".join(parts[:3] + ["*"]) if parts[2] in ("jobs", "results", "reports", "cancelled") else subject


async def bus_counts(nats_url: str) -> dict[str, Counter[str]]:
    """What the server counted so far: messages stored in each stream and on each subject kind (EVENTS and RESULTS
    keep every message), and deliveries to each durable consumer (redeliveries too; the sites' consumers as one)."""
    nc = await nats.connect(servers(nats_url))
    js = nc.jetstream()
    writes: Counter[str] = Counter()
    subjects: Counter[str] = Counter()
    deliveries: Counter[str] = Counter()
    try:
        for stream in JOB_STREAMS:
            info = await js.stream_info(stream, subjects_filter=">" if stream in ("EVENTS", "RESULTS") else None)
            writes[stream] = info.state.last_seq
            for subject, n in (info.state.subjects or {}).items():
                subjects[_kind(subject)] += n
            offset = 0
            while True:
                page = await js.consumers_info(stream, offset=offset)
                for consumer in page:
                    name = "site-*" if consumer.name.startswith("site-") else consumer.name
                    deliveries[f"{stream} {name}"] += consumer.delivered.consumer_seq if consumer.delivered else 0
                if len(page) < 256:
                    break
                offset += len(page)
    finally:
        await nc.close()
    return {"writes": writes, "subjects": subjects, "deliveries": deliveries}


async def wait_quiet(nats_url: str, timeout_s: float = 180.0) -> float:
    """Until no job waits in JOBS and every durable consumer of JOBS, RESULTS and EVENTS has nothing pending, three
    looks in a row: the rounds then count and time their own jobs only. Returns the seconds it took."""
    nc = await nats.connect(servers(nats_url))
    js = nc.jetstream()
    start, quiet = time.monotonic(), 0
    try:
        while quiet < 3:
            if time.monotonic() - start > timeout_s:
                raise TimeoutError("the sites and services did not catch up before the rounds")
            busy = (await js.stream_info("JOBS")).state.messages > 0
            for stream in ("JOBS", "RESULTS", "EVENTS"):
                offset = 0
                while not busy:
                    page = await js.consumers_info(stream, offset=offset)
                    busy = any(c.num_pending or c.num_ack_pending for c in page)
                    if len(page) < 256:
                        break
                    offset += len(page)
            quiet = 0 if busy else quiet + 1
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    return time.monotonic() - start


def per_job(before: dict[str, Counter[str]], after: dict[str, Counter[str]], jobs: int) -> dict[str, Any]:
    """The JetStream writes and deliveries of the rounds, per job."""
    def each(kind: str) -> dict[str, float]:
        return {k: round((after[kind][k] - before[kind][k]) / jobs, 2) for k in sorted(after[kind])
                if after[kind][k] != before[kind][k]}

    writes, subjects, deliveries = each("writes"), each("subjects"), each("deliveries")
    return {"writes": round(sum(writes.values()), 2), "deliveries": round(sum(deliveries.values()), 2),
            "by_stream": writes, "by_subject": subjects, "by_consumer": deliveries}
