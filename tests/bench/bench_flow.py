"""Throughput and latency of the whole job flow through the real services and a real nats-server.

The platform (nats-server and the four services, each its own process) is started by `assay.platform.Platform`.
This process plays every actor with signed commands and hosts the simulated sites (bench_sites); a separate
process stamps the events (bench_observer). The baseline is raw nats-py JetStream publish-and-consume on the same
server, measured in the same run.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nats
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import ServiceUnavailableError

from assay.home import Home
from assay.platform import Platform
from bench_bus import bus_counts, per_job, wait_quiet
from bench_ingest import ingest
from bench_load import sweep
from bench_observer import Observer
from bench_sites import NoopRunner, approve_models, make_sites, setup
from service_kit.connection import servers
from site_worker.main import create_app

RAW_BODY_BYTES = 1024  # about the size of a signed job envelope
SITE_THREADS = 32  # the threads the simulated sites share for their file work (one worker alone has min(32, cpus + 4))
RAW_ROUND_TRIPS = 100
ROUND_TIMEOUT_S = 180.0

Log = Callable[[str], None]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


# --- the baseline: raw JetStream -----------------------------------------------------------------------------------


async def raw_jetstream(nats_url: str, messages: int, rep: int, replicas: int = 1) -> dict[str, float]:
    """Publish `messages` with Nats-Msg-Id (awaiting each ack), then consume them with a durable pull consumer,
    acking each: the bare cost of one message through the server the platform uses (on a cluster, a stream kept on
    `replicas` servers, as the platform's are). Then the latency of one message: publish it to a consumer already
    waiting for it, until it is delivered and acked."""
    nc = await nats.connect(servers(nats_url))
    js = nc.jetstream()
    stream, subject = f"BENCH_RAW_{rep}", f"bench.raw{rep}.job"
    try:
        await js.add_stream(StreamConfig(name=stream, subjects=[f"bench.raw{rep}.>"], storage=StorageType.FILE,
                                         duplicate_window=120.0, num_replicas=replicas))
        body = os.urandom(RAW_BODY_BYTES // 2).hex().encode()
        start = time.perf_counter()
        for i in range(messages):
            await js.publish(subject, body, headers={"Nats-Msg-Id": f"raw-{rep}-{i}"})
        published = time.perf_counter()
        sub = await js.pull_subscribe(subject, durable=f"bench-raw-{rep}", stream=stream)
        consumed, deadline = 0, time.monotonic() + 10
        while consumed < messages:
            try:
                fetched = await sub.fetch(batch=16, timeout=10)
            except ServiceUnavailableError:  # on a cluster, a new consumer answers once its leader is elected
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
                continue
            for msg in fetched:
                await msg.ack()
                consumed += 1
        done = time.perf_counter()
        trips = []
        for i in range(RAW_ROUND_TRIPS):
            began = time.perf_counter()
            waiting = asyncio.create_task(sub.fetch(batch=1, timeout=10))
            await js.publish(subject, body, headers={"Nats-Msg-Id": f"raw-{rep}-trip-{i}"})
            for msg in await waiting:
                await msg.ack()
            trips.append(time.perf_counter() - began)
        return {"msgs_per_s": messages / (done - start), "publish_per_s": messages / (published - start),
                "consume_per_s": messages / (done - published), "round_trip_p50_s": statistics.median(trips),
                "round_trip_p99_s": percentile(trips, 99)}
    finally:
        await js.delete_stream(stream)
        await nc.close()


async def raw_baseline(nats_url: str, messages: int, reps: int, replicas: int = 1) -> dict[str, Any]:
    runs = [await raw_jetstream(nats_url, messages, rep, replicas) for rep in range(reps)]
    medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return medians | {"messages": messages, "reps": reps, "all_msgs_per_s": [round(r["msgs_per_s"], 1) for r in runs]}


# --- the rounds ----------------------------------------------------------------------------------------------------


def summarise_round(observer: Observer, runner: NoopRunner, models: list[str], trigger: float) -> dict[str, Any]:
    """One round's numbers, from the observer's stamps and the runner's start stamps (one monotonic clock)."""
    jobs = [j for j, model in observer.model_of.items() if model in models]
    st = {j: observer.stamps[j] for j in jobs}
    first_scheduled = min(s["scheduled"]["mono"] for s in st.values())
    last_accepted = max(s["accepted"]["mono"] for s in st.values())
    latency = [s["accepted"]["mono"] - s["scheduled"]["mono"] for s in st.values()]
    envelope_latency = [s["accepted"]["sent"] - s["scheduled"]["sent"] for s in st.values()]
    started = {j: runner.started[j] for j in jobs if j in runner.started}
    to_site = [t - st[j]["scheduled"]["mono"] for j, t in started.items()]
    at_site = [st[j]["result"]["mono"] - t for j, t in started.items() if "result" in st[j]]
    to_board = [s["accepted"]["mono"] - s["result"]["mono"] for s in st.values() if "result" in s]
    return {
        "jobs": len(jobs), "jobs_per_s": len(jobs) / (last_accepted - first_scheduled),
        "planning_s": first_scheduled - trigger, "makespan_s": last_accepted - first_scheduled,
        "latency_p50_s": statistics.median(latency), "latency_p99_s": percentile(latency, 99),
        "latency_max_s": max(latency), "envelope_latency_p50_s": statistics.median(envelope_latency),
        "stage_p50_s": {"scheduled_to_site_start": statistics.median(to_site),
                        "site_start_to_result": statistics.median(at_site),
                        "result_to_accepted": statistics.median(to_board)},
    }


async def run_rounds(platform: Platform, observer: Observer, runner: NoopRunner, model_rounds: list[list[str]],
                     sites: int, log: Log, more_pids: dict[str, int] | None = None) -> dict[str, Any]:
    """Approve each round's models at once and wait until all their jobs' results are accepted; `more_pids`: other
    processes whose CPU counts too (bench_hosts' site processes)."""
    pids = {name: proc.pid for name, proc in platform.procs.items()} | {"bench": os.getpid(),
                                                                       "observer": observer.proc.pid}
    pids |= more_pids or {}
    cpu_before, window = cpu_of(pids), time.monotonic()
    per_round = []
    for number, models in enumerate(model_rounds, 1):
        trigger = time.monotonic()
        await approve_models(platform.nats_url, platform.home, models)
        await observer.wait_accepted(models, len(models) * sites, timeout_s=ROUND_TIMEOUT_S)
        per_round.append(summarise_round(observer, runner, models, trigger))
        x = per_round[-1]
        log(f"round {number}: {x['jobs']} jobs, {x['jobs_per_s']:.1f} jobs/s, "
            f"p50 {x['latency_p50_s'] * 1000:.0f} ms, p99 {x['latency_p99_s'] * 1000:.0f} ms")
    cpu_after, window = cpu_of(pids), time.monotonic() - window
    jobs = sum(r["jobs"] for r in per_round)
    return {
        "rounds_detail": per_round, "jobs": jobs,
        "jobs_per_s": statistics.median(r["jobs_per_s"] for r in per_round),
        "latency_p50_s": statistics.median(r["latency_p50_s"] for r in per_round),
        "latency_p99_s": statistics.median(r["latency_p99_s"] for r in per_round),
        "stage_p50_s": {k: statistics.median(r["stage_p50_s"][k] for r in per_round)
                        for k in per_round[0]["stage_p50_s"]},
        "jobs_run_again": sum(1 for n in runner.runs.values() if n > 1),
        "cpu_s_per_job": {n: round((cpu_after[n] - cpu_before[n]) / jobs, 4) for n in pids},
        "cpu_cores_busy": {n: round((cpu_after[n] - cpu_before[n]) / window, 2) for n in pids},
    }


# --- health: what went wrong on the way ----------------------------------------------------------------------------


async def stream_messages(nats_url: str, stream: str) -> int:
    nc = await nats.connect(servers(nats_url))
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


def scan_logs(home: Home) -> dict[str, int]:
    needles = {"database is locked": "database_locked", "dead-lettering": "dead_lettered",
               "outbox relay could not publish": "relay_publish_failed", "Traceback": "tracebacks",
               "went on without lock": "relay_did_not_wait",  # replicas: a relay waited for another's in vain
               " ERROR ": "error_lines"}
    found = dict.fromkeys(needles.values(), 0)
    for path in home.logs.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            for needle, name in needles.items():
                found[name] += needle in line
    return found


async def health(platform: Platform, observer: Observer, board: list[int],
                 seen: Counter[tuple[str, str]]) -> dict[str, Any]:
    """`board`: the sizes of the LeaderboardUpdated events of the rounds; `seen`: the consumer advisories of the
    rounds."""
    advisories: Counter[str] = Counter()
    for (kind, consumer), n in seen.items():
        advisories[f"{kind} {'site-*' if consumer.startswith('site-') else consumer}"] += n
    return {
        "advisories": dict(sorted(advisories.items())),
        "dead_letters": await stream_messages(platform.nats_url, "DEAD_LETTERS"),
        "leaderboard_updated": {"events": len(board), "max_bytes": max(board, default=0),
                                "total_bytes": sum(board)},
        "logs": scan_logs(platform.home),
    }


# --- the whole of (a) ----------------------------------------------------------------------------------------------


STOP_S = 60.0


async def stop_all(apps: Sequence[Any]) -> None:
    """Stop the simulated sites' apps; if some do not stop within STOP_S, print what every task awaits, and go on."""
    stopping = asyncio.gather(*(app.stop() for app in apps), return_exceptions=True)
    try:
        await asyncio.wait_for(asyncio.shield(stopping), STOP_S)
    except TimeoutError:
        print(f"the sites' apps did not stop within {STOP_S:.0f} s; the tasks left:", file=sys.stderr)
        for task in asyncio.all_tasks():
            task.print_stack(limit=12, file=sys.stderr)


async def flow(platform: Platform, sites_count: int, rounds: int, models_per_round: int, raw_messages: int,
               raw_reps: int, idle_s: float, log: Log, *, load_fractions: Sequence[float] = (),
               load_s: float = 5.0, ingest_results: int = 0) -> dict[str, Any]:
    """(a); then, where asked, the latency at `load_fractions` of the rounds' maximum rate (`bench_load`) and the
    ingest of `ingest_results` results waiting in the stream (`bench_ingest`)."""
    url = platform.nats_url
    result: dict[str, Any] = {"sites": sites_count, "rounds": rounds, "models_per_round": models_per_round}
    pids = {name: proc.pid for name, proc in platform.procs.items()}
    before = cpu_of(pids)
    await asyncio.sleep(idle_s)
    after = cpu_of(pids)
    result["idle_cpu_cores"] = {n: round((after[n] - before[n]) / idle_s, 3) for n in pids}
    log(f"idle CPU of each process (cores): {result['idle_cpu_cores']}")

    result["raw"] = await raw_baseline(url, raw_messages, raw_reps, platform.stream_replicas)
    log(f"raw JetStream: {result['raw']['msgs_per_s']:.0f} msgs/s (median of {raw_reps})")

    sites = make_sites(platform.home, sites_count, url)
    model_rounds = [[f"model-r{r}-{i}" for i in range(models_per_round)] for r in range(rounds)]
    result["setup"] = await setup(url, platform.home, sites, [x for group in model_rounds for x in group])
    log(f"setup: {result['setup']['commands']:.0f} signed commands in {result['setup']['commands_s']:.1f} s")

    runner = NoopRunner()
    # each site worker is a process of its own, with its own threads for its files (the audit log, the review
    # store): the simulated sites share this process, so they share a pool sized for all of them, not for one
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=SITE_THREADS))
    apps = [create_app(site.settings, runner) for site in sites]
    start = time.perf_counter()
    observer: Observer | None = None
    boards_in_rounds: list[int] = []
    advised: Counter[tuple[str, str]] = Counter()
    try:
        await asyncio.gather(*(app.start() for app in apps))
        result["workers_start_s"] = time.perf_counter() - start
        observer = await Observer.start(url)
        result["checks_s"] = await wait_quiet(url)  # the datasets' checks waited in the queues for the workers
        counted = await bus_counts(url)
        result |= await run_rounds(platform, observer, runner, model_rounds, sites_count, log)
        await wait_quiet(url)  # the stream has stored what the observer saw, and every consumer has taken it
        result["per_job"] = per_job(counted, await bus_counts(url), result["jobs"])
        boards_in_rounds, advised = list(observer.board_bytes), Counter(observer.advisories)
        log(f"per job: {result['per_job']['writes']} JetStream writes, {result['per_job']['deliveries']} deliveries")
        if load_fractions:
            result["load"] = await sweep(url, platform.home, observer, sites, result["jobs_per_s"],
                                         list(load_fractions), load_s, log)
        if ingest_results:
            result["ingest"] = await ingest(platform, observer, sites, ingest_results)
            log(f"ingest: {result['ingest']['results']} results waiting, accepted at "
                f"{result['ingest']['results_per_s']:.0f}/s, ranked at {result['ingest']['ranked_per_s']:.0f}/s")
    finally:
        await stop_all(apps)
        if observer is not None:
            await observer.stop()
    result["ratio_jobs_to_raw_msgs"] = result["jobs_per_s"] / result["raw"]["msgs_per_s"]
    result["ratio_latency_p50_to_raw_trip"] = result["latency_p50_s"] / result["raw"]["round_trip_p50_s"]
    result["ratio_latency_p99_to_raw_trip"] = result["latency_p99_s"] / result["raw"]["round_trip_p99_s"]
    result |= await health(platform, observer, boards_in_rounds, advised)
    return result
