"""Checks before joining, through the `assay` command, against a real nats-server, the four real services and real
site workers (their containers played by FakeRunner; the demo's e2e test runs the real ones): the benchmark's demo
data pushed with it, fetched, checked and prepared at the committee's site; a model's check metrics seen by the
approver before approval; a model whose check failed refused without --override; a dataset checked with the
reference model at its own site and admitted by a policy once it passed; and no check on the board."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from contracts import messages as m
from site_worker.containers import RunSpec
from tests.integration.test_consent_cli import cli, registered_dataset
from tests.support.federation import EVALUATOR, MODEL, PREPARATOR, Federation, fake_containers

BROKEN = "sha256:" + "9" * 64  # a model image whose `infer` crashes
METRICS = {"auc": 0.875, "sensitivity": 0.75}


def containers():  # type: ignore[no-untyped-def]
    """The preparator (on raw demo data), the models (BROKEN crashes) and the evaluator, as FakeRunner plays them."""
    runner = fake_containers(METRICS)
    runner.add_image(BROKEN)
    infer = runner._actions["infer"]

    def prepare(spec: RunSpec) -> None:
        raw = (spec.source_of("/assay/raw") / "cases.csv").read_text().splitlines()[1:]
        (spec.source_of("/assay/data") / "features.csv").write_text(
            "case_id,x\n" + "".join(f"{line.split(',')[0]},{line.split(',')[1]}\n" for line in raw))
        (spec.source_of("/assay/labels") / "labels.csv").write_text(
            "case_id,label\n" + "".join(f"{line.split(',')[0]},{line.split(',')[2]}\n" for line in raw))

    def statistics(spec: RunSpec) -> None:
        (spec.source_of("/assay/out") / "statistics.json").write_text(json.dumps({"cases": 2}))

    def model(spec: RunSpec) -> None:
        if spec.image == BROKEN:
            raise RuntimeError("the model crashed on its input")
        infer(spec)

    runner.on("prepare", prepare)
    runner.on("sanity_check", lambda spec: None)
    runner.on("statistics", statistics)
    runner.on("infer", model)
    return runner


async def until(fed: Federation, what: str, *args: str, timeout_s: float = 60) -> str:
    """Run `assay ARGS` until its output holds `what`, as a person would look again."""
    deadline = time.monotonic() + timeout_s
    while True:
        code, said = await cli(fed, *args)
        if code == 0 and what in said:
            return said
        if time.monotonic() > deadline:
            pytest.fail(f"`assay {' '.join(args)}` never said {what!r}; last: {said}")
        await asyncio.sleep(0.5)


async def test_each_request_is_checked_before_joining_and_the_approver_sees_how(federation: Federation):
    fed = federation
    await fed.send(m.RegisterActor(actor_id="owner", role=m.Role.BENCHMARK_OWNER, also=(m.Role.SITE,),
                                   public_key=fed.key("owner").public_key, display_name="committee"), "operator")
    await fed.start_site("owner", containers())  # the committee's own site worker runs the compatibility checks
    demo = fed.root / "demo"
    demo.mkdir()
    (demo / "cases.csv").write_text("case_id,x,label\nc1,1,1\nc2,2,0\n")
    spec = fed.root / "benchmark.json"
    spec.write_text(json.dumps({
        "benchmark_id": "bench", "name": "checked", "preparator": {"digest": PREPARATOR, "name": "prep"},
        "reference_model": {"digest": MODEL, "name": "ref"}, "evaluator": {"digest": EVALUATOR, "name": "ev"},
        "metrics": [{"name": "auc"}, {"name": "sensitivity"}], "primary_metric": "auc", "check_site": "owner"}))

    code, said = await cli(fed, "benchmark", "register", str(spec), "--demo-data", str(demo), "--demo-cases", "2",
                           "--as", "owner")
    assert code == 0 and "raw: the preparator runs on it, 2 cases" in said, said
    await fed.send(m.ApproveBenchmark(benchmark_id="bench"), "operator")
    await fed.enrol("vendor", m.Role.MODEL_OWNER)
    for model_id, image in (("good", MODEL), ("broken", BROKEN)):
        await fed.send(m.RegisterModel(model_id=model_id, name=model_id, image=m.ImageRef(digest=image, name="m")),
                       "vendor")
        code, said = await cli(fed, "association", "request", "bench", "--model", model_id, "--as", "vendor")
        assert code == 0 and "who sees its check (on the benchmark's demo data)" in said, said

    # the approver sees each check before deciding: the metrics of one, the failure and its reason of the other
    await until(fed, "FAILED", "association", "show", "bench", "--model", "broken", "--as", "owner")
    good = await until(fed, "PASSED", "association", "show", "bench", "--model", "good", "--as", "owner")
    assert "its check on the benchmark's demo data" in good and "auc 0.875, sensitivity 0.750" in good
    code, broken = await cli(fed, "association", "show", "bench", "--model", "broken", "--as", "owner")
    assert "FAILED at owner: the model failed" in broken and "failure.log" in broken
    code, listed = await cli(fed, "association", "list", "--pending", "--as", "owner")
    assert "PASSED at owner" in listed and "FAILED at owner" in listed

    code, said = await cli(fed, "association", "approve", "bench", "--model", "broken", "--as", "owner")
    assert code == 1 and "the check of model broken in benchmark bench failed" in said and "--override" in said
    code, said = await cli(fed, "association", "approve", "bench", "--model", "broken", "--override",
                           "known crash, fixed in its next version", "--as", "owner")
    assert code == 0 and "model broken approved for bench" in said, said
    code, history = await cli(fed, "association", "show", "bench", "--model", "broken", "--as", "vendor")
    assert "check overridden: known crash, fixed in its next version" in history
    code, said = await cli(fed, "association", "approve", "bench", "--model", "good", "--as", "owner")
    assert code == 0, said

    # a dataset: the reference model runs on it at its own site; the committee's policy admits it once it passed
    code, said = await cli(fed, "association", "policy", "bench", "--kind", "dataset", "--mode", "allow", "--allow",
                           "site-a", "--as", "owner")
    assert code == 0, said
    await registered_dataset(fed, "site-a", "ds-a")
    site_a = fed.root / "sites" / "site-a"
    (site_a / "datasets.json").write_text(json.dumps({"ds-a": str(site_a / "datasets" / "ds-a")}))
    await fed.start_site("site-a", containers())
    code, said = await cli(fed, "association", "request", "bench", "--dataset", "ds-a", "--as", "site-a")
    assert code == 0 and "with its reference model" in said, said
    shown = await until(fed, "APPROVED", "association", "show", "bench", "--dataset", "ds-a", "--as", "site-a")
    assert "approved (policy)" in shown and "PASSED at site-a: auc 0.875" in shown

    # only the benchmark's own jobs count: the good model at site-a; the checks never reach the board
    deadline = time.monotonic() + 60
    while not (board := await fed.board()).rows and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert [(row.model_id, row.sites, row.case_count) for row in board.rows] == [("good", 1, 2)]
    code, jobs = await cli(fed, "job", "list", "--benchmark", "bench")
    assert jobs.count("(check of") == 3  # two models' checks and the dataset's, each marked
