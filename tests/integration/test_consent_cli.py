"""Consent through the `assay` command against a real nats-server and the four real services: a benchmark rejected
with its reason, requests listed and approved in bulk after a preview, a pair's history, an auto-approval policy, and
a revocation that cancels the pair's queued job."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path


from contracts import messages as m
from tests.integration.test_cli import assay
from tests.support.federation import MODEL, PREPARATOR, Federation, fake_containers, make_dataset, next_events


async def cli(fed: Federation, *args: str, answer: str | None = None) -> tuple[int, str]:
    done = await asyncio.to_thread(assay, fed.root, *args) if answer is None else await asyncio.to_thread(
        _answered, fed.root, answer, *args)
    return done.returncode, " ".join((done.stdout + done.stderr).split())


def _answered(home: Path, answer: str, *args: str):  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "assay", "--home", str(home), *args], input=answer,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


async def registered_dataset(fed: Federation, site: str, dataset_id: str) -> None:
    """A dataset its site registered and asked to join with, through the same commands `assay` sends."""
    await fed.enrol(site, m.Role.SITE)
    digest = make_dataset(fed.root / "sites" / site / "datasets" / dataset_id)
    await fed.send(m.RegisterDataset(dataset_id=dataset_id, benchmark_id="bench", name=dataset_id,
                                     content_hash=digest, case_count=2, statistics={"cases": 2},
                                     preparator_digest=PREPARATOR), site)


async def test_a_rejected_benchmark_says_why_to_whoever_asks_to_join(federation: Federation):
    await federation.enrol("owner", m.Role.BENCHMARK_OWNER)
    spec = (await federation.benchmark()).model_copy(update={"benchmark_id": "bench-2"})
    await federation.send(m.RegisterBenchmark(benchmark=spec), "owner")
    await federation.model("model-1")

    code, said = await cli(federation, "benchmark", "reject", "bench-2", "--reason", "no demo data yet",
                           "--as", "operator")
    assert code == 0 and "benchmark bench-2 rejected: no demo data yet" in said
    code, said = await cli(federation, "association", "request", "bench-2", "--model", "model-1", "--as", "vendor")
    assert code == 1 and "benchmark bench-2 was rejected by the operator: no demo data yet" in said

    # its owner registers it again, as the operator asked, and the operator approves it this time
    (federation.root / "again.json").write_text(spec.model_copy(update={"benchmark_id": "bench-3"}).model_dump_json())
    code, said = await cli(federation, "benchmark", "register", str(federation.root / "again.json"), "--as", "owner")
    assert code == 0 and "benchmark bench-3 registered (DEVELOPMENT)" in said, said
    code, said = await cli(federation, "benchmark", "approve", "bench-3", "--as", "operator")
    assert code == 0 and "benchmark bench-3 approved: OPERATION" in said
    code, said = await cli(federation, "association", "request", "bench-3", "--model", "model-1", "--as", "vendor")
    assert code == 0 and "model model-1 asked to join bench-3" in said, said


async def test_pending_requests_are_listed_previewed_and_approved_at_once_and_each_keeps_its_history(
        federation: Federation):
    await federation.benchmark()
    for site in ("site-a", "site-b"):
        await registered_dataset(federation, site, f"ds-{site[-1]}")
        code, said = await cli(federation, "association", "request", "bench", "--dataset", f"ds-{site[-1]}",
                               "--as", site)
        assert code == 0 and "waiting for the benchmark owner" in said, said

    code, listed = await cli(federation, "association", "list", "--pending", "--as", "owner")
    assert code == 0 and "2 association(s) waiting for a decision" in listed and "ds-a" in listed and "ds-b" in listed
    code, said = await cli(federation, "association", "approve", "bench", "--all-pending", "--as", "owner",
                           answer="n\n")
    assert code == 1 and "approve 2 request(s) to join bench" in said
    code, said = await cli(federation, "association", "approve", "bench", "--all-pending", "--yes", "--as", "owner")
    assert code == 0 and said.count("approved for bench") == 2
    code, said = await cli(federation, "association", "show", "bench", "--dataset", "ds-a", "--as", "site-a")
    assert code == 0 and "APPROVED" in said and "requested" in said and "approved" in said and "owner" in said
    code, said = await cli(federation, "association", "list", "--as", "site-a")
    assert "1 association(s)" in said and "ds-b" not in said  # a site sees only its own


async def test_a_policy_approves_at_once_and_a_revocation_cancels_the_queued_jobs(federation: Federation):
    await federation.benchmark()  # it has no demo data: a model's request runs no check, so its policy acts at once
    code, said = await cli(federation, "association", "policy", "bench", "--kind", "model", "--mode", "allow",
                           "--allow", "vendor", "--as", "owner")
    assert code == 0 and "approved at once: those of vendor" in said
    await registered_dataset(federation, "site-a", "ds-a")  # site-a runs no worker: its jobs wait in the queue
    await federation.send(m.RequestAssociation(benchmark_id="bench", kind=m.EntityKind.DATASET, entity_id="ds-a"),
                          "site-a")
    await federation.send(m.ApproveAssociation(benchmark_id="bench", kind=m.EntityKind.DATASET, entity_id="ds-a"),
                          "owner")
    await federation.enrol("vendor", m.Role.MODEL_OWNER)
    await federation.send(m.RegisterModel(model_id="model-1", name="m", image=m.ImageRef(digest=MODEL, name="m")),
                          "vendor")

    code, said = await cli(federation, "association", "request", "bench", "--model", "model-1", "--as", "vendor")
    assert code == 0 and "approved for bench by the benchmark's approval policy" in said
    scheduled = await next_events(federation.nats_url, "assay.v1.evt.job.scheduled.*", 2)  # the dataset's check too
    code, said = await cli(federation, "association", "revoke", "bench", "--dataset", "ds-a", "--reason",
                           "ethics review pending", "--as", "site-a")
    assert code == 0 and "its open jobs are cancelled" in said

    changed = await next_events(federation.nats_url, "assay.v1.evt.job.state_changed.*", 2)
    assert sorted((c["data"]["job_id"], c["data"]["state"]) for c in changed) == sorted(
        (s["data"]["job"]["job_id"], "CANCELLED") for s in scheduled)
    code, jobs = await cli(federation, "job", "list", "--benchmark", "bench")
    assert jobs.count("CANCELLED") == 2 and "ethics review pending" in jobs

    # site-a comes online: it finds both jobs cancelled, runs neither, and its audit log says so
    runner = fake_containers({"auc": 0.9, "sensitivity": 0.8})
    await federation.start_site("site-a", runner)
    audit = federation.root / "sites" / "site-a" / "audit.jsonl"
    for _ in range(120):
        entries = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
        if len(cancelled := [e for e in entries if e["kind"] == "job_cancelled"]) == 2:
            break
        await asyncio.sleep(0.25)
    assert sorted(e["job_id"] for e in cancelled) == sorted(s["data"]["job"]["job_id"] for s in scheduled)
    assert all("ethics review pending" in e["details"]["reason"] for e in cancelled)
    assert runner.specs == []


async def test_what_exists_is_listed_and_a_model_shows_its_associations_and_their_history(federation: Federation):
    await federation.benchmark()
    await federation.model("model-1")

    code, models = await cli(federation, "model", "list", "--as", "owner")
    assert code == 0 and "1 model(s)" in models and "model-1" in models and "vendor" in models
    code, benchmarks = await cli(federation, "benchmark", "list", "--state", "operation", "--as", "vendor")
    assert code == 0 and "bench" in benchmarks and "OPERATION" in benchmarks
    code, shown = await cli(federation, "model", "show", "model-1", "--as", "vendor")
    assert code == 0 and "its associations (1) that vendor is a side of" in shown
    assert "requested by vendor" in shown and "approved by owner" in shown
    code, missing = await cli(federation, "model", "show", "model-9", "--as", "vendor")
    assert code == 1 and "no model model-9 is registered" in missing


async def test_watch_shows_the_approver_a_request_as_it_arrives(federation: Federation):
    import os
    import subprocess
    import sys

    await federation.benchmark()
    await federation.enrol("vendor", m.Role.MODEL_OWNER)
    await federation.send(m.RegisterModel(model_id="model-1", name="m", image=m.ImageRef(
        digest="sha256:" + "3" * 64, name="m")), "vendor")
    watcher = subprocess.Popen([sys.executable, "-m", "assay", "--home", str(federation.root), "watch", "--as",
                                "owner", "--count", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "COLUMNS": "200"})
    try:
        assert watcher.stdout is not None
        lines: list[str] = []

        def until_ready() -> None:  # it says when it follows the events, before anything is asked
            for line in watcher.stdout:  # type: ignore[union-attr]
                lines.append(line)
                if line.strip() == "ready":
                    return

        await asyncio.to_thread(until_ready)  # the services answer its queries on this loop meanwhile
        await federation.send(m.RequestAssociation(benchmark_id="bench", kind=m.EntityKind.MODEL,
                                                   entity_id="model-1"), "vendor")
        rest, _ = await asyncio.to_thread(watcher.communicate, timeout=60)
    finally:
        watcher.kill()
    said = " ".join(("".join(lines) + rest).split())
    assert "watching for owner: 1 benchmark(s)" in said
    assert "waiting for you: vendor asks model model-1 into bench (assay association approve bench --model model-1)" \
        in said


async def test_an_organisations_hospital_also_owning_a_model_joins_with_both_and_its_policy_admits_its_actors(
        federation: Federation):
    await federation.benchmark()
    federation.key("leeds")
    code, said = await cli(federation, "organisation", "register", "uh-leeds", "--name", "Leeds Teaching Hospitals",
                           "--as", "operator")
    assert code == 0, said
    pub = federation.root / "keys" / "leeds.pub"
    code, said = await cli(federation, "actor", "register", "leeds", "--role", "site", "--also", "model_owner",
                           "--organisation", "uh-leeds", "--public-key", str(pub), "--as", "operator")
    assert code == 0 and "registered site leeds (also model_owner) of uh-leeds" in said
    code, said = await cli(federation, "association", "policy", "bench", "--kind", "model", "--mode", "allow",
                           "--allow", "uh-leeds", "--as", "owner")
    assert code == 0
    await federation.send(m.RegisterModel(model_id="leeds-net", name="n", image=m.ImageRef(
        digest="sha256:" + "3" * 64, name="n")), "leeds")

    code, said = await cli(federation, "association", "request", "bench", "--model", "leeds-net", "--as", "leeds")
    assert code == 0 and "approved for bench by the benchmark's approval policy" in said
    code, sites = await cli(federation, "site", "list", "--as", "owner")
    assert code == 0 and "leeds" in sites and "organisation uh-leeds" in sites
    code, orgs = await cli(federation, "organisation", "list", "--as", "owner")
    assert code == 0 and "Leeds Teaching Hospitals" in orgs
