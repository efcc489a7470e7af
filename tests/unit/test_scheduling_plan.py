"""Job planning: every approved pair once, deterministic ids."""

from __future__ import annotations

from datetime import UTC, datetime

from contracts import messages as m
from scheduling.domain import PlannedDataset, plan_jobs

IMAGE = m.ImageRef(digest="sha256:" + "e" * 64, name="ev")
SPEC = m.BenchmarkSpec(benchmark_id="b", name="b", preparator=IMAGE, reference_model=IMAGE, evaluator=IMAGE,
                       metrics=(m.MetricSpec(name="auc"),), primary_metric="auc")
LATER = datetime(2100, 1, 1, tzinfo=UTC)
MODELS = {"m1": "sha256:" + "1" * 64, "m2": "sha256:" + "2" * 64}
DATASETS = [PlannedDataset("d1", "site-a", "sha256:" + "a" * 64, 10), PlannedDataset("d2", "site-b", "sha256:" + "b" * 64, 20)]


def test_every_model_meets_every_dataset_once() -> None:
    jobs = plan_jobs(SPEC, MODELS, DATASETS, set(), LATER)
    assert sorted((j.binding.model_id, j.binding.dataset_id, j.site_id) for j in jobs) == [
        ("m1", "d1", "site-a"), ("m1", "d2", "site-b"), ("m2", "d1", "site-a"), ("m2", "d2", "site-b")]
    assert len({j.job_id for j in jobs}) == 4


def test_planning_again_adds_nothing_and_ids_are_stable() -> None:
    first = plan_jobs(SPEC, MODELS, DATASETS, set(), LATER)
    assert plan_jobs(SPEC, MODELS, DATASETS, {j.job_id for j in first}, LATER) == []
    assert [j.job_id for j in plan_jobs(SPEC, MODELS, DATASETS, set(), LATER)] == [j.job_id for j in first]


def test_a_new_model_image_is_a_new_job() -> None:
    before = {j.job_id for j in plan_jobs(SPEC, MODELS, DATASETS, set(), LATER)}
    after = plan_jobs(SPEC, {**MODELS, "m1": "sha256:" + "3" * 64}, DATASETS, before, LATER)
    assert sorted(j.binding.dataset_id for j in after) == ["d1", "d2"]


def test_a_pair_whose_every_job_was_cancelled_is_planned_once_more_as_its_next_round() -> None:
    [first] = plan_jobs(SPEC, {"m1": MODELS["m1"]}, DATASETS[:1], set(), LATER)
    other = plan_jobs(SPEC, {"m2": MODELS["m2"]}, DATASETS[:1], set(), LATER)[0].job_id  # another pair's, standing
    rounds = {first.job_id, f"{first.job_id}-r1", other}

    [again] = plan_jobs(SPEC, MODELS, DATASETS[:1], rounds, LATER, cancelled=rounds - {other})
    assert again.job_id == f"{first.job_id}-r2" and again.binding == first.binding
    assert plan_jobs(SPEC, MODELS, DATASETS[:1], rounds, LATER, cancelled={first.job_id}) == [], "round 1 stands"
