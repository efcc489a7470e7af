"""The simulated federation: sites with a do-nothing container runner, and every actor's signed setup commands.

Everything goes through the platform's own front doors: keys and prepared datasets as `assay dataset prepare`
leaves them, commands through `assay.client.request` (as `assay demo` does), workers from `site_worker.main`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

import nats

from assay.client import request
from assay.home import Home
from contracts import messages as m
from contracts.envelope import Payload
from contracts.signing import KeyPair
from service_kit.connection import servers
from site_worker.config import Settings as SiteSettings
from site_worker.containers import RunOutcome, RunSpec
from site_worker.datasets import content_hash
AUTO_RELEASE = '[release]\nrule = "auto"\n'  # these sites release what passes the checks

BENCHMARK = "bench-throughput"
OPERATOR, OWNER, VENDOR = "operator", "committee", "vendor"
METRICS = (m.MetricSpec(name="auc"), m.MetricSpec(name="accuracy"))
CASES = 4
COMMANDS_IN_FLIGHT = 8


def fake_digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def image(name: str) -> m.ImageRef:
    return m.ImageRef(digest=fake_digest(name), name=name)


def scores(model_image: str, site: str) -> dict[str, float]:
    """What the evaluator "measures" for a model at a site: fixed by both, different for each, so that every run of
    the same benchmark makes the same board, one on which models and sites differ."""
    draw = hashlib.sha256(f"{model_image} {site}".encode()).digest()
    return {"auc": round(0.6 + 0.35 * draw[0] / 255, 4), "accuracy": round(0.5 + 0.4 * draw[1] / 255, 4)}


class NoopRunner:
    """A ContainerRunner that runs no container: `evaluate` writes a valid metrics.json (`scores`) and cases.jsonl,
    `infer` nothing. It stamps when each job's model step starts, to split the latency into its stages."""

    def __init__(self) -> None:
        self.model_of: dict[str, str] = {}  # job -> its model's image, seen at `infer`, for its `evaluate`
        self.started: dict[str, float] = {}  # the first time only
        self.runs: Counter[str] = Counter()  # a job run twice was delivered again (a nak, an expired ack wait)
        self._lock = threading.Lock()  # jobs run in worker threads (asyncio.to_thread)

    def image_id(self, ref: str) -> str | None:
        return ref

    def remove_leftovers(self) -> list[str]:
        return []

    def host(self) -> tuple[float, int]:
        return 8.0, 16384

    def load(self, archive: object) -> list[str]:
        return []

    def run(self, spec: RunSpec) -> RunOutcome:
        if spec.task == "infer":
            job = spec.env["ASSAY_JOB_ID"]
            with self._lock:
                self.started.setdefault(job, time.monotonic())
                self.runs[job] += 1
                self.model_of[job] = spec.image
        elif spec.task == "evaluate":
            out = spec.source_of("/assay/out")
            site = spec.source_of("/assay/labels").parent.parent.name  # sites/<site>/ds/labels
            metrics = scores(self.model_of.get(spec.env.get("ASSAY_JOB_ID", ""), ""), site)
            (out / "metrics.json").write_text(json.dumps({"metrics": metrics}))
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
        (root / "policy.toml").write_text(AUTO_RELEASE)
        sites.append(Site(site_id, key, dataset_id, content_hash(data, labels),
                          site_settings(home, site_id, nats_url, scheduler_key)))
    return sites


def site_settings(home: Home, site_id: str, nats_url: str, scheduler_key: str) -> SiteSettings:
    """The worker settings of a site `make_sites` made: all its files are on disk under the home folder, so a process
    that hosts some of the workers (bench_hosts) makes the same settings from the site's id alone."""
    root = home.site_dir(site_id)
    return SiteSettings(site_id=site_id, key_file=home.key_file(site_id), scheduler_public_key=scheduler_key,
                        nats_url=nats_url, datasets_file=root / "datasets.json", work_dir=root / "jobs",
                        state_dir=root, policy_file=root / "policy.toml")


