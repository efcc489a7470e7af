"""The site's job execution with a FakeRunner: what each container sees, what may leave, what is refused."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from contracts import messages as m
from site_worker.containers import Limits
from site_worker.execution import JobRefused, RunFailed, execute, validate_metrics
from tests.support.federation import EVALUATOR, MODEL, fake_containers, make_dataset

LATER = datetime(2100, 1, 1, tzinfo=UTC)  # the jobs of these tests never expire

DECLARED = (m.MetricSpec(name="auc"), m.MetricSpec(name="sensitivity"))


def job_for(dataset_hash: str, **binding: object) -> m.JobSpec:
    bound = m.JobBinding(benchmark_id="b", model_id="mod", dataset_id="ds", model_image=MODEL,
                         evaluator_image=EVALUATOR, dataset_hash=dataset_hash, case_count=2)
    return m.JobSpec(expires_at=LATER, job_id="job-1", site_id="s", binding=bound.model_copy(update=binding), metrics=DECLARED)


def test_only_declared_finite_metrics_within_bounds_may_leave() -> None:
    assert validate_metrics({"metrics": {"auc": 0.9, "sensitivity": 1}}, DECLARED).leaving == {"auc": 0.9,
                                                                                              "sensitivity": 1.0}
    for raw, reason in [
        ({"metrics": {"auc": 0.9}}, r"misses the declared metric\(s\) \['sensitivity'\]"),
        ({"metrics": {"auc": float("nan"), "sensitivity": 1}}, "'auc' must be a finite number"),
        ({"metrics": {"auc": 1.5, "sensitivity": 1}}, r"'auc' must be within its declared range \[0.0, 1.0\]"),
        ({"metrics": {"auc": True, "sensitivity": 1}}, "finite number"),
        ({"auc": 0.9}, "must be"),
    ]:
        with pytest.raises(RunFailed, match=reason) as refused:
            validate_metrics(raw, DECLARED)
        assert refused.value.recurs  # the same output fails the same way: never tried again


def test_undeclared_metrics_stay_at_the_site_and_the_declared_ones_leave() -> None:
    written = {"metrics": {"auc": 0.9, "sensitivity": 1, "patient_42": 1, "auc_by_age": 0.7}}

    metrics = validate_metrics(written, DECLARED)

    assert metrics.leaving == {"auc": 0.9, "sensitivity": 1.0} and metrics.kept == ("auc_by_age", "patient_42")


def test_a_refused_metric_names_the_rule_never_the_value_the_evaluator_wrote() -> None:
    for raw in ({"metrics": {"auc": "patient Jane Doe", "sensitivity": 1}},
                {"metrics": {"auc": 0.5, "Jane Doe": 1}}):
        with pytest.raises(RunFailed) as refused:
            validate_metrics(raw, DECLARED)
        assert "Jane Doe" not in str(refused.value)


def test_the_model_never_sees_the_labels_and_the_evaluator_does(tmp_path: Path) -> None:
    digest = make_dataset(tmp_path / "ds")
    runner = fake_containers({"auc": 0.8, "sensitivity": 0.5})
    metrics = execute(job_for(digest), tmp_path / "ds", runner, tmp_path / "work", Limits())
    assert metrics.leaving == {"auc": 0.8, "sensitivity": 0.5}
    infer, evaluate = runner.specs
    assert {mt.target for mt in infer.mounts} == {"/assay/data", "/assay/out"}
    assert [mt.target for mt in infer.mounts if mt.writable] == ["/assay/out"]
    assert {mt.target for mt in evaluate.mounts} == {"/assay/predictions", "/assay/labels", "/assay/out"}
    assert infer.image == MODEL and evaluate.image == EVALUATOR
    assert infer.env["ASSAY_JOB_ID"] == "job-1"
    assert json.loads((tmp_path / "work" / "job-1" / "job.json").read_text())["binding"]["model_id"] == "mod"


def test_a_dataset_changed_since_registration_is_refused_before_any_container_runs(tmp_path: Path) -> None:
    digest = make_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "labels" / "labels.csv").write_text("case_id,label\nc1,0\nc2,0\n")
    runner = fake_containers({"auc": 0.8, "sensitivity": 0.5})
    with pytest.raises(JobRefused, match="no longer matches"):
        execute(job_for(digest), tmp_path / "ds", runner, tmp_path / "work", Limits())
    assert runner.specs == []


def test_an_image_missing_at_the_site_is_refused(tmp_path: Path) -> None:
    digest = make_dataset(tmp_path / "ds")
    job = job_for(digest, model_image="sha256:" + "9" * 64)
    with pytest.raises(JobRefused, match="not present"):
        execute(job, tmp_path / "ds", fake_containers({}), tmp_path / "work", Limits())


def test_a_result_over_other_cases_than_registered_is_refused(tmp_path: Path) -> None:
    digest = make_dataset(tmp_path / "ds")
    job = job_for(digest, case_count=3)  # registered with 3 cases, the evaluator scored 2
    with pytest.raises(RunFailed, match="scored 2 cases"):
        execute(job, tmp_path / "ds", fake_containers({"auc": 0.8, "sensitivity": 0.5}), tmp_path / "work", Limits())


def test_a_failed_containers_log_stays_at_the_site(tmp_path: Path) -> None:
    from site_worker.containers import RunOutcome

    digest = make_dataset(tmp_path / "ds")
    runner = fake_containers({"auc": 0.8, "sensitivity": 0.5})
    runner.script("evaluate", RunOutcome(exit_code=3, log_tail="case c1 of patient Jane Doe has label 1"))
    with pytest.raises(RunFailed) as failed:
        execute(job_for(digest), tmp_path / "ds", runner, tmp_path / "work", Limits())
    assert "Jane Doe" not in str(failed.value) and "exit code 3" in str(failed.value)
    assert "Jane Doe" in (tmp_path / "work" / "job-1" / "failure.log").read_text()


@pytest.mark.parametrize("trick", ["link", "pipe", "huge"])
def test_what_an_evaluator_leaves_in_place_of_its_metrics_is_read_as_nothing(tmp_path: Path, trick: str) -> None:
    """A link to a file of the site's, a pipe that would block the worker for ever, a file too large to hold."""
    import os

    digest = make_dataset(tmp_path / "ds")
    runner = fake_containers({"auc": 0.8, "sensitivity": 0.5})
    secret = tmp_path / "ds" / "labels" / "labels.csv"

    def evaluate(spec):  # type: ignore[no-untyped-def]
        out = spec.source_of("/assay/out")
        if trick == "link":
            (out / "metrics.json").symlink_to(secret)
        elif trick == "pipe":
            os.mkfifo(out / "metrics.json")
        else:
            (out / "metrics.json").write_text('{"metrics": {"auc": 0.8, "sensitivity": 0.5}}' + " " * (1 << 20))

    runner.on("evaluate", evaluate)
    refused = (r"/assay/out/metrics.json (is not a regular file: it was not written, or it is a link or a pipe"
               r"|is over 1048576 bytes)")
    with pytest.raises(RunFailed, match=refused):
        execute(job_for(digest), tmp_path / "ds", runner, tmp_path / "work", Limits())


