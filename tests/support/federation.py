"""An in-process federation for integration tests: the four real services and site workers on a real nats-server.

Each service gets its own database (SQLite file or PostgreSQL), each site a FakeRunner that plays the
model and evaluator containers; everything crosses the real bus exactly as in `assay up`.
"""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from faststream import FastStream

from assay.client import request
from contracts import messages as m
from contracts.catalog import SERVICES
from contracts.signing import KeyPair
from service_kit.connection import servers
from site_worker.config import Settings as SiteSettings
from site_worker.containers import FakeRunner, RunSpec
from site_worker.datasets import content_hash
from site_worker.main import create_app as create_site

PREPARATOR = "sha256:" + "1" * 64
EVALUATOR = "sha256:" + "2" * 64
MODEL = "sha256:" + "3" * 64


AUTO_RELEASE = '[release]\nrule = "auto"\n'


def fake_containers(metrics: dict[str, float]) -> FakeRunner:
    """Model and evaluator stand-ins that write what the real ones would, with fixed metrics."""
    runner = FakeRunner([PREPARATOR, EVALUATOR, MODEL])

    def infer(spec: RunSpec) -> None:
        (spec.source_of("/assay/out") / "predictions.csv").write_text("case_id,score\nc1,0.9\nc2,0.2\n")

    def evaluate(spec: RunSpec) -> None:
        out = spec.source_of("/assay/out")
        (out / "metrics.json").write_text(json.dumps({"metrics": metrics}))
        (out / "cases.jsonl").write_text('{"case_id": "c1"}\n{"case_id": "c2"}\n')

    runner.on("infer", infer)
    runner.on("evaluate", evaluate)
    return runner


def tasks_by_job(specs: list[RunSpec]) -> dict[str, list[str]]:
    """The container tasks each job ran, by job id (a dataset's check runs before its benchmark jobs)."""
    ran: dict[str, list[str]] = {}
    for spec in specs:
        ran.setdefault(spec.env.get("ASSAY_JOB_ID", ""), []).append(spec.task)
    return ran


def benchmark_tasks(specs: list[RunSpec]) -> list[str]:
    """The container tasks of the benchmark's own jobs, in order: what a check before joining ran left out."""
    return [spec.task for spec in specs if spec.env.get("ASSAY_JOB_ID", "").startswith("job-")]


def make_dataset(folder: Path) -> str:
    (folder / "data").mkdir(parents=True)
    (folder / "labels").mkdir()
    (folder / "data" / "features.csv").write_text("case_id,x\nc1,1\nc2,2\n")
    with (folder / "labels" / "labels.csv").open("w") as f:
        csv.writer(f).writerows([("case_id", "label"), ("c1", 1), ("c2", 0)])
    return content_hash(folder / "data", folder / "labels")


