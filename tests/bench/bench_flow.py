"""Throughput and latency of the whole job flow through the real services and a real nats-server.

The platform (nats-server and the four services, each its own process) is started by `assay.platform.Platform`.
This process plays every actor with signed commands, and hosts the simulated sites: real site-worker apps
(`site_worker.main.create_app`) whose container runner does nothing but write a valid evaluator output.
The baseline is raw nats-py JetStream publish-and-consume on the same server, measured in the same run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.js.api import StorageType, StreamConfig

from assay.client import request
from assay.home import Home
from assay.platform import Platform
from contracts import messages as m
from contracts.envelope import Payload
from contracts.signing import KeyPair
from site_worker.config import Settings as SiteSettings
from site_worker.containers import RunOutcome, RunSpec
from site_worker.datasets import content_hash
from site_worker.main import create_app

OBSERVER = Path(__file__).with_name("bench_observer.py")
BENCHMARK = "bench-throughput"
OPERATOR, OWNER, VENDOR = "operator", "committee", "vendor"
METRICS = (m.MetricSpec(name="auc"), m.MetricSpec(name="accuracy"))
CASES = 4
RAW_BODY_BYTES = 1024  # about the size of a signed job envelope
RAW_ROUND_TRIPS = 100


def fake_digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


# --- the simulated site: a runner that runs nothing ---------------------------------------------------------------


class NoopRunner:
    """A ContainerRunner that runs no container: `evaluate` writes a valid metrics.json and cases.jsonl, `infer`
    nothing. It stamps when each job's model step starts, to split the latency into its stages."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self._lock = threading.Lock()

    def image_id(self, ref: str) -> str | None:
        return ref

    def run(self, spec: RunSpec) -> RunOutcome:
        if spec.task == "infer":
            with self._lock:
                self.started[spec.env["ASSAY_JOB_ID"]] = time.monotonic()
        elif spec.task == "evaluate":
            out = spec.source_of("/assay/out")
            (out / "metrics.json").write_text(json.dumps({"metrics": {"auc": 0.8, "accuracy": 0.75}}))
            (out / "cases.jsonl").write_text("".join(json.dumps({"case": i, "correct": i % 2}) + "\n"
                                                     for i in range(CASES)))
        return RunOutcome(exit_code=0, log_tail="")


@dataclass(frozen=True)
class Site:
    site_id: str
    key: KeyPair
    dataset_id: str
    content_hash: str
    settings: SiteSettings


def make_sites(home: Home, count: int, nats_url: str) -> list[Site]:
    """Each site: a key, one tiny prepared dataset (data/ and labels/), its datasets file and a work folder."""
    scheduler_key = home.public_key("scheduling")
    sites = []
    for index in range(count):
        site_id = f"site-{index:03d}"
        root = home.site_dir(site_id)
        data, labels = root / "ds" / "data", root / "ds" / "labels"
        data.mkdir(parents=True)
        labels.mkdir(parents=True)
        for case in range(CASES):
            (data / f"case-{case}.json").write_text(json.dumps({"site": index, "case": case, "x": [case, index]}))
            (labels / f"case-{case}.json").write_text(json.dumps({"y": case % 2}))
        key = KeyPair.generate()
        key.save(home.key_file(site_id))
        dataset_id = f"{site_id}-ds"
        datasets_file = root / "datasets.json"
        datasets_file.write_text(json.dumps({dataset_id: str(root / "ds")}))
        settings = SiteSettings(site_id=site_id, key_file=home.key_file(site_id), scheduler_public_key=scheduler_key,
                                nats_url=nats_url, datasets_file=datasets_file, work_dir=root / "jobs")
        sites.append(Site(site_id, key, dataset_id, content_hash(data, labels), settings))
    return sites


# --- helpers -------------------------------------------------------------------------------------------------------


async def bounded(jobs: Iterable[Awaitable[Any]], limit: int = 8) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(job: Awaitable[Any]) -> Any:
        async with gate:
            return await job

    return await asyncio.gather(*(one(job) for job in jobs))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(platform: Platform, extra: dict[str, int]) -> dict[str, float]:
    pids = {name: proc.pid for name, proc in platform.procs.items()} | extra
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


# --- baseline: raw JetStream ---------------------------------------------------------------------------------------


