"""`assay verify` and the sharing policy against a real nats-server and the four real services: the board rebuilt
from the signed streams agrees with the service's, a result altered in the leaderboard's database is named, and each
role's query shows what it may see."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from contracts import messages as m
from site_worker.containers import FakeRunner, RunSpec
from tests.integration.test_cli import assay
from tests.support.federation import EVALUATOR, MODEL, PREPARATOR, Federation, next_events

KINDS = (m.MetricSpec(name="auc", kind=m.MetricKind.AUC),
         m.MetricSpec(name="sensitivity", kind=m.MetricKind.SENSITIVITY))
POOLING = m.Pooling(replicates=50, confusion=True, bins=4, min_count=1)


def scoring(cases: dict[str, tuple[int, float]], metrics: dict[str, float]) -> FakeRunner:
    """A model and an evaluator that score the federation's two cases as `cases` says (label, score)."""
    runner = FakeRunner([PREPARATOR, EVALUATOR, MODEL])

    def infer(spec: RunSpec) -> None:
        rows = "".join(f"{case},{score}\n" for case, (_, score) in cases.items())
        (spec.source_of("/assay/out") / "predictions.csv").write_text("case_id,score\n" + rows)

    def evaluate(spec: RunSpec) -> None:
        out = spec.source_of("/assay/out")
        (out / "metrics.json").write_text(json.dumps({"metrics": metrics}))
        (out / "cases.jsonl").write_text("".join(json.dumps({"case_id": c, "label": y, "score": s}) + "\n"
                                                 for c, (y, s) in cases.items()))

    runner.on("infer", infer)
    runner.on("evaluate", evaluate)
    return runner


@pytest.fixture
async def federation(nats_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    fed = Federation(nats_url, tmp_path, lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db")
    await fed.start_services()
    await fed.start_site("site-a", scoring({"c1": (1, 0.9), "c2": (0, 0.2)}, {"auc": 1.0, "sensitivity": 1.0}))
    await fed.start_site("site-b", scoring({"c1": (1, 0.3), "c2": (0, 0.4)}, {"auc": 0.0, "sensitivity": 0.0}))
    await fed.benchmark(metrics=KINDS, pooling=POOLING, sharing=m.Sharing(public=m.PublicView.NONE))
    await fed.enrol("auditor", m.Role.AUDITOR)
    await fed.model("model-1", owner="vendor-1")
    await fed.model("model-2", owner="vendor-2")
    await fed.dataset("site-a", "ds-a")
    await fed.dataset("site-b", "ds-b")
    await next_events(nats_url, "assay.v1.evt.result.accepted", 4)
    (tmp_path / "platform.json").write_text(json.dumps({"nats_url": nats_url}))
    yield fed
    await fed.stop()


async def test_verify_agrees_with_the_service_and_names_a_result_altered_in_its_database(federation: Federation):
    home = federation.root

    agreed = await asyncio.to_thread(assay, home, "verify", "bench", "--as", "auditor")

    assert agreed.returncode == 0, agreed.stdout + agreed.stderr
    assert "read" in agreed.stdout and "the board of bench is the one its signed results give" in agreed.stdout
    board = await federation.board()
    assert board.rows[0].pooling["sensitivity"] == "exact: pooled confusion counts"
    assert board.rows[0].pooled["sensitivity"] == 0.5 and board.rows[0].intervals  # 1 of 2 positives found

    with sqlite3.connect(home / "leaderboard.db") as db:  # someone with the database's password "improves" a model
        db.execute("""UPDATE lb_result SET metrics = '{"auc": 1.0, "sensitivity": 1.0}'
                      WHERE model_id = 'model-2' AND site_id = 'site-b'""")

    flagged = await asyncio.to_thread(assay, home, "verify", "bench", "--as", "auditor")

    said = " ".join(flagged.stdout.split())  # as a person reads it, however the terminal wrapped it
    assert flagged.returncode == 1, said
    assert "differs: model model-2 · site_values · site-b · auc: the service says 1.0, the streams give 0.0" in said


async def test_verify_needs_the_whole_board(federation: Federation):
    partial = await asyncio.to_thread(assay, federation.root, "verify", "bench", "--as", "vendor-1")

    assert partial.returncode == 1 and "verify as an auditor or as the benchmark's owner" in partial.stdout


async def test_each_role_sees_what_the_sharing_policy_lets_it(federation: Federation):
    vendor = await federation.board(asker="vendor-1")
    assert [row.model_id for row in vendor.rows] == ["model-1"] and vendor.hidden == 1
    assert set(vendor.rows[0].site_values) == {"site-a", "site-b"}

    site = await federation.board(asker="site-a")
    assert {row.model_id: set(row.site_values) for row in site.rows} == {"model-1": {"site-a"}, "model-2": {"site-a"}}
    assert all(row.pooled == {} for row in site.rows)  # nothing is public on this benchmark

    anyone = await federation.board(asker=None)
    assert (anyone.rows, anyone.hidden) == ((), 2)
    updates = await next_events(federation.nats_url, "assay.v1.evt.leaderboard.updated", 1)  # a burst: one or more
    assert all(u["data"]["model_id"] is None and u["data"]["pooled"] == {} for u in updates)


async def test_a_revocation_marks_the_board_and_verify_reaches_the_same_board(federation: Federation):
    reply = await federation.send(m.RevokeAssociation(benchmark_id="bench", kind=m.EntityKind.MODEL,
                                                      entity_id="model-2", reason="a bug found"), "vendor-2")
    assert reply["ok"], reply
    await next_events(federation.nats_url, "assay.v1.evt.association.revoked", 1)
    rows = {}
    for _ in range(100):  # the leaderboard learns of it from the event history
        rows = {row.model_id: row for row in (await federation.board()).rows}
        if rows["model-2"].marks:
            break
        await asyncio.sleep(0.1)

    assert rows["model-2"].marks[0].startswith("model model-2 revoked by vendor-2") and rows["model-1"].marks == ()
    agreed = await asyncio.to_thread(assay, federation.root, "verify", "bench", "--as", "auditor")
    assert agreed.returncode == 0, agreed.stdout + agreed.stderr
