"""What a site does with one job: check it, run model then evaluator in the sandbox, keep only declared metrics."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from contracts.messages import JobSpec, MetricSpec
from site_worker.containers import ContainerRunner, Limits, Mount, RunOutcome, RunSpec
from site_worker.datasets import content_hash


class JobRefused(Exception):
    """The job must not run here (wrong site, unknown dataset, changed data, wrong image): never retried."""


class JobFailed(Exception):
    """A container failed; the job may succeed on another attempt."""


@dataclass(frozen=True)
class Outcome:
    metrics: dict[str, float]
    case_count: int


def validate_metrics(raw: object, declared: tuple[MetricSpec, ...]) -> dict[str, float]:
    """Only declared numeric metrics may leave: every declared name, a finite number within its bounds, nothing else."""
    if not isinstance(raw, dict) or not isinstance(raw.get("metrics"), dict):
        raise JobFailed('metrics.json must be {"metrics": {name: number}}')
    values = raw["metrics"]
    names = {m.name for m in declared}
    if extra := sorted(set(values) - names):
        raise JobFailed(f"metrics.json has undeclared metrics {extra}; only {sorted(names)} may leave the site")
    out: dict[str, float] = {}
    for spec in declared:
        value = values.get(spec.name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise JobFailed(f"metric {spec.name!r} must be a finite number, got {value!r}")
        if not spec.minimum <= value <= spec.maximum:
            raise JobFailed(f"metric {spec.name!r}={value} is outside [{spec.minimum}, {spec.maximum}]")
        out[spec.name] = float(value)
    return out


def _check(outcome: RunOutcome, what: str, job_dir: Path) -> None:
    """A failure's log may hold patient data: it stays at the site; only the cause travels."""
    if not outcome.ok:
        (job_dir / "failure.log").write_text(outcome.log_tail)
        raise JobFailed(f"{what} failed ({outcome.why}); its log is kept at the site in jobs/{job_dir.name}/failure.log")


def execute(job: JobSpec, dataset_dir: Path, runner: ContainerRunner, work_dir: Path, limits: Limits) -> Outcome:
    """Run one job. Digests and the dataset hash are checked again right before the containers run."""
    data, labels = dataset_dir / "data", dataset_dir / "labels"
    if content_hash(data, labels) != job.dataset_hash:
        raise JobRefused(f"dataset {job.dataset_id} no longer matches its registered hash {job.dataset_hash}")
    for image in (job.model_image, job.evaluator_image):
        if runner.image_id(image) != image:
            raise JobRefused(f"image {image} is not present at this site, so the job is set aside (dead-lettered); "
                             "load images (docker load) before their jobs arrive")
    job_dir = work_dir / job.job_id
    shutil.rmtree(job_dir, ignore_errors=True)
    predictions, evaluation = job_dir / "predictions", job_dir / "evaluation"
    predictions.mkdir(parents=True)
    (job_dir / "job.json").write_text(job.model_dump_json(indent=2))  # the site's own record of what ran
    evaluation.mkdir(parents=True)
    env = {"ASSAY_JOB_ID": job.job_id}
    _check(runner.run(RunSpec(image=job.model_image, task="infer", env=env, limits=limits, mounts=(
        Mount(data, "/assay/data"), Mount(predictions, "/assay/out", writable=True)))), "the model", job_dir)
    _check(runner.run(RunSpec(image=job.evaluator_image, task="evaluate", env=env, limits=limits, mounts=(
        Mount(predictions, "/assay/predictions"), Mount(labels, "/assay/labels"),
        Mount(evaluation, "/assay/out", writable=True)))), "the evaluator", job_dir)
    try:
        raw = json.loads((evaluation / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise JobFailed(f"the evaluator wrote no readable /assay/out/metrics.json: {exc}") from exc
    metrics = validate_metrics(raw, job.metrics)
    cases = evaluation / "cases.jsonl"
    case_count = sum(1 for line in cases.read_text().splitlines() if line.strip()) if cases.exists() else 0
    if case_count != job.case_count:
        raise JobRefused(f"the evaluator scored {case_count} cases in /assay/out/cases.jsonl; "
                         f"dataset {job.dataset_id} was registered with {job.case_count}")
    return Outcome(metrics=metrics, case_count=case_count)