async def raw_jetstream(nats_url: str, messages: int, rep: int) -> dict[str, float]:
    """Publish `messages` with Nats-Msg-Id (awaiting each ack), then consume them with a durable pull consumer,
    acking each: the bare cost of one message through the server the platform uses. Then the latency of one
    message: publish it to a consumer already waiting for it, until it is delivered and acked."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    stream = f"BENCH_RAW_{rep}"
    try:
        await js.add_stream(StreamConfig(name=stream, subjects=[f"bench.raw{rep}.>"], storage=StorageType.FILE,
                                         duplicate_window=120.0))
        body = os.urandom(RAW_BODY_BYTES // 2).hex().encode()
        start = time.perf_counter()
        for i in range(messages):
            await js.publish(f"bench.raw{rep}.job", body, headers={"Nats-Msg-Id": f"raw-{rep}-{i}"})
        published = time.perf_counter()
        sub = await js.pull_subscribe(f"bench.raw{rep}.>", durable=f"bench-raw-{rep}", stream=stream)
        consumed = 0
        while consumed < messages:
            for msg in await sub.fetch(batch=16, timeout=10):
                await msg.ack()
                consumed += 1
        done = time.perf_counter()
        trips = []
        for i in range(RAW_ROUND_TRIPS):  # one message at a time: publish, until the waiting consumer has it
            began = time.perf_counter()
            waiting = asyncio.create_task(sub.fetch(batch=1, timeout=10))
            await js.publish(f"bench.raw{rep}.job", body, headers={"Nats-Msg-Id": f"raw-{rep}-trip-{i}"})
            for msg in await waiting:
                await msg.ack()
            trips.append(time.perf_counter() - began)
        return {"msgs_per_s": messages / (done - start), "publish_per_s": messages / (published - start),
                "consume_per_s": messages / (done - published), "round_trip_p50_s": statistics.median(trips),
                "round_trip_p99_s": percentile(trips, 99)}
    finally:
        await js.delete_stream(stream)
        await nc.close()


# --- the platform flow ---------------------------------------------------------------------------------------------


@dataclass
class Observer:
    """The stamping subprocess and what it reported."""

    proc: asyncio.subprocess.Process
    stamps: dict[str, dict[str, dict[str, float]]] = field(default_factory=lambda: defaultdict(dict))
    model_of: dict[str, str] = field(default_factory=dict)
    advisories: Counter[tuple[str, str]] = field(default_factory=Counter)
    accepted_by_model: Counter[str] = field(default_factory=Counter)
    board_bytes: list[int] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def start(cls, nats_url: str) -> Observer:
        proc = await asyncio.create_subprocess_exec(sys.executable, str(OBSERVER), nats_url,
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"the observer did not start: {line!r}")
        observer = cls(proc)
        observer.reader = asyncio.create_task(observer._read())  # type: ignore[attr-defined]
        return observer

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = json.loads(raw)
            if line["kind"] == "board":
                self.board_bytes.append(line["bytes"])
                continue
            if line["kind"] == "advisory":
                self.advisories[(line["type"], line["consumer"])] += 1
                continue
            job = line["job_id"]
            if line["kind"] not in self.stamps[job]:  # the first sighting counts; a redelivery does not move it
                self.stamps[job][line["kind"]] = {"mono": line["mono"], "sent": line["sent"]}
                if line["kind"] == "accepted" and job in self.model_of:
                    self.accepted_by_model[self.model_of[job]] += 1
            if line["kind"] == "scheduled":
                self.model_of.setdefault(job, line["model_id"])
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

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await asyncio.wait_for(self.proc.wait(), 15)
        await self.reader  # type: ignore[attr-defined]


async def wait_events_drained(nats_url: str, timeout_s: float = 120.0) -> None:
    """Until every durable consumer of EVENTS has nothing pending and the stream stopped growing."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    deadline, last_seq, quiet = time.monotonic() + timeout_s, -1, 0
    try:
        while quiet < 3:
            if time.monotonic() > deadline:
                raise TimeoutError("the services did not catch up with the setup events")
            seq = (await js.stream_info("EVENTS")).state.last_seq
            busy = [c for c in await js.consumers_info("EVENTS") if c.num_pending or c.num_ack_pending]
            quiet = quiet + 1 if not busy and seq == last_seq else 0
            last_seq = seq
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def setup(nats_url: str, home: Home, sites: list[Site], models: list[str]) -> dict[str, float]:
    """Every actor, the benchmark, the datasets (associated) and the models (asked, not yet approved)."""
    keys = {name: home.key(name) for name in (OPERATOR, OWNER, VENDOR)}
    timings: dict[str, float] = {}
    count = 0

    async def send(payload: Payload, actor: str, key: KeyPair) -> None:
        nonlocal count
        await request(nats_url, payload, actor=actor, key=key, patience_s=60)
        count += 1

    start = time.perf_counter()
    actors = [(OWNER, m.Role.BENCHMARK_OWNER, keys[OWNER]), (VENDOR, m.Role.MODEL_OWNER, keys[VENDOR]),
              *((s.site_id, m.Role.SITE, s.key) for s in sites)]
    await bounded(send(m.RegisterActor(actor_id=a, role=r, public_key=k.public_key, display_name=a), OPERATOR,
                       keys[OPERATOR]) for a, r, k in actors)
    image = lambda name: m.ImageRef(digest=fake_digest(name), name=name)  # noqa: E731
    spec = m.BenchmarkSpec(benchmark_id=BENCHMARK, name="throughput", preparator=image("bench/preparator"),
                           reference_model=image("bench/reference"), evaluator=image("bench/evaluator"),
                           metrics=METRICS, primary_metric="auc")
    await send(m.RegisterBenchmark(benchmark=spec), OWNER, keys[OWNER])
    await send(m.ApproveBenchmark(benchmark_id=BENCHMARK), OPERATOR, keys[OPERATOR])

    async def join_dataset(site: Site) -> None:
        await send(m.RegisterDataset(dataset_id=site.dataset_id, benchmark_id=BENCHMARK, name=site.dataset_id,
                                     content_hash=site.content_hash, case_count=CASES,
                                     preparator_digest=spec.preparator.digest), site.site_id, site.key)
        await send(m.RequestAssociation(benchmark_id=BENCHMARK, kind=m.EntityKind.DATASET,
                                        entity_id=site.dataset_id), site.site_id, site.key)
        await send(m.ApproveAssociation(benchmark_id=BENCHMARK, kind=m.EntityKind.DATASET,
                                        entity_id=site.dataset_id), OWNER, keys[OWNER])

    async def ask_model(model: str) -> None:
        await send(m.RegisterModel(model_id=model, name=model, image=image(f"bench/{model}")), VENDOR, keys[VENDOR])
        await send(m.RequestAssociation(benchmark_id=BENCHMARK, kind=m.EntityKind.MODEL, entity_id=model),
                   VENDOR, keys[VENDOR])

    await bounded([*(join_dataset(s) for s in sites), *(ask_model(x) for x in models)])
    timings["commands"] = count
    timings["commands_s"] = time.perf_counter() - start
    await wait_events_drained(nats_url)
    timings["setup_s"] = time.perf_counter() - start
    return timings


