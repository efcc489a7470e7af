"""The simulated sites' workers in a few processes of their own, so that no one event loop carries 1,000 of them.

`SiteHosts.start` runs this file as `python bench_hosts.py`, one process per share of the sites `make_sites` made,
and writes it one JSON line on stdin: the home folder, the NATS URL and its sites' ids (their keys, datasets and
policies are on disk). Each child makes a real `site_worker.main.create_app` app per site (its own NATS connection
and durable pull consumer) with one shared `NoopRunner`, starts them, prints `{"ready": seconds}`, then one JSON line
each time its runner starts a job's model step; it stops its workers and exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script: the sibling modules live here
    sys.path.insert(0, str(HERE))

from assay.home import Home  # noqa: E402
from bench_sites import NoopRunner, site_settings  # noqa: E402
from site_worker.containers import RunOutcome, RunSpec  # noqa: E402

# One process hosts up to this many workers: 100 sites (bench_flow's size) in one, 1,000 in four. Every idle worker
# pulls its queue once a second, beats every 10 s and looks for the data owner's decisions every second, so 1,000 in
# one event loop would queue behind each other and time the loop, not the platform; four loops on two cores leave
# the sharing to the kernel, which shares them with the services too.
SITES_PER_PROCESS = 250
THREADS_PER_PROCESS = 32  # the workers of a process share a pool for their file work (one worker alone has 6 here)
# workers connecting and making their durable consumers at the same time, per process. With 50, a busy loop (the
# workers already up run their datasets' checks) answered the server too late for about 4 in 10 of 1,000 workers'
# first connections ('Authentication Timeout', 'Connection lost'; service_kit.connection made them again); with 10,
# about 4 in 100, but the 1,000 take about 100 s to start where they took 50-60
STARTS_AT_ONCE = 10
READY_TIMEOUT_S = 600.0


class StampingRunner(NoopRunner):
    """The NoopRunner, telling the parent each time a job's model step starts (its first start's stamp:
    time.monotonic() is the system's clock on Linux, so it compares with the observer's stamps)."""

    def __init__(self) -> None:
        super().__init__()
        self._out = threading.Lock()
        self._held: list[dict[str, Any]] | None = []  # until the `ready`

    def run(self, spec: RunSpec) -> RunOutcome:
        outcome = super().run(spec)
        if spec.task == "infer":
            job = spec.env["ASSAY_JOB_ID"]
            self.say({"job": job, "mono": self.started[job]})
        return outcome

    def say(self, line: dict[str, Any]) -> None:
        """One line to the parent, whole (jobs run in worker threads, beside the event loop's thread). The `ready`
        comes first: a worker that started early may run a dataset's check while the others still connect, and its
        stamps wait until then."""
        with self._out:
            if self._held is not None and "ready" not in line:
                self._held.append(line)
                return
            for one in [line, *(self._held or [])]:
                sys.stdout.write(json.dumps(one) + "\n")
            self._held = None
            sys.stdout.flush()


def more_files() -> None:
    """A worker holds a socket and its files: raise this process's soft limit of open files to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def host(order: dict[str, Any]) -> None:
    from site_worker.main import create_app

    more_files()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    home = Home(Path(order["home"]))
    scheduler_key = home.public_key("scheduling")
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=THREADS_PER_PROCESS))
    runner = StampingRunner()
    apps = [create_app(site_settings(home, site_id, order["nats_url"], scheduler_key), runner)
            for site_id in order["sites"]]
    gate = asyncio.Semaphore(STARTS_AT_ONCE)

    async def start(app: Any) -> None:
        async with gate:
            await app.start()

    began = time.perf_counter()
    try:
        await asyncio.gather(*(start(app) for app in apps))
        runner.say({"ready": time.perf_counter() - began})
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    finally:
        await asyncio.gather(*(app.stop() for app in apps), return_exceptions=True)


# --- the parent's side --------------------------------------------------------------------------------------------


@dataclass
class SiteHosts:
    """The host processes and what their runners reported, merged: `runner.started` (the first start of each job)
    and `runner.runs` (how often each was started: more than once is a redelivery), as bench_flow reads them."""

    procs: list[asyncio.subprocess.Process]
    runner: NoopRunner = field(default_factory=NoopRunner)
    start_s: float = 0.0  # until the last process had all its workers started
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, home: Home, nats_url: str, site_ids: list[str]) -> SiteHosts:
        count = max(1, math.ceil(len(site_ids) / SITES_PER_PROCESS))
        shares = [site_ids[n::count] for n in range(count)]
        began = time.perf_counter()
        procs = []
        for n, share in enumerate(shares, 1):
            log = (home.logs / f"bench-sites-{n}.log").open("ab")  # the workers' own log lines, for scan_logs
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log, limit=2**20))
            log.close()
            assert procs[-1].stdin is not None
            procs[-1].stdin.write(json.dumps({"home": str(home.root), "nats_url": nats_url, "sites": share}).encode()
                                  + b"\n")
            await procs[-1].stdin.drain()
        hosts = cls(procs)
        ready = [asyncio.get_running_loop().create_future() for _ in procs]
        hosts.readers = [asyncio.create_task(hosts._read(proc, up)) for proc, up in zip(procs, ready, strict=True)]
        try:
            await asyncio.wait_for(asyncio.gather(*ready), READY_TIMEOUT_S)
        except BaseException:
            await hosts.stop()
            raise
        hosts.start_s = time.perf_counter() - began
        return hosts

    async def _read(self, proc: asyncio.subprocess.Process, ready: asyncio.Future[None]) -> None:
        """The child's lines: its `ready`, then the stamps."""
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = json.loads(raw)
            if "ready" in line:
                ready.set_result(None)
                continue
            self.runner.started.setdefault(line["job"], line["mono"])
            self.runner.runs[line["job"]] += 1
        if not ready.done():
            ready.set_exception(RuntimeError(f"a site host exited before its workers were up (exit "
                                             f"{await proc.wait()}): see bench-sites-*.log"))

    def pids(self) -> dict[str, int]:
        return {f"sites-{n}": proc.pid for n, proc in enumerate(self.procs, 1)}

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await asyncio.gather(*self.readers, return_exceptions=True)


def main() -> None:
    asyncio.run(host(json.loads(sys.stdin.readline())))


if __name__ == "__main__":
    main()