def test_cases_written_as_a_link_are_not_counted(tmp_path: Path) -> None:
    digest = make_dataset(tmp_path / "ds")
    runner = fake_containers({"auc": 0.8, "sensitivity": 0.5})
    secret = tmp_path / "ds" / "labels" / "labels.csv"  # its lines would be counted, and the count would leave

    def evaluate(spec):  # type: ignore[no-untyped-def]
        out = spec.source_of("/assay/out")
        (out / "metrics.json").write_text('{"metrics": {"auc": 0.8, "sensitivity": 0.5}}')
        (out / "cases.jsonl").symlink_to(secret)

    runner.on("evaluate", evaluate)
    with pytest.raises(RunFailed, match="scored 0 cases"):
        execute(job_for(digest), tmp_path / "ds", runner, tmp_path / "work", Limits())


def test_a_dataset_the_worker_cannot_read_is_refused_with_what_to_do(tmp_path: Path, monkeypatch) -> None:
    import site_worker.execution as execution

    def denied(*_folders: Path) -> str:
        raise PermissionError(13, "Permission denied", str(tmp_path / "ds" / "labels" / "labels.csv"))

    monkeypatch.setattr(execution, "content_hash", denied)
    runner = fake_containers({"auc": 0.8, "sensitivity": 0.5})
    with pytest.raises(JobRefused, match=r"dataset ds in .* is not readable by this worker .*chown -R \d+:\d+ "):
        execute(job_for("sha256:" + "0" * 64), tmp_path / "ds", runner, tmp_path / "work", Limits())
    assert runner.specs == []