def summarise_round(observer: Observer, runner: NoopRunner, models: list[str], trigger: float) -> dict[str, Any]:
    jobs = [j for j, model in observer.model_of.items() if model in models]
    st = {j: observer.stamps[j] for j in jobs}
    first_scheduled = min(s["scheduled"]["mono"] for s in st.values())
    last_accepted = max(s["accepted"]["mono"] for s in st.values())
    latency = [s["accepted"]["mono"] - s["scheduled"]["mono"] for s in st.values()]
    envelope_latency = [s["accepted"]["sent"] - s["scheduled"]["sent"] for s in st.values()]
    queued = [runner.started[j] - st[j]["scheduled"]["mono"] for j in jobs if j in runner.started]
    at_site = [st[j]["result"]["mono"] - runner.started[j] for j in jobs if j in runner.started and "result" in st[j]]
    leaderboard = [s["accepted"]["mono"] - s["result"]["mono"] for s in st.values() if "result" in s]
    return {
        "jobs": len(jobs),
        "jobs_per_s": len(jobs) / (last_accepted - first_scheduled),
        "planning_s": first_scheduled - trigger,
        "makespan_s": last_accepted - first_scheduled,
        "latency_p50_s": statistics.median(latency), "latency_p99_s": percentile(latency, 99),
        "latency_max_s": max(latency),
        "envelope_latency_p50_s": statistics.median(envelope_latency),
        "stage_p50_s": {"scheduled_to_site_start": statistics.median(queued),
                        "site_start_to_result": statistics.median(at_site),
                        "result_to_accepted": statistics.median(leaderboard)},
    }


def scan_logs(home: Home) -> dict[str, int]:
    needles = {"database is locked": "database_locked", "dead-lettering": "dead_lettered", "Traceback": "tracebacks",
               " ERROR ": "error_lines"}
    found = dict.fromkeys(needles.values(), 0)
    for path in home.logs.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            for needle, name in needles.items():
                found[name] += needle in line
    return found


