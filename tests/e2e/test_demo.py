"""The whole demo, through the CLI, against a real nats-server and the real Docker engine.

The leaderboard's numbers are checked against AUC, sensitivity and specificity computed here, with
scikit-learn, from the labels each site prepared and the predictions its model container wrote: per site, and
pooled over all the sites' cases (which no one outside the sites could do).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from rich.console import Console
from sklearn.metrics import recall_score, roc_auc_score

from assay.demo.run import BENCHMARK, MODEL_OWNERS, SITES, run_demo
from assay.home import Home
from contracts.messages import Leaderboard

pytestmark = pytest.mark.docker


def read_csv(path: Path, column: str) -> dict[str, float]:
    with path.open() as f:
        return {row["case_id"]: float(row[column]) for row in csv.DictReader(f)}


def scored_cases(job_dir: Path, labels_file: Path) -> tuple[list[int], list[float]]:
    scores = read_csv(job_dir / "predictions" / "predictions.csv", "score")
    labels = read_csv(labels_file, "label")
    assert set(scores) == set(labels)
    ids = sorted(labels)
    return [int(labels[i]) for i in ids], [scores[i] for i in ids]


def independent_metrics(y: list[int], s: list[float]) -> dict[str, float]:
    predicted = [int(v >= 0.5) for v in s]
    return {"auc": roc_auc_score(y, s), "sensitivity": recall_score(y, predicted, pos_label=1),
            "specificity": recall_score(y, predicted, pos_label=0), "cases": len(y)}


def test_demo_leaderboard_matches_metrics_computed_independently(tmp_path: Path, docker_client) -> None:  # type: ignore[no-untyped-def]
    boards: list[Leaderboard] = []
    code = run_demo(Home(tmp_path), Console(record=True, width=140), on_board=boards.append)
    assert code == 0
    board = boards[0]
    assert board.benchmark_id == BENCHMARK
    assert {row.model_id for row in board.rows} == set(MODEL_OWNERS)

    home = Home(tmp_path / "demo")
    expected: dict[tuple[str, str], dict[str, float]] = {}
    cases: dict[str, tuple[list[int], list[float]]] = {model: ([], []) for model in MODEL_OWNERS}
    for site in SITES:
        labels = home.site_dir(site) / "datasets" / f"{site}-wdbc" / "labels" / "labels.csv"
        jobs = [json.loads(job_file.read_text()) | {"folder": job_file.parent}
                for job_file in (home.site_dir(site) / "jobs").glob("*/job.json")]
        checks = [job for job in jobs if job["check"] is not None]  # its dataset's check with the reference model
        assert [job["binding"]["model_id"] for job in checks] == ["reference-model"]
        for job in jobs:
            if job["check"] is not None:
                continue
            y, s = scored_cases(job["folder"], labels)
            expected[(job["binding"]["model_id"], site)] = independent_metrics(y, s)
            cases[job["binding"]["model_id"]][0].extend(y)
            cases[job["binding"]["model_id"]][1].extend(s)
    assert len(expected) == len(MODEL_OWNERS) * len(SITES)

    for row in board.rows:
        assert set(row.site_values) == set(SITES)
        for site, values in row.site_values.items():
            want = expected[(row.model_id, site)]
            for metric in ("auc", "sensitivity", "specificity"):
                assert values[metric] == pytest.approx(want[metric], abs=1e-9), (row.model_id, site, metric)
        total = sum(expected[(row.model_id, s)]["cases"] for s in SITES)
        assert row.case_count == total
        # pooled as if one hospital held every case: exactly for the confusion metrics, within the reported bin
        # error for the AUC (the case-weighted mean of the sites' values is neither)
        pooled = independent_metrics(*cases[row.model_id])
        assert row.pooling == {"auc": "exact: pooled score histograms", "sensitivity": "exact: pooled confusion counts",
                               "specificity": "exact: pooled confusion counts"}
        assert row.pooled["sensitivity"] == pytest.approx(pooled["sensitivity"], abs=1e-12)
        assert row.pooled["specificity"] == pytest.approx(pooled["specificity"], abs=1e-12)
        assert abs(row.pooled["auc"] - pooled["auc"]) <= row.bin_error["auc"] < 0.02
        for metric in ("auc", "sensitivity", "specificity"):
            interval = row.intervals[metric]
            assert interval.low <= row.pooled[metric] <= interval.high
        assert sum(row.rank_probabilities) == pytest.approx(1.0)
    # ranked by pooled AUC, best first; a model shares a rank only where the intervals overlap
    assert [row.rank for row in board.rows] == sorted(row.rank for row in board.rows)
    assert board.rows[0].model_id == "reference" and board.rank_stability is not None
    assert (home.root / "board.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # labels never reached a model container: the site kept per-case scores, and only metrics left
    for site in SITES:
        for job_dir in (home.site_dir(site) / "jobs").iterdir():
            assert not (job_dir / "predictions" / "labels.csv").exists()
    # what the sites prepared and what their containers wrote (labels, predictions, per-case scores, failure logs)
    # is readable by the site's own user (and its sandbox's) only
    kept = [path for site in SITES for folder in ("datasets", "jobs")
            for path in (home.site_dir(site) / folder).rglob("*")]
    assert any(path.name == "cases.jsonl" for path in kept) and any(path.name == "labels.csv" for path in kept)
    assert {str(path): oct(path.stat().st_mode & 0o777) for path in kept if path.stat().st_mode & 0o077} == {}
