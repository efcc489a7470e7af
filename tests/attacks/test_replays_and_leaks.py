"""Attacks on a real platform (real nats-server, the four services, a site worker; real containers where a container
is the attacker): what an intruder replays and what a hostile evaluator tries to send home. Loopback only, bounded."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path
from typing import Any

import nats
import pytest

from contracts import messages as m
from contracts import subjects
from contracts.catalog import REQUEST_SUBJECTS
from contracts.envelope import Envelope
from contracts.streams import STREAMS
from site_worker.containers import DockerRunner
from site_worker.datasets import content_hash
from tests.support.federation import PREPARATOR, Federation, fake_containers, next_events

METRICS = {"auc": 0.9, "sensitivity": 0.8}
SECRETS = ("patient-jane-doe-4471", "patient-john-roe-9052")  # case ids no message may ever carry off the site


async def every_message(nats_url: str) -> list[bytes]:
    """Every message every stream holds, headers and body."""
    nc = await nats.connect(nats_url)
    js, found = nc.jetstream(), []
    try:
        for config in STREAMS:
            state = (await js.stream_info(str(config.name))).state
            for seq in range(max(state.first_seq, 1), state.last_seq + 1) if state.messages else ():
                try:
                    msg = await js.get_msg(str(config.name), seq)
                except nats.js.errors.NotFoundError:
                    continue
                found.append(json.dumps(msg.headers or {}).encode() + msg.data)
    finally:
        await nc.close()
    return found


# --- replays ------------------------------------------------------------------------------------------------------


async def test_an_approval_refused_before_its_request_is_refused_when_replayed_after_it(federation: Federation):
    await federation.benchmark()
    await federation.enrol("vendor", m.Role.MODEL_OWNER)
    await federation.send(m.RegisterModel(model_id="model-1", name="m", image=m.ImageRef(digest=PREPARATOR, name="m")),
                          "vendor")
    approval = federation.key("owner").sign(Envelope.wrap(m.ApproveAssociation(
        benchmark_id="bench", kind=m.EntityKind.MODEL, entity_id="model-1"), source="actor:owner"))
    captured = approval.model_dump_json().encode()
    nc = await nats.connect(federation.nats_url)
    try:
        early = json.loads((await nc.request(REQUEST_SUBJECTS[m.ApproveAssociation], captured, timeout=10)).data)
        await federation.send(m.RequestAssociation(benchmark_id="bench", kind=m.EntityKind.MODEL,
                                                   entity_id="model-1"), "vendor")
        replayed = json.loads((await nc.request(REQUEST_SUBJECTS[m.ApproveAssociation], captured, timeout=10)).data)
    finally:
        await nc.close()

    assert early["ok"] is False and early["message"].startswith("nobody asked for this association")
    assert replayed["ok"] is False and "refused when it was first sent" in replayed["message"]
    with pytest.raises(TimeoutError):  # no approval was ever announced
        await next_events(federation.nats_url, subjects.evt("association", "approved"), 1, timeout_s=1.0)


@pytest.mark.parametrize("year", [1999, 2999])
async def test_a_command_signed_far_from_now_is_refused(federation: Federation, year: int):
    envelope = Envelope.wrap(m.ApproveBenchmark(benchmark_id="bench"), source="actor:operator")
    signed = federation.key("operator").sign(envelope.model_copy(update={"time": envelope.time.replace(year=year)}))
    nc = await nats.connect(federation.nats_url)
    try:
        reply = json.loads((await nc.request(REQUEST_SUBJECTS[m.ApproveBenchmark], signed.model_dump_json().encode(),
                                             timeout=10)).data)
    finally:
        await nc.close()

    assert reply["ok"] is False and f"signed at {year}-" in reply["message"] and "a replay, or a wrong clock" in reply[
        "message"]


async def test_a_captured_job_replayed_under_new_ids_never_runs_again(federation: Federation):
    runner = fake_containers(METRICS)
    await federation.start_site("site-a", runner)
    nc = await nats.connect(federation.nats_url)
    captured: asyncio.Queue[bytes] = asyncio.Queue()

    async def tap(msg: Any) -> None:  # an intruder listening on the wire
        captured.put_nowait(msg.data)

    await nc.subscribe(subjects.jobs("site-a"), cb=tap)
    await nc.flush()
    try:
        await federation.benchmark()
        await federation.model("model-1")
        await federation.dataset("site-a", "ds-a")
        await next_events(federation.nats_url, subjects.evt("result", "accepted"), 1)
        await next_events(federation.nats_url, subjects.evt("check", "completed"), 1)  # the dataset's check ran too
        job = await asyncio.wait_for(captured.get(), 10)
        for replay in range(5):
            await nc.jetstream().publish(subjects.jobs("site-a"), job, headers={"Nats-Msg-Id": f"replay-{replay}"})
        letters = await next_events(federation.nats_url, subjects.dead_letter("site-site-a-jobs"), 5)
    finally:
        await nc.close()

    assert all("already ran at this site" in letter["data"]["error"] for letter in letters)
    # one run of each job (the dataset's check and the benchmark's job: a site takes several jobs at once, so their
    # containers may interleave), no container for the replays
    runs: dict[str, list[str]] = {}
    for spec in runner.specs:
        runs.setdefault(spec.env["ASSAY_JOB_ID"], []).append(spec.task)
    assert len(runs) == 2 and all(tasks == ["infer", "evaluate"] for tasks in runs.values()), runs


# --- a hostile evaluator ---------------------------------------------------------------------------------------------

HOSTILE = '''
import csv, json, sys
from pathlib import Path
task = sys.argv[1]
if task == "infer":
    rows = list(csv.DictReader(open("/assay/data/features.csv")))
    Path("/assay/out/predictions.csv").write_text("case_id,score\\n" + "".join(f"{r['case_id']},0.5\\n" for r in rows))
    sys.exit(0)
labels = Path("/assay/labels/labels.csv").read_text()
rows = list(csv.DictReader(open("/assay/labels/labels.csv")))
Path("/assay/out/cases.jsonl").write_text("".join(json.dumps({"case_id": r["case_id"]}) + "\\n" for r in rows))
if Path("/assay/labels/raw").exists():      # not JSON at all: the labels as they are
    Path("/assay/out/metrics.json").write_text(labels)
else:                                       # labels as a value, as metric names, and beside the metrics
    metrics = {"auc": labels, "sensitivity": 0.5, **{r["case_id"]: float(r["label"]) for r in rows}}
    Path("/assay/out/metrics.json").write_text(json.dumps({"metrics": metrics, "labels": labels}))
print("leaked:", labels)                    # its log: kept at the site
'''


def hostile_image(client: Any, folder: Path) -> str:
    from assay.demo.build import BASE_IMAGE, ensure_base_image

    ensure_base_image(client)
    folder.mkdir(parents=True)
    (folder / "main.py").write_text(HOSTILE)
    (folder / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nCOPY main.py /app/main.py\nUSER 65534:65534\n"
                                       'ENTRYPOINT ["python3", "/app/main.py"]\n')
    image, _ = client.images.build(path=str(folder), tag="assay-test/hostile-evaluator:1", network_mode="none",
                                   rm=True, forcerm=True)
    return str(image.id)


def patients(folder: Path, *, raw: bool) -> str:
    (folder / "data").mkdir(parents=True)
    (folder / "labels").mkdir()
    with (folder / "data" / "features.csv").open("w") as f:
        csv.writer(f).writerows([("case_id", "x"), *((case, 1) for case in SECRETS)])
    with (folder / "labels" / "labels.csv").open("w") as f:
        csv.writer(f).writerows([("case_id", "label"), (SECRETS[0], 1), (SECRETS[1], 0)])
    if raw:
        (folder / "labels" / "raw").write_text("")
    return content_hash(folder / "data", folder / "labels")


@pytest.mark.docker
async def test_a_leaking_evaluators_labels_are_in_no_message_on_any_stream(federation: Federation, docker_client,
                                                                         tmp_path: Path):
    image = hostile_image(docker_client, tmp_path / "image")
    await federation.start_site("site-a", DockerRunner(docker_client), max_deliver=1)  # type: ignore[arg-type]
    spec = m.BenchmarkSpec(benchmark_id="bench", name="b", preparator=m.ImageRef(digest=PREPARATOR, name="p"),
                           reference_model=m.ImageRef(digest=image, name="h"), evaluator=m.ImageRef(digest=image, name="h"),
                           metrics=(m.MetricSpec(name="auc"), m.MetricSpec(name="sensitivity")), primary_metric="auc")
    await federation.enrol("owner", m.Role.BENCHMARK_OWNER)
    await federation.send(m.RegisterBenchmark(benchmark=spec), "owner")
    await federation.send(m.ApproveBenchmark(benchmark_id="bench"), "operator")
    await federation.enrol("vendor", m.Role.MODEL_OWNER)
    await federation.send(m.RegisterModel(model_id="hostile", name="h", image=m.ImageRef(digest=image, name="h")),
                          "vendor")
    await federation.send(m.RequestAssociation(benchmark_id="bench", kind=m.EntityKind.MODEL, entity_id="hostile"),
                          "vendor")
    await federation.send(m.ApproveAssociation(benchmark_id="bench", kind=m.EntityKind.MODEL, entity_id="hostile"),
                          "owner")
    await federation.enrol("site-a", m.Role.SITE)
    site = tmp_path / "sites" / "site-a"
    folders = {"as-json": site / "datasets" / "as-json", "as-text": site / "datasets" / "as-text"}
    (site / "datasets.json").write_text(json.dumps({name: str(folder) for name, folder in folders.items()}))
    for name, folder in folders.items():
        digest = patients(folder, raw=name == "as-text")
        await federation.send(m.RegisterDataset(dataset_id=name, benchmark_id="bench", name=name, content_hash=digest,
                                                case_count=2, statistics={"cases": 2},
                                                preparator_digest=PREPARATOR), "site-a")
        await federation.send(m.RequestAssociation(benchmark_id="bench", kind=m.EntityKind.DATASET, entity_id=name),
                              "site-a")
        await federation.send(m.ApproveAssociation(benchmark_id="bench", kind=m.EntityKind.DATASET, entity_id=name),
                              "owner")

    # each dataset's check (the reference model is the hostile image too) and its job
    letters = await next_events(federation.nats_url, subjects.dead_letter("site-site-a-jobs"), 4, timeout_s=120)

    # refused output fails the same way again: dead-lettered at the first delivery, and the scheduler told why
    assert sorted(letter["data"]["error"] for letter in letters) == [
        "/assay/out/metrics.json: the evaluator wrote no file of UTF-8 JSON"] * 2 + [
        "metrics.json: metric 'auc' must be a finite number"] * 2
    assert [letter["data"]["deliveries"] for letter in letters] == [1] * 4
    everything = await every_message(federation.nats_url)
    assert sum(b"metrics.json" in msg for msg in everything) >= 4, "the scan reads the dead letters and reports too"
    for secret in (*SECRETS, "case_id,label"):
        assert [msg[:300] for msg in everything if secret.encode() in msg] == [], f"{secret!r} left the site"
    assert (await federation.board()).rows == ()
    assert len(list((site / "jobs").glob("*/evaluation/metrics.json"))) == 4, "what it wrote stays at the site"
