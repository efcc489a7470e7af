"""How cost grows with the federation: jobs/s, latency, idle CPU, memory and the backlog at 10, 100 and 1,000 sites.

For each size, a fresh platform (`assay.platform.Platform`, as bench.py starts one), bench_sites' setup, and that
many real site workers in bench_hosts' processes; then the idle CPU of every process with all the workers connected
and nothing to do, bench_flow's rounds (one model approved per round: one job per site), and a steady load: every
site also holds a dataset in one of a few group benchmarks of `GROUP_SITES` sites, and models are approved in turn for
each group at the interval that offers `LOAD_FRACTION` of the rounds' jobs/s, while the backlog (what the sites' and
the services' durable consumers have pending or unacked) is sampled every `SAMPLE_S`.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats

from assay.client import request, signed
from assay.home import Home
from assay.platform import Platform
from bench_bus import wait_quiet
from bench_flow import cpu_of, percentile, run_rounds, scan_logs
from bench_hosts import SITES_PER_PROCESS, SiteHosts
from bench_observer import Observer
from bench_sites import CASES, METRICS, OPERATOR, OWNER, VENDOR, Site, bounded, image, make_sites, setup
from contracts import messages as m
from contracts.catalog import REQUEST_SUBJECTS
from contracts.signing import KeyPair
from service_kit.connection import servers

GROUP_SITES = 25  # the sites of each steady-load benchmark: one approval there is this many jobs, about a second's
# worth at half the rate the rounds reach, so the load arrives as a stream of small bursts over every site in turn
GROUP_BENCHMARK = "bench-steady"  # and -0, -1, ...
LOAD_FRACTION = 0.5
SAMPLE_S = 0.5
QUIET_TIMEOUT_S = 900.0  # the datasets' checks of 1,000 sites (two each) run when their workers start
DRAIN_TIMEOUT_S = 180.0

Log = Callable[[str], None]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def setup_groups(nats_url: str, home: Home, sites: list[Site], in_flight: int) -> list[str]:
    """The steady load's benchmarks, each with a second dataset (the same prepared data) at `GROUP_SITES` sites."""
    keys = {name: home.key(name) for name in (OPERATOR, OWNER)}
    groups = [sites[n:n + GROUP_SITES] for n in range(0, len(sites), GROUP_SITES)]
    names = [f"{GROUP_BENCHMARK}-{n}" for n in range(len(groups))]

    async def send(payload: m.Payload, actor: str, key: KeyPair) -> None:
        await request(nats_url, payload, actor=actor, key=key, patience_s=60)

    async def make(benchmark: str) -> None:
        spec = m.BenchmarkSpec(benchmark_id=benchmark, name="steady", metrics=METRICS, primary_metric="auc",
                               preparator=image("bench/preparator"), reference_model=image("bench/reference"),
                               evaluator=image("bench/evaluator"))
        await send(m.RegisterBenchmark(benchmark=spec), OWNER, keys[OWNER])
        await send(m.ApproveBenchmark(benchmark_id=benchmark), OPERATOR, keys[OPERATOR])

    async def join(site: Site, benchmark: str) -> None:
        dataset_id = f"{site.site_id}-steady"
        datasets = json.loads(site.settings.datasets_file.read_text())
        datasets[dataset_id] = datasets[site.dataset_id]
        site.settings.datasets_file.write_text(json.dumps(datasets))
        await send(m.RegisterDataset(dataset_id=dataset_id, benchmark_id=benchmark, name=dataset_id,
                                     content_hash=site.content_hash, case_count=CASES, statistics={"cases": CASES},
                                     preparator_digest=image("bench/preparator").digest), site.site_id, site.key)
        await send(m.RequestAssociation(benchmark_id=benchmark, kind=m.EntityKind.DATASET, entity_id=dataset_id),
                   site.site_id, site.key)
        await send(m.ApproveAssociation(benchmark_id=benchmark, kind=m.EntityKind.DATASET, entity_id=dataset_id),
                   OWNER, keys[OWNER])

    await bounded([make(x) for x in names], in_flight)
    await bounded([join(site, names[n // GROUP_SITES]) for n, site in enumerate(sites)], in_flight)
    return names


async def ask_models(nats_url: str, home: Home, models: dict[str, str], in_flight: int) -> None:
    """Each model (id -> its group benchmark) registered and asked for, not yet approved."""
    key = home.key(VENDOR)

    async def ask(model: str, benchmark: str) -> None:
        await request(nats_url, m.RegisterModel(model_id=model, name=model, image=image(f"bench/{model}")),
                      actor=VENDOR, key=key, patience_s=60)
        await request(nats_url, m.RequestAssociation(benchmark_id=benchmark, kind=m.EntityKind.MODEL,
                                                     entity_id=model), actor=VENDOR, key=key, patience_s=60)

    await bounded([ask(x, b) for x, b in models.items()], in_flight)


async def pending(js: Any, stream: str) -> int:
    """What the durable consumers of `stream` have pending or delivered and unacked, all pages of them."""
    total, offset = 0, 0
    while True:
        page = await js.consumers_info(stream, offset=offset)
        total += sum(c.num_pending + c.num_ack_pending for c in page)
        if len(page) < 256:
            return total
        offset += len(page)


async def sample_backlog(nats_url: str, samples: list[dict[str, float]], stop: asyncio.Event) -> None:
    """Every `SAMPLE_S` until `stop`: the sites' consumers (JOBS) and the services' (EVENTS, RESULTS)."""
    nc = await nats.connect(servers(nats_url))
    js = nc.jetstream()
    try:
        while not stop.is_set():
            at = time.monotonic()
            jobs, events, results = [await pending(js, s) for s in ("JOBS", "EVENTS", "RESULTS")]
            samples.append({"mono": at, "jobs": jobs, "events": events, "results": results,
                            "total": jobs + events + results, "took_s": time.monotonic() - at})
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, at + SAMPLE_S - time.monotonic()))
            except TimeoutError:
                pass
    finally:
        await nc.close()


async def steady(nats_url: str, home: Home, observer: Observer, groups: list[str], group_sizes: list[int],
                 rate: float, seconds: float, in_flight: int) -> dict[str, Any]:
    """Approve a model for each group in turn, one every (a group's jobs / `rate`) seconds, for `seconds`; sample
    the backlog meanwhile and until every job of the load is accepted."""
    interval = statistics.mean(group_sizes) / rate
    approvals = max(1, math.ceil(seconds / interval))
    models = {f"steady-{n}": groups[n % len(groups)] for n in range(approvals)}
    await ask_models(nats_url, home, models, in_flight)
    await wait_quiet(nats_url)
    expected = sum(group_sizes[n % len(groups)] for n in range(approvals))
    key, samples, stop = home.key(OWNER), [], asyncio.Event()
    sampler = asyncio.create_task(sample_backlog(nats_url, samples, stop))
    nc = await nats.connect(servers(nats_url))
    try:
        async def approve(model: str, benchmark: str) -> None:
            command = m.ApproveAssociation(benchmark_id=benchmark, kind=m.EntityKind.MODEL, entity_id=model)
            reply = json.loads((await nc.request(REQUEST_SUBJECTS[m.ApproveAssociation],
                                                 signed(command, OWNER, key), timeout=30)).data)
            if not reply.get("ok"):
                raise RuntimeError(f"the approval of {model} was refused: {reply}")

        began, sent = time.monotonic(), []
        for n, (model, benchmark) in enumerate(models.items()):
            await asyncio.sleep(max(0.0, began + n * interval - time.monotonic()))
            sent.append(asyncio.create_task(approve(model, benchmark)))
        await asyncio.gather(*sent)
        ended = began + approvals * interval  # the load's last interval ends here
        await asyncio.sleep(max(0.0, ended - time.monotonic()))
        await observer.wait_accepted(list(models), expected, timeout_s=DRAIN_TIMEOUT_S)
        accepted = time.monotonic()
        while not samples or samples[-1]["mono"] < accepted or samples[-1]["total"]:  # until a look sees it empty
            if time.monotonic() - accepted > DRAIN_TIMEOUT_S:
                break
            await asyncio.sleep(SAMPLE_S / 2)
    finally:
        stop.set()
        await sampler
        await nc.close()
    during = [s for s in samples if began <= s["mono"] <= ended]
    slope = statistics.linear_regression([s["mono"] - began for s in during], [s["total"] for s in during]).slope \
        if len(during) >= 2 else 0.0
    after = [s for s in samples if s["mono"] > ended]
    empty = next((s["mono"] - ended for s in after if not s["total"]), None)
    stamps = [observer.stamps[job] for job, model in observer.model_of.items() if model in models]
    latency = [s["accepted"]["mono"] - s["scheduled"]["mono"] for s in stamps]
    return {
        "offered_jobs_per_s": rate, "seconds": approvals * interval, "approvals": approvals, "jobs": expected,
        "interval_s": interval, "achieved_jobs_per_s": len(latency) / (max(s["accepted"]["mono"] for s in stamps)
                                                                       - min(s["scheduled"]["mono"] for s in stamps)),
        "latency_p50_s": statistics.median(latency), "latency_p99_s": percentile(latency, 99),
        "backlog_max": max((s["total"] for s in during), default=0),
        "backlog_max_jobs": max((s["jobs"] for s in during), default=0),
        "backlog_slope_per_s": slope, "backlog_at_end": during[-1]["total"] if during else 0,
        "empty_after_end_s": empty, "samples": len(during),
        "sample_took_s_p50": statistics.median(s["took_s"] for s in samples),
        "backlog": [[round(s["mono"] - began, 2), s["jobs"], s["events"], s["results"]] for s in samples],
    }


async def one_size(platform: Platform, sites_count: int, rounds: int, idle_s: float, load_s: float, in_flight: int,
                   log: Log) -> dict[str, Any]:
    url, home = platform.nats_url, platform.home
    result: dict[str, Any] = {"sites": sites_count, "in_flight": in_flight}
    sites = make_sites(home, sites_count, url)
    model_rounds = [[f"model-r{r}-0"] for r in range(rounds)]
    result["setup"] = await setup(url, home, sites, [x for group in model_rounds for x in group], in_flight)
    began = time.perf_counter()
    groups = await setup_groups(url, home, sites, in_flight)
    result["setup"]["groups_s"] = time.perf_counter() - began
    result["setup"]["group_commands"] = 2 * len(groups) + 3 * sites_count
    log(f"{sites_count} sites: setup {result['setup']['commands']:.0f} signed commands in "
        f"{result['setup']['commands_s']:.1f} s ({result['setup']['commands'] / result['setup']['commands_s']:.0f}/s, "
        f"{in_flight} in flight), {len(groups)} steady-load benchmarks in {result['setup']['groups_s']:.1f} s")
    hosts = await SiteHosts.start(home, url, [s.site_id for s in sites])
    observer: Observer | None = None
    try:
        result["processes"], result["workers_start_s"] = len(hosts.procs), hosts.start_s
        observer = await Observer.start(url)
        result["checks_s"] = await wait_quiet(url, QUIET_TIMEOUT_S)  # two datasets' checks per site
        log(f"{sites_count} workers in {len(hosts.procs)} processes, started in {hosts.start_s:.1f} s; their "
            f"datasets checked {result['checks_s']:.1f} s later")
        pids = {n: p.pid for n, p in platform.procs.items()} | hosts.pids() | {"observer": observer.proc.pid}
        before = cpu_of(pids)
        await asyncio.sleep(idle_s)
        after = cpu_of(pids)
        result["idle_cpu_cores"] = {n: round((after[n] - before[n]) / idle_s, 3) for n in pids}
        log(f"idle CPU (cores), every worker connected: {result['idle_cpu_cores']}")
        result["rounds"] = await run_rounds(platform, observer, hosts.runner, model_rounds, sites_count, log,
                                            more_pids=hosts.pids())
        rate = LOAD_FRACTION * result["rounds"]["jobs_per_s"]
        sizes = [min(GROUP_SITES, sites_count - n) for n in range(0, sites_count, GROUP_SITES)]
        result["steady"] = await steady(url, home, observer, groups, sizes, rate, load_s, in_flight)
        s = result["steady"]
        empty = "not empty" if s["empty_after_end_s"] is None else f"empty {s['empty_after_end_s']:.1f} s after"
        log(f"steady load {rate:.1f} jobs/s for {s['seconds']:.0f} s ({s['approvals']} approvals of "
            f"{s['jobs'] / s['approvals']:.0f} jobs): p50 {s['latency_p50_s'] * 1000:.0f} ms, p99 "
            f"{s['latency_p99_s'] * 1000:.0f} ms; backlog max {s['backlog_max']}, slope "
            f"{s['backlog_slope_per_s']:+.2f}/s, {s['backlog_at_end']} at the end, {empty}")
        result["rss_mib"] = {n: rss_mib(pid) for n, pid in pids.items()}
        result["jobs_run_again"] = sum(1 for n in hosts.runner.runs.values() if n > 1)
    finally:
        await hosts.stop()
        if observer is not None:
            await observer.stop()
    result["logs"] = scan_logs(home)
    return result


def measure(sizes: list[int], rounds: int, idle_s: float, load_s: float, in_flight: int, keep: bool,
            log: Log) -> dict[str, Any]:
    """Each size on a platform of its own, in a home folder of its own (kept with `keep`, or when it failed)."""
    out, began = [], time.perf_counter()
    for count in sizes:
        home = Home(Path(tempfile.mkdtemp(prefix=f"assay-scale-{count}-")))
        for name in (OPERATOR, OWNER, VENDOR):
            KeyPair.generate().save(home.key_file(name))
        platform = Platform(home)
        ok = False
        try:
            platform.start()
            out.append(asyncio.run(one_size(platform, count, rounds, idle_s, load_s, in_flight, log)))
            ok = True
        finally:
            platform.stop()
            if keep or not ok:
                log(f"platform home kept in {home.root} (logs in {home.logs})")
            else:
                shutil.rmtree(home.root, ignore_errors=True)
    return {"sizes": out, "rounds": rounds, "idle_s": idle_s, "load_s": load_s, "load_fraction": LOAD_FRACTION,
            "group_sites": GROUP_SITES, "sample_s": SAMPLE_S, "sites_per_process": SITES_PER_PROCESS,
            "wall_s": time.perf_counter() - began}
