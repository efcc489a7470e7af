"""Stamps when job, result and acceptance messages appear on the bus, in a process of its own.

The benchmark's main process hosts 100 simulated sites; stamping there would measure its own event loop's
backlog. `Observer.start` runs this file as `python bench_observer.py NATS_URL`: it prints `ready`, then one
JSON line per message (also each LeaderboardUpdated's size and each consumer advisory); it exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import nats

from service_kit.connection import servers

JOB_SCHEDULED = "assay.v1.evt.job.scheduled.*"  # every kind of job: check and evaluation
RESULT_ACCEPTED = "assay.v1.evt.result.accepted"
SITE_RESULTS = "assay.v1.results.*"
BOARD_UPDATED = "assay.v1.evt.leaderboard.updated"
ADVISORIES = "$JS.EVENT.ADVISORY.CONSUMER.>"


def _job(kind: str, data: dict) -> dict:  # type: ignore[type-arg]
    return data["job"] if kind == "scheduled" else data


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def observe(nats_url: str) -> None:
    nc = await nats.connect(servers(nats_url), max_reconnect_attempts=3)
    out = sys.stdout

    def stamp(kind: str):  # type: ignore[no-untyped-def]
        async def on_message(msg) -> None:  # type: ignore[no-untyped-def]
            mono = time.monotonic()
            envelope = json.loads(msg.data)
            job = _job(kind, envelope["data"])
            line = {"kind": kind, "job_id": job["job_id"], "model_id": job["binding"]["model_id"], "mono": mono,
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
        mono, data = time.monotonic(), json.loads(msg.data)["data"]
        out.write(json.dumps({"kind": "board", "bytes": len(msg.data), "mono": mono, "model_id": data["model_id"],
                              "sites": data["sites"]}) + "\n")
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


# --- the parent's side --------------------------------------------------------------------------------------------


@dataclass
class Observer:
    """The stamping subprocess and what it reported."""

    proc: asyncio.subprocess.Process
    stamps: dict[str, dict[str, dict[str, float]]] = field(default_factory=lambda: defaultdict(dict))
    model_of: dict[str, str] = field(default_factory=dict)
    advisories: Counter[tuple[str, str]] = field(default_factory=Counter)
    accepted_by_model: Counter[str] = field(default_factory=Counter)
    board_bytes: list[int] = field(default_factory=list)
    boards: list[dict[str, Any]] = field(default_factory=list)  # each LeaderboardUpdated: when, model, sites
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, nats_url: str) -> Observer:
        proc = await asyncio.create_subprocess_exec(sys.executable, str(Path(__file__).resolve()), nats_url,
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        observer = cls(proc)
        # what it stamps between its subscriptions and its `ready` (the datasets' checks of workers already up) comes
        # first: it is taken as any later line
        while (line := await asyncio.wait_for(proc.stdout.readline(), 30)).strip() != b"ready":
            if not line.startswith(b"{"):
                raise RuntimeError(f"the observer did not start: {line!r}")
            observer._take(line)
        observer.reader = asyncio.create_task(observer._read())
        return observer

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self._take(raw)

    def _take(self, raw: bytes) -> None:
        line = json.loads(raw)
        if line["kind"] == "board":
            self.board_bytes.append(line["bytes"])
            self.boards.append(line)
            self.changed.set()
            return
        if line["kind"] == "advisory":
            self.advisories[(line["type"], line["consumer"])] += 1
            return
        job = line["job_id"]
        self.model_of[job] = line["model_id"]
        if line["kind"] not in self.stamps[job]:  # the first sighting counts; a resend does not move it
            self.stamps[job][line["kind"]] = {"mono": line["mono"], "sent": line["sent"]}
            if line["kind"] == "accepted":
                self.accepted_by_model[line["model_id"]] += 1
        self.changed.set()

    async def wait_accepted(self, models: list[str], expected: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(self.accepted_by_model[x] for x in models) < expected:
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                got = sum(self.accepted_by_model[x] for x in models)
                raise TimeoutError(f"only {got} of {expected} results accepted after {timeout_s:.0f} s")
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass

    async def wait_board(self, models: list[str], sites: int, timeout_s: float) -> float:
        """When the first LeaderboardUpdated came by which each of `models` was announced with `sites` sites."""
        deadline = time.monotonic() + timeout_s
        while True:
            done: set[str] = set()
            for board in self.boards:
                if board["model_id"] in models and board["sites"] == sites:
                    done.add(board["model_id"])
                    if len(done) == len(set(models)):
                        return float(board["mono"])
            self.changed.clear()
            if (left := deadline - time.monotonic()) <= 0:
                raise TimeoutError(f"{len(done)} of {len(set(models))} models announced with {sites} sites")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await asyncio.wait_for(self.proc.wait(), 15)
        if self.reader is not None:
            await self.reader


if __name__ == "__main__":
    asyncio.run(observe(sys.argv[1]))
