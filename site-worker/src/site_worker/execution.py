"""What a site does with one job: check it, run model then evaluator in the sandbox, keep only declared metrics."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from contracts.messages import Evidence, JobSpec, MetricSpec
from contracts.metrics import MetricNamesRefused, MetricsRefused, checked_metrics
from service_kit.edge import Refused
from site_worker.containers import (
    ContainerRunner,
    Failure,
    Limits,
    Mount,
    OutputRefused,
    RunOutcome,
    RunSpec,
    open_output,
    read_output,
)
from site_worker.datasets import content_hash
from site_worker.evidence import CasesRefused, evidence_of, read_cases
from site_worker.predictions import PredictionsRefused, check_predictions, hand_over


class JobRefused(Refused):
    """The job must not run here (wrong site, unknown dataset, changed data, wrong image): never retried."""


class RunFailed(Exception):
    """A container failed, or wrote what may not leave the site. `recurs`: it will fail the same way again (timed
    out, out of memory, too many processes, output rejected), so it is not tried again."""

    def __init__(self, reason: str, *, recurs: bool = False) -> None:
        super().__init__(reason)
        self.recurs = recurs


@dataclass(frozen=True)
class Metrics:
    leaving: dict[str, float]    # the declared metrics: what may leave
    kept: tuple[str, ...] = ()   # the names of what the evaluator wrote besides: they stay at the site
    evidence: Evidence | None = None  # replicates and aggregates the site computed from the cases: they leave too


def validate_metrics(raw: object, declared: tuple[MetricSpec, ...]) -> Metrics:
    """Only declared numeric metrics may leave: every declared name, a finite number within its bounds. Whatever else
    the evaluator wrote stays at the site, named in the site's record.

    The refusal names the file, the metric and the rule, never a value the evaluator wrote: it leaves the site.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("metrics"), dict):
        raise RunFailed('metrics.json must be {"metrics": {name: number}}', recurs=True)
    names = {spec.name for spec in declared}
    written: dict[str, object] = raw["metrics"]
    try:
        leaving = checked_metrics({k: v for k, v in written.items() if k in names}, declared)
    except MetricNamesRefused as refused:
        raise RunFailed(f"metrics.json misses the declared metric(s) {refused.missing}; the benchmark declares "
                        f"{refused.declared}", recurs=True) from None
    except MetricsRefused as refused:
        raise RunFailed(f"metrics.json: {refused}", recurs=True) from None
    return Metrics(leaving, tuple(sorted(str(k) for k in written if k not in names)))


def _metrics_written(path: Path) -> object:
    """The evaluator's metrics.json, parsed; the error never quotes what it wrote (it stays here)."""
    try:
        return json.loads(read_output(path).decode("utf-8"))
    except OutputRefused as refused:
        raise RunFailed(f"/assay/out/metrics.json {refused}", recurs=True) from None
    except ValueError:
        raise RunFailed("/assay/out/metrics.json: the evaluator wrote no file of UTF-8 JSON", recurs=True) from None


def _lines_written(path: Path) -> int:
    """How many non-blank lines the evaluator wrote to `path` (0 when it wrote no regular file there)."""
    stream = open_output(path)
    if stream is None:
        return 0
    with stream:
        return sum(1 for line in stream if line.strip())


def _check(outcome: RunOutcome, what: str, job_dir: Path) -> None:
    """A failure's log may hold patient data: it stays at the site; only the cause travels."""
    if not outcome.ok:
        if outcome.failure in (Failure.OUTPUT_TOO_LARGE, Failure.TOO_MANY_FILES):
            for folder in ("predictions", "evaluation"):  # what filled the disk goes now, not at a later clean-up
                shutil.rmtree(job_dir / folder, ignore_errors=True)
        (job_dir / "failure.log").write_text(outcome.log_tail)
        raise RunFailed(f"{what} failed ({outcome.why}); its log is kept at the site in "
                        f"jobs/{job_dir.name}/failure.log", recurs=outcome.recurs)


def clean_failed(work_dir: Path, older_than_s: float, kept: set[str], now: float) -> list[str]:
    """Remove the folders of jobs that failed (they hold a failure.log) more than `older_than_s` ago and whose result
    is not kept for review; the job ids removed. A folder whose job has a kept result is never touched."""
    removed = []
    for folder in sorted(work_dir.iterdir()) if work_dir.is_dir() else ():
        log_file = folder / "failure.log"
        if folder.name in kept or folder.is_symlink() or not log_file.is_file():
            continue
        if now - log_file.stat().st_mtime > older_than_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def checked_predictions(job: JobSpec, job_dir: Path, limit: int) -> Path:
    """The folder the evaluator reads: the declared table alone, once it keeps the format. A refused output goes at
    once (it may hold a copy of the input): it would be refused the same way again."""
    declared, written = job.predictions, job_dir / "predictions"
    assert declared is not None
    try:
        body = check_predictions(written, declared, job.binding.case_count, limit)
    except PredictionsRefused as refused:
        shutil.rmtree(written, ignore_errors=True)
        raise RunFailed(f"the model's output is not in the declared format: {refused}", recurs=True) from None
    hand_over(body, declared, job_dir / "checked", like=written)
    return job_dir / "checked"