async def bounded(jobs: Iterable[Awaitable[Any]], limit: int = COMMANDS_IN_FLIGHT) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(job: Awaitable[Any]) -> Any:
        async with gate:
            return await job

    return await asyncio.gather(*(one(job) for job in jobs))


async def wait_events_drained(nats_url: str, timeout_s: float = 120.0) -> None:
    """Until every durable consumer of EVENTS has nothing pending and the stream stopped growing."""
    nc = await nats.connect(servers(nats_url))
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


async def setup(nats_url: str, home: Home, sites: list[Site], models: list[str],
                in_flight: int = COMMANDS_IN_FLIGHT) -> dict[str, float]:
    """Every actor, the benchmark, the datasets (associated) and the models (asked for, not yet approved), with
    `in_flight` commands awaiting their replies at once."""
    keys = {name: home.key(name) for name in (OPERATOR, OWNER, VENDOR)}
    sent = 0

    async def send(payload: Payload, actor: str, key: KeyPair) -> None:
        nonlocal sent
        await request(nats_url, payload, actor=actor, key=key, patience_s=60)
        sent += 1

    start = time.perf_counter()
    actors = [(OWNER, m.Role.BENCHMARK_OWNER, keys[OWNER]), (VENDOR, m.Role.MODEL_OWNER, keys[VENDOR]),
              *((s.site_id, m.Role.SITE, s.key) for s in sites)]
    await bounded((send(m.RegisterActor(actor_id=a, role=r, public_key=k.public_key, display_name=a), OPERATOR,
                        keys[OPERATOR]) for a, r, k in actors), in_flight)
    spec = m.BenchmarkSpec(benchmark_id=BENCHMARK, name="throughput", preparator=image("bench/preparator"),
                           reference_model=image("bench/reference"), evaluator=image("bench/evaluator"),
                           metrics=METRICS, primary_metric="auc")
    await send(m.RegisterBenchmark(benchmark=spec), OWNER, keys[OWNER])
    await send(m.ApproveBenchmark(benchmark_id=BENCHMARK), OPERATOR, keys[OPERATOR])

    async def join_dataset(site: Site) -> None:
        await send(m.RegisterDataset(dataset_id=site.dataset_id, benchmark_id=BENCHMARK, name=site.dataset_id,
                                     content_hash=site.content_hash, case_count=CASES, statistics={"cases": CASES},
                                     preparator_digest=spec.preparator.digest), site.site_id, site.key)
        await send(m.RequestAssociation(benchmark_id=BENCHMARK, kind=m.EntityKind.DATASET,
                                        entity_id=site.dataset_id), site.site_id, site.key)
        await send(m.ApproveAssociation(benchmark_id=BENCHMARK, kind=m.EntityKind.DATASET,
                                        entity_id=site.dataset_id), OWNER, keys[OWNER])

    async def ask_model(model: str) -> None:
        await send(m.RegisterModel(model_id=model, name=model, image=image(f"bench/{model}")), VENDOR, keys[VENDOR])
        await send(m.RequestAssociation(benchmark_id=BENCHMARK, kind=m.EntityKind.MODEL, entity_id=model),
                   VENDOR, keys[VENDOR])

    await bounded([*(join_dataset(s) for s in sites), *(ask_model(x) for x in models)], in_flight)
    commands_s = time.perf_counter() - start
    await wait_events_drained(nats_url)  # so the rounds start with every service caught up
    return {"commands": sent, "commands_s": commands_s, "setup_s": time.perf_counter() - start}


async def approve_models(nats_url: str, home: Home, models: list[str]) -> None:
    """The benchmark owner approves the models: each approval makes the scheduler plan a job per site."""
    key = home.key(OWNER)
    await asyncio.gather(*(request(nats_url, m.ApproveAssociation(benchmark_id=BENCHMARK, kind=m.EntityKind.MODEL,
                                                                  entity_id=x), actor=OWNER, key=key)
                           for x in models))
