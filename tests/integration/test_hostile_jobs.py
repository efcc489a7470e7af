"""Hostile models as a site worker meets them: each runs as a job's model (`execute`, the real engine, the demo's
evaluator, a declared prediction format), fails with the reason a person reads in `assay job list`, is marked as a
failure that would recur (so it is not tried again), leaves the dataset as it was, and sends nothing: the job raises
before any metric is read."""

from __future__ import annotations

from datetime import UTC, datetime
import docker
import pytest

from assay.demo.build import build_demo_images
from contracts import messages as m
from site_worker.containers import DockerRunner, Limits
from site_worker.datasets import content_hash
from site_worker.execution import RunFailed, execute
from tests.support.federation import make_dataset
from tests.support.hostile import build_hostile_images

pytestmark = pytest.mark.docker

LIMITS = Limits(memory="128m", nano_cpus=1_000_000_000, pids=32, timeout_s=3, output_bytes=10 << 20,
                output_files=1000)
# behaviour -> (the start of the reason, whether trying again could help)
EXPECTED = {
    "fork_bomb": ("the model failed (reached its limit of 32 processes", True),
    "memory_hog": ("the model failed (killed for exceeding its memory limit of 128m)", True),
    "ignore_sigterm_hang": ("the model failed (timed out after 3 s)", True),
    "log_flood": ("the model failed (timed out after 3 s)", True),
    "huge_output": ("the model failed (wrote more than 10 MiB to /assay/out)", True),
    "too_many_files": ("the model failed (wrote more than 1,000 files to /assay/out)", True),
    "leaky_columns": ("the model's output is not in the declared format: /assay/out/predictions.csv has 3 column(s)",
                      True),
    "not_numbers": ("the model's output is not in the declared format: /assay/out/predictions.csv line 2: every "
                    "column but case_id must be a finite number", True),
}


@pytest.fixture(scope="module")
def images(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    demo = build_demo_images(docker_client, tmp_path_factory.mktemp("demo-build"))
    return {**build_hostile_images(docker_client, tuple(EXPECTED)), "evaluator": demo.evaluator}


@pytest.mark.parametrize("behaviour", list(EXPECTED))
def test_a_hostile_model_fails_its_job_with_a_reason_and_changes_nothing(docker_client, images, tmp_path, behaviour):
    digest = make_dataset(tmp_path / "ds")
    job = m.JobSpec(job_id="job-1", site_id="site-a", expires_at=datetime(2100, 1, 1, tzinfo=UTC),
                    predictions=m.PredictionFormat(columns=("case_id", "score")),
                    metrics=(m.MetricSpec(name="auc"),), binding=m.JobBinding(
                        benchmark_id="bm", model_id=behaviour.replace("_", "-"), dataset_id="ds",
                        model_image=images[behaviour], evaluator_image=images["evaluator"], dataset_hash=digest,
                        case_count=2))
    runner = DockerRunner(docker_client, worker=f"hostile-jobs/{behaviour}")

    with pytest.raises(RunFailed) as failed:
        execute(job, tmp_path / "ds", runner, tmp_path / "work", LIMITS)

    reason, recurs = EXPECTED[behaviour]
    assert str(failed.value).startswith(reason), str(failed.value)
    if "declared format" not in reason:
        assert str(failed.value).endswith("its log is kept at the site in jobs/job-1/failure.log")
    assert failed.value.recurs is recurs
    assert content_hash(tmp_path / "ds" / "data", tmp_path / "ds" / "labels") == digest
    log_file = tmp_path / "work" / "job-1" / "failure.log"
    assert not log_file.exists() or log_file.stat().st_size <= 64 << 10
    if behaviour in ("huge_output", "too_many_files", "leaky_columns"):  # what filled the disk, or leaked, is gone
        assert not (tmp_path / "work" / "job-1" / "predictions").exists()
    assert docker_client.containers.list(all=True, filters={"label": f"assay.worker=hostile-jobs/{behaviour}"}) == []


def test_a_benign_model_in_the_declared_format_is_scored_by_the_evaluator(docker_client, images, tmp_path):
    """The table the site checked reaches the evaluator, readable by the user containers run as."""
    from tests.support.hostile import build_hostile_images

    benign = build_hostile_images(docker_client, ("benign",))["benign"]
    digest = make_dataset(tmp_path / "ds")
    job = m.JobSpec(job_id="job-1", site_id="site-a", expires_at=datetime(2100, 1, 1, tzinfo=UTC),
                    predictions=m.PredictionFormat(columns=("case_id", "score")),
                    metrics=(m.MetricSpec(name="auc"), m.MetricSpec(name="sensitivity"),
                             m.MetricSpec(name="specificity")),
                    binding=m.JobBinding(benchmark_id="bm", model_id="benign", dataset_id="ds", model_image=benign,
                                         evaluator_image=images["evaluator"], dataset_hash=digest, case_count=2))

    metrics = execute(job, tmp_path / "ds", DockerRunner(docker_client, worker="hostile-jobs/benign"),
                      tmp_path / "work", LIMITS)

    assert set(metrics.leaving) == {"auc", "sensitivity", "specificity"}
