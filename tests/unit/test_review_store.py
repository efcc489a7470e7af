"""The site's review store keeps one SQLite connection per thread: what another process (the data owner's CLI)
commits between two of the worker's calls is seen by the next, a forked child never uses its parent's connection,
every write is still FULL-synced, and `unsent` finds its rows by an index, not by reading every result kept."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

from contracts import messages as m
from contracts.envelope import Envelope
from contracts.signing import KeyPair, metrics_hash
from site_worker.review import Decision, Review

DIGEST = "sha256:" + "2" * 64


def result(job_id: str) -> m.SiteResult:
    binding = m.JobBinding(benchmark_id="bm", model_id="model-1", dataset_id="ds", model_image=DIGEST,
                           evaluator_image=DIGEST, dataset_hash=DIGEST, case_count=4)
    job = m.JobSpec(job_id=job_id, site_id="site-a", binding=binding, metrics=(m.MetricSpec(name="auc"),),
                    expires_at=datetime(2100, 1, 1, tzinfo=UTC))
    metrics = {"auc": 0.75}
    return m.SiteResult(job_id=job_id, site_id="site-a", binding=binding, metrics=metrics,
                        metrics_hash=metrics_hash(metrics), worker_id="worker-1", finished_at=datetime.now(UTC),
                        job=KeyPair.generate().sign(Envelope.wrap(job, source="service:scheduling", id=job_id)))


APPROVE = """
import sys
from site_worker.review import Decision, Review
Review(__import__("pathlib").Path(sys.argv[1])).decide([sys.argv[2]], Decision.APPROVED, by="dr-lee")
"""


def test_a_decision_another_process_commits_between_two_calls_is_seen_by_the_next(tmp_path: Path) -> None:
    review = Review(tmp_path / "review.sqlite")
    review.keep(result("job-1"), kept={}, release=False, by="")
    assert review.unsent() == []  # this thread's connection is open, and has read the store

    subprocess.run([sys.executable, "-c", APPROVE, str(review.path), "job-1"], check=True)  # as the CLI does

    [approved] = review.unsent()
    assert (approved.job_id, approved.state, approved.decided_by) == ("job-1", Decision.APPROVED, "dr-lee")
    review.sent("job-1")
    assert review.unsent() == [] and review.get("job-1").sent_at is not None  # type: ignore[union-attr]


def _decide_in_child(review: Review, job_id: str) -> None:
    review.decide([job_id], Decision.REJECTED, by="dr-lee", reason="too few cases")


def test_a_forked_child_opens_its_own_connection_and_the_parent_sees_its_write(tmp_path: Path) -> None:
    review = Review(tmp_path / "review.sqlite")
    review.keep(result("job-1"), kept={}, release=False, by="")
    parents = review._connection()
    child = multiprocessing.get_context("fork").Process(target=_decide_in_child, args=(review, "job-1"))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert review._connection() is parents
    assert review.get("job-1").state is Decision.REJECTED  # type: ignore[union-attr]


def test_each_thread_has_its_own_connection_kept_for_its_next_call(tmp_path: Path) -> None:
    review = Review(tmp_path / "review.sqlite")
    mine = review._connection()
    theirs: list[object] = []
    other = threading.Thread(target=lambda: theirs.extend([review._connection(), review._connection()]))
    other.start()
    other.join()
    assert review._connection() is mine and theirs[0] is theirs[1] and theirs[0] is not mine
    assert mine.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL, on every connection that writes
    assert mine.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unsent_finds_its_rows_by_index_not_by_reading_every_result_kept(tmp_path: Path) -> None:
    review = Review(tmp_path / "review.sqlite")
    for n in range(3):
        review.keep(result(f"job-{n}"), kept={}, release=True, by="policy")
    review.sent("job-0")
    ran: list[str] = []
    db = review._connection()
    db.set_trace_callback(ran.append)  # the statement unsent() runs, as SQLite runs it
    assert [held.job_id for held in review.unsent()] == ["job-1", "job-2"]
    db.set_trace_callback(None)
    [query] = [sql for sql in ran if sql.startswith("SELECT")]
    plan = " ".join(str(row) for row in db.execute(f"EXPLAIN QUERY PLAN {query}"))
    assert "USING INDEX result_unsent" in plan, plan
