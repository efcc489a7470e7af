"""The site's evidence from cases.jsonl: exact metrics, paired stratified bootstrap replicates, withheld aggregates,
and the cases files it refuses without quoting them."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from contracts import messages as m
from contracts.statistics import disagreement
from site_worker.evidence import (
    Cases,
    CasesRefused,
    bootstrap,
    evidence_of,
    metric_on,
    read_cases,
    resample,
)

LATER = datetime(2100, 1, 1, tzinfo=UTC)
DATASET = "sha256:" + "a" * 64
OTHER_DATASET = "sha256:" + "b" * 64
IMAGE = "sha256:" + "c" * 64
AUC = m.MetricSpec(name="auc", kind=m.MetricKind.AUC)
SENSITIVITY = m.MetricSpec(name="sensitivity", kind=m.MetricKind.SENSITIVITY)
PPV = m.MetricSpec(name="ppv", kind=m.MetricKind.PPV)
LOSS = m.MetricSpec(name="loss", kind=m.MetricKind.MEAN)
LIMIT = 1 << 20


def cases_of(labels: list[int] | np.ndarray | None, scores: list[float] | np.ndarray | None = None,
             **values: list[float] | np.ndarray) -> Cases:
    n = len(labels) if labels is not None else len(next(iter(values.values())))
    return Cases(case_ids=tuple(f"c{i:06d}" for i in range(n)),
                 labels=None if labels is None else np.asarray(labels, dtype=np.int64),
                 scores=None if scores is None else np.asarray(scores, dtype=np.float64),
                 values={name: np.asarray(v, dtype=np.float64) for name, v in values.items()})


def random_cases(n: int, seed: int = 0) -> Cases:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.round(np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1), 2)  # rounded: many ties
    return cases_of(labels, scores, loss=rng.random(n))


def job_for(declared: tuple[m.MetricSpec, ...], pooling: m.Pooling | None, case_count: int,
            dataset_hash: str = DATASET) -> m.JobSpec:
    bound = m.JobBinding(benchmark_id="b", model_id="mod", dataset_id="ds", model_image=IMAGE, evaluator_image=IMAGE,
                         dataset_hash=dataset_hash, case_count=case_count)
    return m.JobSpec(job_id="job-1", site_id="s", binding=bound, metrics=declared, expires_at=LATER, pooling=pooling)


def exact_metrics(cases: Cases, declared: tuple[m.MetricSpec, ...], threshold: float = 0.5) -> dict[str, float]:
    return {spec.name: metric_on(spec.kind, cases, spec.name, threshold) for spec in declared}


def write_cases(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_auc_matches_scikit_learn_with_ties() -> None:
    labels, scores = [0, 0, 1, 1, 0, 1, 1, 0], [0.1, 0.5, 0.5, 0.9, 0.5, 0.3, 0.9, 0.9]
    assert metric_on(m.MetricKind.AUC, cases_of(labels, scores), "auc", 0.5) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=2, max_size=60).filter(
    lambda pairs: len({label for label, _ in pairs}) == 2))
def test_auc_matches_scikit_learn_on_any_cases_with_both_classes(pairs: list[tuple[int, int]]) -> None:
    labels, scores = [label for label, _ in pairs], [score / 6 for _, score in pairs]
    assert metric_on(m.MetricKind.AUC, cases_of(labels, scores), "auc", 0.5) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12)


def test_confusion_metrics_count_a_score_at_the_threshold_as_positive() -> None:
    cases = cases_of([1, 1, 1, 0, 0], [0.5, 0.7, 0.2, 0.5, 0.1])
    assert metric_on(m.MetricKind.SENSITIVITY, cases, "s", 0.5) == pytest.approx(2 / 3)
    assert metric_on(m.MetricKind.SPECIFICITY, cases, "s", 0.5) == pytest.approx(1 / 2)
    assert metric_on(m.MetricKind.PPV, cases, "s", 0.5) == pytest.approx(2 / 3)
    assert metric_on(m.MetricKind.NPV, cases, "s", 0.5) == pytest.approx(1 / 2)
    assert metric_on(m.MetricKind.ACCURACY, cases, "s", 0.5) == pytest.approx(3 / 5)
    assert metric_on(m.MetricKind.MEAN, cases_of(None, loss=[1.0, 2.0, 6.0]), "loss", 0.5) == pytest.approx(3.0)


def test_an_undefined_metric_is_refused_and_says_why() -> None:
    negatives_only = cases_of([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(CasesRefused, match="sensitivity needs at least one positive case"):
        metric_on(m.MetricKind.SENSITIVITY, negatives_only, "sensitivity", 0.5)
    with pytest.raises(CasesRefused, match="auc needs at least one positive and one negative case"):
        metric_on(m.MetricKind.AUC, negatives_only, "auc", 0.5)
    with pytest.raises(CasesRefused, match="ppv needs at least one case predicted positive"):
        metric_on(m.MetricKind.PPV, negatives_only, "ppv", 0.5)


def test_a_resample_is_drawn_from_the_documented_seed() -> None:
    cases = random_cases(50)
    digest = hashlib.sha256(f"b\n{DATASET}".encode()).digest()
    words = [int.from_bytes(digest[i:i + 4], "big") for i in range(0, 16, 4)]
    positives, negatives = np.flatnonzero(cases.labels == 1), np.flatnonzero(cases.labels == 0)
    for r in (0, 1, 7):
        rng = np.random.default_rng([*words, r])
        expected = np.concatenate([positives[rng.integers(0, len(positives), len(positives))],
                                   negatives[rng.integers(0, len(negatives), len(negatives))]])
        assert np.array_equal(resample(cases, "b", DATASET, r), expected)


def test_each_replicate_is_the_metric_on_its_resample() -> None:
    cases = random_cases(120, seed=3)
    declared = (AUC, SENSITIVITY, LOSS)
    replicates = bootstrap(cases, declared, m.Pooling(replicates=25), job_for(declared, None, 120).binding)
    for r in range(25):  # the slow way, one replicate at a time
        idx = resample(cases, "b", DATASET, r)
        labels, scores = cases.labels[idx], cases.scores[idx]
        assert replicates["auc"][r] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
        assert replicates["sensitivity"][r] == pytest.approx(
            ((scores >= 0.5) & (labels == 1)).sum() / (labels == 1).sum(), abs=1e-6)
        assert replicates["loss"][r] == pytest.approx(cases.values["loss"][idx].mean(), abs=1e-6)


def test_replicates_span_chunks_the_same_as_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    cases = random_cases(200, seed=4)
    binding = job_for((AUC,), None, 200).binding
    whole = bootstrap(cases, (AUC, PPV), m.Pooling(replicates=30), binding)
    monkeypatch.setattr("site_worker.evidence.CHUNK_CELLS", 1)  # one replicate per chunk
    assert bootstrap(cases, (AUC, PPV), m.Pooling(replicates=30), binding) == whole


def test_resamples_are_paired_across_models_and_never_depend_on_scores() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 80)
    model_a, model_b = cases_of(labels, rng.random(80)), cases_of(labels, rng.random(80))
    for r in range(10):
        assert np.array_equal(resample(model_a, "b", DATASET, r), resample(model_b, "b", DATASET, r))
    binding, pooling = job_for((AUC,), None, 80).binding, m.Pooling(replicates=50)
    copy_of_a = cases_of(labels, model_a.scores.copy())
    assert bootstrap(model_a, (AUC,), pooling, binding) == bootstrap(copy_of_a, (AUC,), pooling, binding)
    assert bootstrap(model_a, (AUC,), pooling, binding) != bootstrap(model_b, (AUC,), pooling, binding)


def test_another_dataset_draws_other_resamples() -> None:
    cases, pooling = random_cases(100, seed=6), m.Pooling(replicates=20)
    here = bootstrap(cases, (AUC,), pooling, job_for((AUC,), None, 100).binding)
    there = bootstrap(cases, (AUC,), pooling, job_for((AUC,), None, 100, dataset_hash=OTHER_DATASET).binding)
    assert here != there


def test_each_replicate_keeps_the_sites_positive_and_negative_counts() -> None:
    cases = random_cases(97, seed=7)
    positives = int(cases.labels.sum())
    replicates = bootstrap(cases, (SENSITIVITY,), m.Pooling(replicates=200), job_for((), None, 97).binding)
    counts = np.array(replicates["sensitivity"]) * positives
    assert np.allclose(counts, np.round(counts), atol=1e-4)
    assert len(set(replicates["sensitivity"])) > 1
    for r in range(20):
        assert cases.labels[resample(cases, "b", DATASET, r)].sum() == positives


def test_without_labels_the_resample_draws_from_all_cases() -> None:
    cases = cases_of(None, loss=np.arange(40.0))
    draws = np.concatenate([resample(cases, "b", DATASET, r) for r in range(50)])
    assert draws.min() == 0 and draws.max() == 39 and len(draws) == 50 * 40


def test_a_replicate_where_the_metric_is_undefined_takes_its_value_on_all_cases() -> None:
    # cases 0 (positive) and 2 (negative) are the only ones predicted positive: PPV 1/2 on all cases
    cases = cases_of([1, 1, 0, 0, 0, 0, 0, 0], [0.9, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1])
    replicates = bootstrap(cases, (PPV,), m.Pooling(replicates=200), job_for((), None, 8).binding)["ppv"]
    undefined = [r for r in range(200) if not {0, 2} & set(resample(cases, "b", DATASET, r).tolist())]
    assert undefined and all(replicates[r] == 0.5 for r in undefined)
    assert {0.0, 1.0} <= set(replicates)  # the others are the resample's own PPV


def test_replicates_are_rounded_and_kept_in_their_declared_range() -> None:
    loss = m.MetricSpec(name="loss", kind=m.MetricKind.MEAN, minimum=0.0, maximum=0.5)
    cases = cases_of(None, loss=np.random.default_rng(8).random(30) / 3 + 0.33)
    replicates = bootstrap(cases, (loss,), m.Pooling(replicates=300), job_for((), None, 30).binding)["loss"]
    assert max(replicates) <= 0.5 and all(round(value, 6) == value for value in replicates)


def test_a_metric_that_disagrees_with_its_cases_is_refused_without_its_value() -> None:
    cases = random_cases(60, seed=9)
    metrics = exact_metrics(cases, (AUC, SENSITIVITY))
    metrics["auc"] = 0.123456
    job = job_for((AUC, SENSITIVITY), m.Pooling(replicates=10), 60)
    with pytest.raises(CasesRefused, match="metrics.json's auc disagrees with the cases it scored") as refused:
        evidence_of(cases, job, metrics)
    assert "0.123" not in str(refused.value)


def test_cases_that_are_not_the_registered_cases_are_refused() -> None:
    cases = random_cases(60, seed=9)
    with pytest.raises(CasesRefused, match="does not hold the 61 cases"):
        evidence_of(cases, job_for((AUC,), m.Pooling(replicates=10), 61), exact_metrics(cases, (AUC,)))


def test_small_confusion_cells_are_withheld_and_said_so() -> None:
    cases = cases_of([1] * 3 + [0] * 20, [0.9] * 3 + [0.1] * 20)  # tp = 3: fewer than 5
    job = job_for((SENSITIVITY,), m.Pooling(replicates=0, confusion=True), 23)
    evidence = evidence_of(cases, job, exact_metrics(cases, (SENSITIVITY,)))
    assert evidence.confusion is None and evidence.replicates == {}
    assert evidence.withheld == ("confusion counts: a cell holds fewer than 5 cases",)


def test_small_histogram_bins_are_withheld_and_said_so() -> None:
    cases = cases_of([1] * 10 + [0] * 12, [0.95] * 10 + [0.05] * 10 + [0.55] * 2)
    job = job_for((AUC,), m.Pooling(replicates=0, bins=10, min_count=3), 22)
    evidence = evidence_of(cases, job, exact_metrics(cases, (AUC,)))
    assert evidence.histograms is None
    assert evidence.withheld == ("score histograms: a bin holds fewer than 3 cases",)


def test_aggregates_are_sent_when_every_cell_is_large_enough_and_agree_with_the_metrics() -> None:
    cases = random_cases(2000, seed=10)
    declared = (AUC, SENSITIVITY, PPV, LOSS, m.MetricSpec(name="free"))
    pooling = m.Pooling(replicates=50, confusion=True, bins=5)
    metrics = {**exact_metrics(cases, declared[:4]), "free": 0.3}
    job = job_for(declared, pooling, 2000)

    evidence = evidence_of(cases, job, metrics)

    counts = evidence.confusion
    assert counts.tp + counts.fn == cases.labels.sum() and counts.tp + counts.fp + counts.tn + counts.fn == 2000
    assert sum(evidence.histograms.positive) == cases.labels.sum() and len(evidence.histograms.negative) == 5
    assert set(evidence.replicates) == {"auc", "sensitivity", "ppv", "loss"} and evidence.withheld == ()
    assert all(len(values) == 50 for values in evidence.replicates.values())
    assert disagreement(evidence, metrics, declared, pooling, 2000) is None


def test_a_huge_score_falls_in_the_top_bin() -> None:
    cases = cases_of([1] * 5 + [0] * 5, [1e308] * 5 + [-1e308] * 5)
    job = job_for((AUC,), m.Pooling(replicates=0, bins=4), 10)
    assert evidence_of(cases, job, exact_metrics(cases, (AUC,))).histograms == m.Histograms(
        positive=(0, 0, 0, 5), negative=(5, 0, 0, 0))


def test_no_pooling_or_nothing_to_pool_gives_no_evidence() -> None:
    cases = random_cases(30)
    free = m.MetricSpec(name="free")
    assert evidence_of(cases, job_for((AUC,), None, 30), exact_metrics(cases, (AUC,))) is None
    assert evidence_of(cases, job_for((free,), m.Pooling(), 30), {"free": 0.2}) is None
    assert evidence_of(cases, job_for((AUC,), m.Pooling(replicates=0), 30), exact_metrics(cases, (AUC,))) is None


def test_cases_are_read_sorted_with_the_fields_the_kinds_need(tmp_path: Path) -> None:
    path = write_cases(tmp_path, ['{"case_id": "b", "label": 1, "score": 0.75, "loss": 2, "note": "x"}', "",
                                  '{"case_id": "a", "label": 0, "score": 1e-3, "loss": 0.5}'])
    cases = read_cases(path, (AUC, LOSS), LIMIT)
    assert cases.case_ids == ("a", "b") and cases.labels.tolist() == [0, 1] and cases.scores.tolist() == [1e-3, 0.75]
    assert cases.values["loss"].tolist() == [0.5, 2.0]
    means_only = read_cases(path, (LOSS, m.MetricSpec(name="free")), LIMIT)
    assert means_only.labels is None and means_only.scores is None


SECRET = "Jane Doe"


@pytest.mark.parametrize(("line", "field", "rule"), [
    (f'{{"case_id": "{SECRET}", "label": 1, "score": 0.4}}', "case_id", "repeats the case_id of line 1"),
    ('{"case_id": "c2", "label": 1, "score": NaN}', "score", "must be a finite number"),
    ('{"case_id": "c2", "label": 1, "score": 1e999}', "score", "must be a finite number"),
    ('{"case_id": "c2", "label": 1, "score": 12345678901234567890' + "0" * 400 + '}', "score", "finite number"),
    (f'{{"case_id": "c2", "label": 1, "score": "{SECRET}"}}', "score", "must be a number"),
    ('{"case_id": "c2", "label": 7, "score": 0.4}', "label", "must be the integer 0 or 1"),
    ('{"case_id": "c2", "label": true, "score": 0.4}', "label", "must be the integer 0 or 1"),
    ('{"case_id": "c2", "label": 1.0, "score": 0.4}', "label", "must be the integer 0 or 1"),
    ('{"case_id": "c2", "score": 0.4}', "label", "must be the integer 0 or 1"),
    (f'{{"case_id": "{SECRET}", "label": 1, ', "the line", "must be one JSON object"),
    (f'["{SECRET}"]', "the line", "must be one JSON object"),
    ("[" * 100_000, "the line", "must be one JSON object"),
    ('{"case_id": 77, "label": 1, "score": 0.4}', "case_id", "must be a string"),
    ('{"label": 1, "score": 0.4}', "case_id", "must be a string"),
])
def test_a_bad_line_is_refused_naming_line_and_field_never_the_value(tmp_path: Path, line: str, field: str,
                                                                      rule: str) -> None:
    path = write_cases(tmp_path, [f'{{"case_id": "{SECRET}", "label": 0, "score": 0.1}}', line])
    with pytest.raises(CasesRefused) as refused:
        read_cases(path, (AUC,), LIMIT)
    message = str(refused.value)
    assert message.startswith("/assay/out/cases.jsonl line 2: ") and field in message and rule in message
    for written in (SECRET, "NaN", "nan", "999", "inf", "true", "True", "7", "1.0", "77", "12345"):
        assert written not in message


def test_a_mean_metric_needs_a_finite_number_under_its_own_name(tmp_path: Path) -> None:
    path = write_cases(tmp_path, ['{"case_id": "a", "loss": 0.5}', '{"case_id": "b", "lost": 0.5}'])
    with pytest.raises(CasesRefused, match="line 2: loss must be a number"):
        read_cases(path, (LOSS,), LIMIT)


def test_a_line_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cases.jsonl"
    path.write_bytes(b'{"case_id": "a", "loss": 1}\n{"case_id": "\xff\xfe", "loss": 1}\n')
    with pytest.raises(CasesRefused, match="line 2: the line must be UTF-8"):
        read_cases(path, (LOSS,), LIMIT)


def test_a_missing_linked_empty_or_oversized_cases_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CasesRefused, match="is not a regular file"):
        read_cases(tmp_path / "cases.jsonl", (AUC,), LIMIT)
    (tmp_path / "elsewhere").mkdir()
    secret = write_cases(tmp_path / "elsewhere", ['{"case_id": "a", "label": 1, "score": 0.4}'])
    link = tmp_path / "link.jsonl"
    link.symlink_to(secret)
    with pytest.raises(CasesRefused, match="is not a regular file"):
        read_cases(link, (AUC,), LIMIT)
    with pytest.raises(CasesRefused, match="is over 10 bytes"):
        read_cases(secret, (AUC,), 10)
    with pytest.raises(CasesRefused, match="holds no case"):
        read_cases(write_cases(tmp_path, ["", "  "]), (AUC,), LIMIT)


def test_a_thousand_replicates_of_ten_thousand_cases_complete() -> None:
    cases = random_cases(10_000, seed=11)
    declared = (AUC, SENSITIVITY, PPV, LOSS)
    pooling = m.Pooling(replicates=1000, confusion=True, bins=20)
    evidence = evidence_of(cases, job_for(declared, pooling, 10_000), exact_metrics(cases, declared))
    assert all(len(values) == 1000 for values in evidence.replicates.values())