async def flow(platform: Platform, sites_count: int, rounds: int, models_per_round: int, raw_messages: int,
               raw_reps: int, idle_s: float, log: Any) -> dict[str, Any]:
    home, url = platform.home, platform.nats_url
    result: dict[str, Any] = {"sites": sites_count, "rounds": rounds, "models_per_round": models_per_round}

    before = cpu_of(platform, {})
    await asyncio.sleep(idle_s)
    after = cpu_of(platform, {})
    result["idle_cpu_cores"] = {n: round((after[n] - before[n]) / idle_s, 3) for n in before}
    log(f"idle CPU of the services (cores): {result['idle_cpu_cores']}")

    raw = []
    for rep in range(raw_reps):
        raw.append(await raw_jetstream(url, raw_messages, rep))
    result["raw"] = {k: statistics.median(r[k] for r in raw) for k in raw[0]} | {
        "messages": raw_messages, "reps": raw_reps, "all_msgs_per_s": [round(r["msgs_per_s"], 1) for r in raw]}
    log(f"raw JetStream: {result['raw']['msgs_per_s']:.0f} msgs/s (median of {raw_reps})")

    sites = make_sites(home, sites_count, url)
    model_rounds = [[f"model-r{r}-{i}" for i in range(models_per_round)] for r in range(rounds)]
    result["setup"] = await setup(url, home, sites, [x for group in model_rounds for x in group])
    log(f"setup: {result['setup']['commands']:.0f} signed commands in {result['setup']['commands_s']:.1f} s")

    runner = NoopRunner()
    apps = [create_app(site.settings, runner) for site in sites]
    start = time.perf_counter()
    await asyncio.gather(*(app.start() for app in apps))
    result["workers_start_s"] = time.perf_counter() - start
    observer = await Observer.start(url)
    keys = {name: home.key(name) for name in (OWNER,)}
    per_round = []
    try:
        cpu_before = cpu_of(platform, {"bench": os.getpid(), "observer": observer.proc.pid})
        window = time.monotonic()
        for r, models in enumerate(model_rounds):
            trigger = time.monotonic()
            await asyncio.gather(*(request(url, m.ApproveAssociation(benchmark_id=BENCHMARK, kind=m.EntityKind.MODEL,
                                                                     entity_id=x), actor=OWNER, key=keys[OWNER])
                                   for x in models))
            await observer.wait_accepted(models, len(models) * sites_count, timeout_s=180)
            per_round.append(summarise_round(observer, runner, models, trigger))
            log(f"round {r + 1}: {per_round[-1]['jobs']} jobs, {per_round[-1]['jobs_per_s']:.1f} jobs/s, "
                f"p50 {per_round[-1]['latency_p50_s'] * 1000:.0f} ms, p99 {per_round[-1]['latency_p99_s'] * 1000:.0f} ms")
        window = time.monotonic() - window
        cpu_after = cpu_of(platform, {"bench": os.getpid(), "observer": observer.proc.pid})
    finally:
        await asyncio.gather(*(app.stop() for app in apps), return_exceptions=True)
        await observer.stop()
    jobs = sum(r["jobs"] for r in per_round)
    result["rounds_detail"] = per_round
    result["jobs"] = jobs
    result["jobs_per_s"] = statistics.median(r["jobs_per_s"] for r in per_round)
    result["latency_p50_s"] = statistics.median(r["latency_p50_s"] for r in per_round)
    result["latency_p99_s"] = statistics.median(r["latency_p99_s"] for r in per_round)
    result["stage_p50_s"] = {k: statistics.median(r["stage_p50_s"][k] for r in per_round)
                             for k in per_round[0]["stage_p50_s"]}
    result["ratio_jobs_to_raw_msgs"] = result["jobs_per_s"] / result["raw"]["msgs_per_s"]
    result["ratio_latency_p50_to_raw_trip"] = result["latency_p50_s"] / result["raw"]["round_trip_p50_s"]
    result["ratio_latency_p99_to_raw_trip"] = result["latency_p99_s"] / result["raw"]["round_trip_p99_s"]
    result["cpu_s_per_job"] = {n: round((cpu_after[n] - cpu_before[n]) / jobs, 4) for n in cpu_before}
    result["cpu_cores_busy"] = {n: round((cpu_after[n] - cpu_before[n]) / window, 2) for n in cpu_before}
    result["advisories"] = {f"{t} {c}": n for (t, c), n in sorted(observer.advisories.items())}
    result["leaderboard_updated"] = {"events": len(observer.board_bytes),
                                     "max_bytes": max(observer.board_bytes, default=0),
                                     "total_bytes": sum(observer.board_bytes)}
    result["logs"] = scan_logs(home)
    return result