def dataset_folder(datasets_file: Path, dataset_id: str, site_id: str) -> Path:
    """Where `assay dataset prepare` put a dataset of this site."""
    datasets = json.loads(datasets_file.read_text()) if datasets_file.exists() else {}
    if dataset_id not in datasets:
        raise JobRefused(f"dataset {dataset_id} is not prepared at site {site_id}")
    return Path(datasets[dataset_id])


def execute(job: JobSpec, dataset_dir: Path, runner: ContainerRunner, work_dir: Path, limits: Limits,
            gpus: tuple[str, ...] = (), expected_hash: str | None = None) -> Metrics:
    """Run one job; its metrics, once they may leave. Digests and the dataset hash (the binding's, or
    `expected_hash`: the demo data's as prepared here) are checked again right before the containers run, and the
    evaluator must have scored exactly the registered cases. `gpus` (device ids) go to the model only."""
    data, labels = dataset_dir / "data", dataset_dir / "labels"
    bound = job.binding
    try:
        found = content_hash(data, labels)
    except PermissionError:
        raise JobRefused(f"dataset {bound.dataset_id} in {dataset_dir} is not readable by this worker (uid "
                         f"{os.geteuid()}), nor by its containers, which run as it: give the folder to it "
                         f"(chown -R {os.geteuid()}:{os.getegid()} {dataset_dir})") from None
    if found != (expected_hash or bound.dataset_hash):
        raise JobRefused(f"dataset {bound.dataset_id} no longer matches its registered hash {bound.dataset_hash}")
    for image in (bound.model_image, bound.evaluator_image):
        if runner.image_id(image) != image:
            raise JobRefused(f"image {image} is not present at this site, so the job is set aside (dead-lettered); "
                             "push it (assay model push) or load it (docker load) before its jobs arrive")
    job_dir = work_dir / job.job_id
    shutil.rmtree(job_dir, ignore_errors=True)
    predictions, evaluation = job_dir / "predictions", job_dir / "evaluation"
    predictions.mkdir(parents=True)
    (job_dir / "job.json").write_text(job.model_dump_json(indent=2))  # the site's own record of what ran
    evaluation.mkdir(parents=True)
    env = {"ASSAY_JOB_ID": job.job_id}
    _check(runner.run(RunSpec(image=bound.model_image, task="infer", env=env, limits=limits, gpus=gpus, mounts=(
        Mount(data, "/assay/data"), Mount(predictions, "/assay/out", writable=True)))), "the model", job_dir)
    if job.predictions is not None:
        predictions = checked_predictions(job, job_dir, limits.output_bytes)
    _check(runner.run(RunSpec(image=bound.evaluator_image, task="evaluate", env=env, limits=limits, mounts=(
        Mount(predictions, "/assay/predictions"), Mount(labels, "/assay/labels"),
        Mount(evaluation, "/assay/out", writable=True)))), "the evaluator", job_dir)
    metrics = validate_metrics(_metrics_written(evaluation / "metrics.json"), job.metrics)
    case_count = _lines_written(evaluation / "cases.jsonl")
    if case_count != bound.case_count:
        raise RunFailed(f"the evaluator scored {case_count} cases in /assay/out/cases.jsonl; "
                        f"dataset {bound.dataset_id} was registered with {bound.case_count}", recurs=True)
    if metrics.kept:
        (job_dir / "kept_at_site.json").write_text(json.dumps({"undeclared_metrics": list(metrics.kept)}))
    return Metrics(metrics.leaving, metrics.kept, evidence_from(job, evaluation / "cases.jsonl", limits.output_bytes,
                                                                metrics.leaving))


def evidence_from(job: JobSpec, cases_file: Path, limit: int, metrics: dict[str, float]) -> Evidence | None:
    """What the benchmark asks the site to compute from the cases besides the metrics (none where it asks nothing);
    cases that break the contract, or metrics they do not give, fail the job for good."""
    pooling = job.pooling
    if pooling is None or not (pooling.confusion or pooling.bins or any(spec.kind for spec in job.metrics)):
        return None
    try:
        return evidence_of(read_cases(cases_file, job.metrics, limit), job, metrics)
    except CasesRefused as refused:
        raise RunFailed(str(refused), recurs=True) from None