@dataclass
class Federation:
    nats_url: str
    root: Path
    database_url: Callable[[str], str]
    keys: dict[str, KeyPair] = field(default_factory=dict)
    apps: list[FastStream] = field(default_factory=list)
    runners: dict[str, FakeRunner] = field(default_factory=dict)
    connection: dict[str, Any] = field(default_factory=dict)  # the services' nats_creds and nats_ca, where needed
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # one service's own settings, by its name

    def key(self, name: str) -> KeyPair:
        if name not in self.keys:
            self.keys[name] = KeyPair.generate()
            self.keys[name].save(self.root / "keys" / f"{name}.key")
        return self.keys[name]

    async def start_services(self) -> None:
        services = [self.service(name) for name in SERVICES]
        self.apps += services
        for app in services:
            await app.start()

    def service(self, name: str) -> FastStream:
        """The service `name`, configured as in a deployment, with what `overrides` gives it (its own NATS user, a
        stale key)."""
        from approval.config import Settings as ApprovalSettings
        from approval.main import create_app as approval
        from leaderboard.config import Settings as LeaderboardSettings
        from leaderboard.main import create_app as leaderboard
        from registry.config import Settings as RegistrySettings
        from registry.main import create_app as registry
        from scheduling.config import Settings as SchedulingSettings
        from scheduling.main import create_app as scheduling

        common = {"nats_url": self.nats_url, "database_url": self.database_url(name),
                  "key_file": self.root / "keys" / f"{name}.key",
                  "service_keys": {service: self.key(service).public_key for service in SERVICES}, **self.connection,
                  **self.overrides.get(name, {})}
        if name == "registry":
            return registry(RegistrySettings(**common, operator_public_key=self.key("operator").public_key))
        made = {"approval": (approval, ApprovalSettings), "scheduling": (scheduling, SchedulingSettings),
                "leaderboard": (leaderboard, LeaderboardSettings)}[name]
        return made[0](made[1](**common))  # type: ignore[operator]

    async def redeploy(self, name: str) -> FastStream:
        """Stop the service `name` and start it again as `overrides` now says (its database kept): a redeploy."""
        from service_kit.app import ServiceApp

        [old] = [app for app in self.apps if isinstance(app, ServiceApp) and app.wiring.owner == name]
        await old.stop()
        new = self.service(name)
        self.apps[self.apps.index(old)] = new
        await new.start()
        return new

    async def start_site(self, site: str, runner: FakeRunner, spans: Any = None, **overrides: Any) -> FastStream:
        self.key(site)
        site_dir = self.root / "sites" / site
        site_dir.mkdir(parents=True, exist_ok=True)
        policy = site_dir / "policy.toml"
        if not policy.exists():  # these sites release what passes the checks; a test that holds writes its own
            policy.write_text(AUTO_RELEASE)
        settings = SiteSettings(site_id=site, key_file=self.root / "keys" / f"{site}.key",
                                scheduler_public_key=self.key("scheduling").public_key, nats_url=self.nats_url,
                                datasets_file=site_dir / "datasets.json", work_dir=site_dir / "jobs",
                                state_dir=site_dir, policy_file=policy, **overrides)
        app = create_site(settings, runner, spans=spans)
        await app.start()
        self.apps.append(app)
        self.runners[site] = runner
        return app

    async def stop(self) -> None:
        for app in reversed(self.apps):
            await app.stop()

    async def send(self, payload: m.Payload, actor: str | None) -> dict[str, Any]:
        return await request(self.nats_url, payload, actor=actor or "anonymous",
                             key=self.key(actor) if actor else None)

    async def enrol(self, name: str, role: m.Role) -> None:
        await self.send(m.RegisterActor(actor_id=name, role=role, public_key=self.key(name).public_key,
                                        display_name=name), "operator")

    async def benchmark(self, benchmark_id: str = "bench", **changes: Any) -> m.BenchmarkSpec:
        fields: dict[str, Any] = {"metrics": (m.MetricSpec(name="auc"), m.MetricSpec(name="sensitivity")), **changes}
        spec = m.BenchmarkSpec(
            benchmark_id=benchmark_id, name="test benchmark",
            preparator=m.ImageRef(digest=PREPARATOR, name="prep"),
            reference_model=m.ImageRef(digest=MODEL, name="ref"), evaluator=m.ImageRef(digest=EVALUATOR, name="ev"),
            primary_metric="auc", **fields)
        await self.enrol("owner", m.Role.BENCHMARK_OWNER)
        await self.send(m.RegisterBenchmark(benchmark=spec), "owner")
        await self.send(m.ApproveBenchmark(benchmark_id=benchmark_id), "operator")
        return spec

    async def model(self, model_id: str, benchmark_id: str = "bench", owner: str = "vendor") -> None:
        await self.enrol(owner, m.Role.MODEL_OWNER)
        await self.send(m.RegisterModel(model_id=model_id, name=model_id, image=m.ImageRef(digest=MODEL, name="m")),
                        owner)
        await self.send(m.RequestAssociation(benchmark_id=benchmark_id, kind=m.EntityKind.MODEL, entity_id=model_id),
                        owner)
        await self.send(m.ApproveAssociation(benchmark_id=benchmark_id, kind=m.EntityKind.MODEL, entity_id=model_id),
                        "owner")

    async def dataset(self, site: str, dataset_id: str, benchmark_id: str = "bench") -> None:
        await self.enrol(site, m.Role.SITE)
        folder = self.root / "sites" / site / "datasets" / dataset_id
        digest = make_dataset(folder)
        datasets_file = self.root / "sites" / site / "datasets.json"
        known = json.loads(datasets_file.read_text()) if datasets_file.exists() else {}
        datasets_file.write_text(json.dumps({**known, dataset_id: str(folder)}))
        await self.send(m.RegisterDataset(dataset_id=dataset_id, benchmark_id=benchmark_id, name=dataset_id,
                                          content_hash=digest, case_count=2, statistics={"cases": 2},
                                          preparator_digest=PREPARATOR), site)
        await self.send(m.RequestAssociation(benchmark_id=benchmark_id, kind=m.EntityKind.DATASET,
                                             entity_id=dataset_id), site)
        await self.send(m.ApproveAssociation(benchmark_id=benchmark_id, kind=m.EntityKind.DATASET,
                                             entity_id=dataset_id), "owner")

    async def board(self, benchmark_id: str = "bench", asker: str | None = "owner") -> m.Leaderboard:
        """The board as `asker` sees it (the benchmark's owner: all of it; None: what is public)."""
        return m.Leaderboard.model_validate(await self.send(m.ShowLeaderboard(benchmark_id=benchmark_id), asker))


async def next_events(nats_url: str, subject: str, count: int, timeout_s: float = 30,
                      where: Callable[[dict[str, Any]], bool] = lambda _: True) -> list[dict[str, Any]]:
    """Wait for `count` messages on `subject` in the EVENTS history (from the start), decoded; only those `where`
    says (a job's state changes to CANCELLED, say, among its RUNNING ones). `nats_url` may name a cluster's servers."""
    nc = await nats.connect(servers(nats_url))
    try:
        js = nc.jetstream()
        sub = await js.subscribe(subject, ordered_consumer=True)
        out = []
        async with asyncio.timeout(timeout_s):
            while len(out) < count:
                msg = await sub.next_msg(timeout=timeout_s)
                if where(event := json.loads(msg.data)):
                    out.append(event)
        return out
    finally:
        await nc.close()


def in_state(state: str) -> Callable[[dict[str, Any]], bool]:
    """A JobStateChanged event of `state` (for `next_events`)."""
    return lambda event: event["data"].get("state") == state