def test_what_failed_jobs_wrote_goes_after_the_retention_period_and_kept_results_stay(tmp_path: Path) -> None:
    import os

    from site_worker.execution import clean_failed

    for name, failed, age_days in (("old-failure", True, 40), ("new-failure", True, 1), ("old-success", False, 40),
                                   ("old-held", True, 40)):
        folder = tmp_path / name
        (folder / "predictions").mkdir(parents=True)
        marker = folder / ("failure.log" if failed else "job.json")
        marker.write_text("x")
        os.utime(marker, (0, 1_000_000_000 - age_days * 86400))

    removed = clean_failed(tmp_path, 30 * 86400, kept={"old-held"}, now=1_000_000_000)

    assert removed == ["old-failure"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new-failure", "old-held", "old-success"]


def test_output_not_in_the_declared_format_never_reaches_the_evaluator_and_is_removed(tmp_path: Path) -> None:
    from site_worker.containers import RunSpec

    digest = make_dataset(tmp_path / "ds")
    declared = m.PredictionFormat(file="predictions.csv", columns=("case_id", "score"))
    cases = {
        "leaks an input column": ("case_id,score,x\nc1,0.9,1\nc2,0.2,2\n",
                                  "has 3 column(s) that are not the declared case_id,score"),
        "writes no number": ("case_id,score\nc1,nan\nc2,0.2\n", "line 2: every column but case_id must be a finite"),
        "misses a case": ("case_id,score\nc1,0.9\n", "has 1 row(s); the dataset has 2 cases"),
        "names a case twice": ("case_id,score\nc1,0.9\nc1,0.2\n", "names 1 case(s) twice"),
    }
    for what, (table, reason) in cases.items():
        runner = fake_containers({"auc": 0.8, "sensitivity": 0.5})
        runner.on("infer", lambda spec, t=table: (spec.source_of("/assay/out") / "predictions.csv").write_text(t))
        job = job_for(digest).model_copy(update={"job_id": "job-" + what.replace(" ", "-"), "predictions": declared})

        with pytest.raises(RunFailed) as refused:
            execute(job, tmp_path / "ds", runner, tmp_path / "work", Limits())

        said = str(refused.value)
        assert reason in said and refused.value.recurs and said.startswith("the model's output is not in the declared")
        assert [spec.task for spec in runner.specs] == ["infer"], what
        assert not (tmp_path / "work" / job.job_id / "predictions").exists()

    runner = fake_containers({"auc": 0.8, "sensitivity": 0.5})
    write = runner._actions["infer"]

    def with_junk(spec: RunSpec) -> None:
        write(spec)
        (spec.source_of("/assay/out") / "junk.bin").write_bytes(b"\0" * 1024)

    runner.on("infer", with_junk)
    execute(job_for(digest).model_copy(update={"predictions": declared}), tmp_path / "ds", runner, tmp_path / "work",
            Limits())
    evaluate = runner.specs[-1]
    assert sorted(p.name for p in evaluate.source_of("/assay/predictions").iterdir()) == ["predictions.csv"]


KINDS = (m.MetricSpec(name="auc", kind=m.MetricKind.AUC), m.MetricSpec(name="sensitivity",
                                                                       kind=m.MetricKind.SENSITIVITY))


def scored_job(digest: str) -> m.JobSpec:
    return job_for(digest).model_copy(update={"metrics": KINDS, "pooling": m.Pooling(replicates=20, confusion=True,
                                                                                    bins=4, min_count=1)})


def with_cases(metrics: dict[str, float], cases: str):  # type: ignore[no-untyped-def]
    runner = fake_containers(metrics)

    def evaluate(spec):  # type: ignore[no-untyped-def]
        out = spec.source_of("/assay/out")
        (out / "metrics.json").write_text(json.dumps({"metrics": metrics}))
        (out / "cases.jsonl").write_text(cases)

    runner.on("evaluate", evaluate)
    return runner


CASES = '{"case_id": "c1", "label": 1, "score": 0.9}\n{"case_id": "c2", "label": 0, "score": 0.2}\n'


def test_the_site_computes_the_replicates_and_aggregates_the_benchmark_asks_for_from_the_cases(tmp_path: Path):
    digest = make_dataset(tmp_path / "ds")
    metrics = execute(scored_job(digest), tmp_path / "ds", with_cases({"auc": 1.0, "sensitivity": 1.0}, CASES),
                      tmp_path / "work", Limits())

    evidence = metrics.evidence
    assert evidence is not None and evidence.confusion == m.Confusion(tp=1, fp=0, tn=1, fn=0)
    assert evidence.histograms == m.Histograms(positive=(0, 0, 0, 1), negative=(1, 0, 0, 0))
    assert {name: len(values) for name, values in evidence.replicates.items()} == {"auc": 20, "sensitivity": 20}


def test_metrics_the_cases_do_not_give_fail_the_job_for_good_without_quoting_a_value(tmp_path: Path):
    digest = make_dataset(tmp_path / "ds")
    claimed = {"auc": 0.8123, "sensitivity": 1.0}  # the cases give an AUC of 1

    with pytest.raises(RunFailed) as refused:
        execute(scored_job(digest), tmp_path / "ds", with_cases(claimed, CASES), tmp_path / "work", Limits())

    assert refused.value.recurs and "auc disagrees with the cases" in str(refused.value)
    assert "0.8123" not in str(refused.value)
