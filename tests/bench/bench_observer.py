"""Stamps when job, result and acceptance messages appear on the bus, in a process of its own.

The benchmark's main process hosts 100 simulated sites; stamping there would measure its own event loop's
backlog. This process does nothing else. Run as `python bench_observer.py NATS_URL`: it prints `ready`, then one
JSON line per message (also each LeaderboardUpdated's size and each consumer advisory); it exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import datetime

import nats

JOB_SCHEDULED = "assay.v1.evt.job.scheduled"
RESULT_ACCEPTED = "assay.v1.evt.result.accepted"
SITE_RESULTS = "assay.v1.results.*"
BOARD_UPDATED = "assay.v1.evt.leaderboard.updated"
ADVISORIES = "$JS.EVENT.ADVISORY.CONSUMER.>"


def _job(kind: str, data: dict) -> dict:  # type: ignore[type-arg]
    return data["job"] if kind == "scheduled" else data


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def observe(nats_url: str) -> None:
    nc = await nats.connect(nats_url, max_reconnect_attempts=3)
    out = sys.stdout

    def stamp(kind: str):  # type: ignore[no-untyped-def]
        async def on_message(msg) -> None:  # type: ignore[no-untyped-def]
            mono = time.monotonic()
            envelope = json.loads(msg.data)
            job = _job(kind, envelope["data"])
            line = {"kind": kind, "job_id": job["job_id"], "model_id": job["model_id"], "mono": mono,
                    "sent": _epoch(envelope["time"])}
            out.write(json.dumps(line) + "\n")
            out.flush()
        return on_message

    async def on_advisory(msg) -> None:  # type: ignore[no-untyped-def]
        # $JS.EVENT.ADVISORY.CONSUMER.<TYPE>.<STREAM>.<CONSUMER>: naks, terminations, max deliveries
        parts = msg.subject.split(".")
        if len(parts) >= 7 and parts[4] not in ("CREATED", "DELETED"):
            out.write(json.dumps({"kind": "advisory", "type": parts[4], "stream": parts[5],
                                  "consumer": ".".join(parts[6:])}) + "\n")
            out.flush()

    async def on_board(msg) -> None:  # type: ignore[no-untyped-def]
        out.write(json.dumps({"kind": "board", "bytes": len(msg.data)}) + "\n")
        out.flush()

    await nc.subscribe(BOARD_UPDATED, cb=on_board)
    await nc.subscribe(JOB_SCHEDULED, cb=stamp("scheduled"))
    await nc.subscribe(SITE_RESULTS, cb=stamp("result"))
    await nc.subscribe(RESULT_ACCEPTED, cb=stamp("accepted"))
    await nc.subscribe(ADVISORIES, cb=on_advisory)
    await nc.flush()
    out.write("ready\n")
    out.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(observe(sys.argv[1]))
