"""`assay results` at a site, against its review store and audit log in a temporary state folder: what is held is
listed with what would leave, several at once are previewed and asked about, a decision is taken once and logged."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from assay import cli
from assay.home import Home
from assay import site_cli
from assay.site_cli import results_app
from contracts import messages as m
from contracts.envelope import Envelope
from contracts.signing import KeyPair, metrics_hash
from site_worker.audit import AuditLog, verify_log
from site_worker.review import Decision, Review

SITE = "hospital-a"
DIGEST = "sha256:" + "1" * 64


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    home = Home(tmp_path)
    monkeypatch.setitem(cli.state, "home", home)
    monkeypatch.setattr(site_cli, "console", Console(width=160))  # wide enough whatever terminal runs the tests
    home.site_dir(SITE).mkdir(parents=True)
    (home.site_dir(SITE) / "site.json").write_text(json.dumps({"site_id": SITE}))
    KeyPair.generate().save(home.key_file(SITE))
    return home


def hold(home: Home, job_id: str, auc: float, evidence: m.Evidence | None = None) -> None:
    binding = m.JobBinding(benchmark_id="bm", model_id="model-1", dataset_id="ds", model_image=DIGEST,
                           evaluator_image=DIGEST, dataset_hash=DIGEST, case_count=40)
    job = m.JobSpec(job_id=job_id, site_id=SITE, binding=binding, metrics=(m.MetricSpec(name="auc"),),
                    expires_at=datetime(2100, 1, 1, tzinfo=UTC))
    metrics = {"auc": auc}
    result = m.SiteResult(job_id=job_id, site_id=SITE, binding=binding, metrics=metrics,
                          metrics_hash=metrics_hash(metrics), worker_id="worker-1", finished_at=datetime.now(UTC),
                          job=KeyPair.generate().sign(Envelope.wrap(job, source="service:scheduling", id=job_id)),
                          evidence=evidence)
    Review(home.site_dir(SITE) / "review.sqlite").keep(result, kept={"undeclared_metrics": ["auc_by_age"]},
                                                       release=False, by="")


def run(*args: str, answer: str = "") -> tuple[int, str]:
    result = CliRunner().invoke(results_app, [*args, "--site", SITE], input=answer)
    return result.exit_code, " ".join(result.output.split())


def states(home: Home) -> dict[str, Decision]:
    return {held.job_id: held.state for held in Review(home.site_dir(SITE) / "review.sqlite").all()}


def test_pending_shows_what_would_leave_and_what_stays(home: Home) -> None:
    hold(home, "job-aaaa1111", 0.912)

    code, shown = run("pending")

    assert code == 0 and "1 result(s) held for review" in shown
    assert "auc 0.912" in shown and "40 cases" in shown and "per-case scores, auc_by_age" in shown


def test_pending_and_show_name_the_replicates_and_aggregates_that_would_leave_and_what_was_withheld(home: Home):
    hold(home, "job-aaaa1111", 0.912, m.Evidence(replicates={"auc": (0.9, 0.91, 0.93)},
                                                 confusion=m.Confusion(tp=10, fp=5, tn=20, fn=5),
                                                 withheld=("score histograms: a bin holds fewer than 5 cases",)))

    code, shown = run("pending")
    assert code == 0 and "3 replicates of each of 1 metrics" in shown
    assert "confusion counts tp 10 fp 5 tn 20 fn 5" in shown and "withheld: score histograms" in shown
    code, detail = run("show", "job-aaaa")
    assert code == 0 and '"auc": "3 values in [0.9000, 0.9300]"' in detail and '"tp": 10' in detail


def test_approving_several_previews_them_and_asks_and_no_changes_nothing(home: Home) -> None:
    hold(home, "job-aaaa1111", 0.9)
    hold(home, "job-bbbb2222", 0.8)

    code, shown = run("approve", "--all", answer="n\n")

    assert code == 1 and "approve 2 result(s)" in shown and "approve these 2 results?" in shown
    assert set(states(home).values()) == {Decision.HELD}


def test_an_approval_is_taken_once_logged_with_who_and_a_start_of_the_id_is_enough(home: Home) -> None:
    hold(home, "job-aaaa1111", 0.9)
    hold(home, "job-bbbb2222", 0.8)

    assert run("approve", "job-aaaa")[0] == 0
    code, again = run("reject", "job-aaaa", "--reason", "second thoughts")

    assert code == 1 and "already approved; a decision is taken once; nothing was rejected" in again
    assert states(home) == {"job-aaaa1111": Decision.APPROVED, "job-bbbb2222": Decision.HELD}
    log = home.site_dir(SITE) / "audit.jsonl"
    [entry] = [e for e in AuditLog(log, home.key(SITE)).entries() if e.kind == "result_approved"]
    assert entry.job_id == "job-aaaa1111" and "(uid " in str(entry.details["by"])
    assert verify_log(log, home.key(SITE).public_key).ok


def test_a_rejection_needs_a_reason_and_an_unknown_job_changes_nothing(home: Home) -> None:
    hold(home, "job-aaaa1111", 0.9)

    assert "--reason must say why" in run("reject", "job-aaaa", "--reason", " ")[1]
    code, shown = run("approve", "job-aaaa1111", "job-cccc")
    assert code == 1 and "no result of a job job-cccc... is kept at this site" in shown
    assert states(home) == {"job-aaaa1111": Decision.HELD}
    assert run("reject", "--all", "--yes", "--reason", "mislabelled cohort")[0] == 0
    assert states(home) == {"job-aaaa1111": Decision.REJECTED}
