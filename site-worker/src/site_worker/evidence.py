"""What a site computes from the evaluator's per-case scores (`cases.jsonl`), which never leave it: each metric with a
kind recomputed exactly, its paired bootstrap replicates, and the aggregates the benchmark allows for pooling.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contracts.messages import (
    CONFUSION_KINDS,
    Confusion,
    Evidence,
    Histograms,
    JobBinding,
    JobSpec,
    MetricKind,
    MetricSpec,
    Pooling,
)
from contracts.statistics import AGREEMENT, bin_of, disagreement, from_confusion, small_cells
from site_worker.containers import open_output

CASES_FILE = "/assay/out/cases.jsonl"  # as the evaluator sees it: the host's path is the site's business
LABELLED = (MetricKind.AUC, *CONFUSION_KINDS)  # the kinds that follow from `label` and `score`
CHUNK_CELLS = 1 << 21  # resampled cases held at once: B x n would be 10^9 at the largest


class CasesRefused(ValueError):
    """The cases file breaks its contract. The message names the line, the field and the rule, never a value the
    evaluator wrote: it leaves the site."""


@dataclass(frozen=True)
class Cases:
    """The cases of one evaluation sorted by case_id, so a resample picks the same cases whichever model ran."""

    case_ids: tuple[str, ...]
    labels: np.ndarray | None  # int 0/1, when a declared kind needs them
    scores: np.ndarray | None  # float64, alongside the labels
    values: dict[str, np.ndarray]  # each MEAN metric's per-case value


def _refused(number: int, field: str, rule: str) -> CasesRefused:
    return CasesRefused(f"{CASES_FILE} line {number}: {field} {rule}")


def _number(case: dict, field: str, number: int) -> float:
    value = case.get(field)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refused(number, field, "must be a number")
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        value = math.inf
    if not math.isfinite(value):
        raise _refused(number, field, "must be a finite number")
    return value


def _parse(line: bytes, number: int) -> dict:
    try:
        case = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise _refused(number, "the line", "must be UTF-8") from None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise _refused(number, "the line", "must be one JSON object") from None
    if not isinstance(case, dict):
        raise _refused(number, "the line", "must be one JSON object")
    if not isinstance(case.get("case_id"), str):
        raise _refused(number, "case_id", "must be a string")
    return case


def read_cases(path: Path, declared: Sequence[MetricSpec], limit_bytes: int) -> Cases:
    """The cases the evaluator wrote, with the fields the declared kinds need; anything else on a line is ignored."""
    stream = open_output(path)
    if stream is None:
        raise CasesRefused(f"{CASES_FILE} is not a regular file: it was not written, or it is a link or a pipe")
    with stream:
        content = stream.read(limit_bytes + 1)
    if len(content) > limit_bytes:
        raise CasesRefused(f"{CASES_FILE} is over {limit_bytes} bytes")
    labelled = any(spec.kind in LABELLED for spec in declared)
    means = [spec.name for spec in declared if spec.kind is MetricKind.MEAN]
    rows: dict[str, tuple[int, int, float, tuple[float, ...]]] = {}
    for number, line in enumerate(content.split(b"\n"), start=1):
        if not line.strip():
            continue
        case = _parse(line, number)
        if case["case_id"] in rows:
            raise _refused(number, "case_id", f"repeats the case_id of line {rows[case['case_id']][0]}")
        label, score = 0, 0.0
        if labelled:
            label = case.get("label")
            if type(label) is not int or label not in (0, 1):  # True is an int to Python, not a label
                raise _refused(number, "label", "must be the integer 0 or 1")
            score = _number(case, "score", number)
        rows[case["case_id"]] = (number, label, score, tuple(_number(case, name, number) for name in means))
    if not rows:
        raise CasesRefused(f"{CASES_FILE} holds no case")
    ids = tuple(sorted(rows))
    ordered = [rows[case_id] for case_id in ids]
    return Cases(case_ids=ids,
                 labels=np.array([row[1] for row in ordered], dtype=np.int64) if labelled else None,
                 scores=np.array([row[2] for row in ordered], dtype=np.float64) if labelled else None,
                 values={name: np.array([row[3][i] for row in ordered], dtype=np.float64)
                         for i, name in enumerate(means)})


def _auc(cases: Cases, draws: np.ndarray) -> np.ndarray:
    """The Mann-Whitney AUC (a tie counts 1/2) of each row of case indices, from per-score-group counts: O(rows x n),
    never positives x negatives."""
    groups = np.unique(cases.scores, return_inverse=True)[1]
    width = 2 * (int(groups.max()) + 1)
    cells = groups * 2 + cases.labels  # a case's (score group, label) cell
    keys = (np.arange(len(draws))[:, None] * width + cells[draws]).ravel()
    counts = np.bincount(keys, minlength=len(draws) * width).reshape(len(draws), width // 2, 2)
    negative, positive = counts[..., 0], counts[..., 1]
    twice_correct = (positive * (2 * np.cumsum(negative, axis=1) - negative)).sum(axis=1)  # exact integers
    pairs = positive.sum(axis=1) * negative.sum(axis=1)
    return np.where(pairs > 0, twice_correct / (2.0 * np.maximum(pairs, 1)), np.nan)


def _share(kind: MetricKind, cases: Cases, draws: np.ndarray, threshold: float) -> np.ndarray:
    """A confusion metric of each row of case indices; NaN where its denominator is empty."""
    truth, predicted = cases.labels[draws] == 1, cases.scores[draws] >= threshold
    tp, fp = (truth & predicted).sum(axis=1), (~truth & predicted).sum(axis=1)
    tn, fn = (~truth & ~predicted).sum(axis=1), (truth & ~predicted).sum(axis=1)
    numerator, denominator = {
        MetricKind.SENSITIVITY: (tp, tp + fn), MetricKind.SPECIFICITY: (tn, tn + fp), MetricKind.PPV: (tp, tp + fp),
        MetricKind.NPV: (tn, tn + fn), MetricKind.ACCURACY: (tp + tn, tp + fp + tn + fn),
    }[kind]
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def _values(kind: MetricKind, cases: Cases, name: str, threshold: float, draws: np.ndarray) -> np.ndarray:
    """A metric of each row of case indices; NaN where it is undefined."""
    if kind is MetricKind.MEAN:
        return cases.values[name][draws].mean(axis=1)
    return _auc(cases, draws) if kind is MetricKind.AUC else _share(kind, cases, draws, threshold)


UNDEFINED = {MetricKind.AUC: "needs at least one positive and one negative case",
             MetricKind.SENSITIVITY: "needs at least one positive case",
             MetricKind.SPECIFICITY: "needs at least one negative case",
             MetricKind.PPV: "needs at least one case predicted positive",
             MetricKind.NPV: "needs at least one case predicted negative",
             MetricKind.ACCURACY: "needs at least one case", MetricKind.MEAN: "needs at least one case"}


def metric_on(kind: MetricKind, cases: Cases, name: str, threshold: float) -> float:
    """The metric on all the cases; refused where it is undefined."""
    if kind in CONFUSION_KINDS:  # from the counts, as the board checks it
        value = from_confusion(kind, confusion_of(cases, threshold))
    else:
        value = float(_values(kind, cases, name, threshold, np.arange(len(cases.case_ids))[None, :])[0])
    if value is None or math.isnan(value):
        raise CasesRefused(f"{CASES_FILE} gives no {name}: {kind.value} {UNDEFINED[kind]}")
    return value


def resample(cases: Cases, benchmark_id: str, dataset_hash: str, r: int) -> np.ndarray:
    """The case indices of replicate r: seeded by benchmark, dataset and r alone, never by a model or its scores."""
    digest = hashlib.sha256(f"{benchmark_id}\n{dataset_hash}".encode()).digest()
    rng = np.random.default_rng([*(int.from_bytes(digest[i:i + 4], "big") for i in range(0, 16, 4)), r])
    if cases.labels is None:
        return rng.integers(0, len(cases.case_ids), len(cases.case_ids))
    # Stratified: each replicate keeps the site's positive and negative counts, so the board's sum of sites'
    # replicates weighted by positives (or negatives) is exactly a replicate of the pooled metric.
    positives, negatives = np.flatnonzero(cases.labels == 1), np.flatnonzero(cases.labels == 0)
    return np.concatenate([positives[rng.integers(0, len(positives), len(positives))],
                           negatives[rng.integers(0, len(negatives), len(negatives))]])


def bootstrap(cases: Cases, specs: Sequence[MetricSpec], pooling: Pooling, binding: JobBinding
              ) -> dict[str, tuple[float, ...]]:
    """B replicates of each metric, every metric of a replicate on the same resample. Where a metric is undefined on
    a resample (PPV with no case predicted positive), the replicate takes its value on all cases. Each is rounded to
    6 decimals (intervals are far wider; it shrinks what travels) and kept in the declared range."""
    whole = {spec.name: metric_on(spec.kind, cases, spec.name, pooling.threshold) for spec in specs}
    found: dict[str, list[np.ndarray]] = {spec.name: [] for spec in specs}
    step = max(1, CHUNK_CELLS // len(cases.case_ids))
    for start in range(0, pooling.replicates, step):
        stop = min(start + step, pooling.replicates)
        draws = np.stack([resample(cases, binding.benchmark_id, binding.dataset_hash, r) for r in range(start, stop)])
        for spec in specs:
            values = _values(spec.kind, cases, spec.name, pooling.threshold, draws)
            found[spec.name].append(np.where(np.isnan(values), whole[spec.name], values))
    return {spec.name: tuple(np.clip(np.round(np.concatenate(found[spec.name]), 6), spec.minimum,
                                     spec.maximum).tolist()) for spec in specs}


def confusion_of(cases: Cases, threshold: float) -> Confusion:
    truth, predicted = cases.labels == 1, cases.scores >= threshold
    return Confusion(tp=int((truth & predicted).sum()), fp=int((~truth & predicted).sum()),
                     tn=int((~truth & ~predicted).sum()), fn=int((truth & ~predicted).sum()))


def histograms_of(cases: Cases, pooling: Pooling) -> Histograms:
    # Clipped into the range first: the same end bins, and a score like 1e308 cannot overflow bin_of's arithmetic.
    scores = np.clip(cases.scores, *pooling.score_range)
    bins = np.array([bin_of(float(score), pooling) for score in scores], dtype=np.int64)
    return Histograms(positive=tuple(np.bincount(bins[cases.labels == 1], minlength=pooling.bins).tolist()),
                      negative=tuple(np.bincount(bins[cases.labels == 0], minlength=pooling.bins).tolist()))


def _check_agreement(cases: Cases, specs: Sequence[MetricSpec], job: JobSpec, metrics: Mapping[str, float]) -> None:
    if len(cases.case_ids) != job.binding.case_count:
        raise CasesRefused(f"{CASES_FILE} does not hold the {job.binding.case_count} cases the dataset registered")
    for spec in specs:
        value = metrics.get(spec.name)
        if value is None or abs(metric_on(spec.kind, cases, spec.name, job.pooling.threshold) - value) > AGREEMENT:
            raise CasesRefused(f"metrics.json's {spec.name} disagrees with the cases it scored in cases.jsonl")


def evidence_of(cases: Cases, job: JobSpec, metrics: Mapping[str, float]) -> Evidence | None:
    """The evidence the benchmark asks of this result, checked against its metrics; None where it asks for none."""
    pooling = job.pooling
    if pooling is None:
        return None
    specs = [spec for spec in job.metrics if spec.kind is not None]
    _check_agreement(cases, specs, job, metrics)
    scored = cases.labels is not None and cases.scores is not None
    if not ((specs and pooling.replicates) or (scored and (pooling.confusion or pooling.bins))):
        return None
    withheld: list[str] = []
    confusion = histograms = None
    if scored and pooling.confusion:
        confusion = confusion_of(cases, pooling.threshold)
        if small_cells((confusion.tp, confusion.fp, confusion.tn, confusion.fn), pooling.min_count):
            confusion = None
            withheld.append(f"confusion counts: a cell holds fewer than {pooling.min_count} cases")
    if scored and pooling.bins:
        histograms = histograms_of(cases, pooling)
        if small_cells(histograms.positive + histograms.negative, pooling.min_count):
            histograms = None
            withheld.append(f"score histograms: a bin holds fewer than {pooling.min_count} cases")
    replicates = bootstrap(cases, specs, pooling, job.binding) if pooling.replicates else {}
    evidence = Evidence(replicates=replicates, confusion=confusion, histograms=histograms, withheld=tuple(withheld))
    if disagreement(evidence, metrics, job.metrics, pooling, job.binding.case_count) is not None:
        # its reason quotes numbers from the cases, which stay here
        raise CasesRefused(f"{CASES_FILE}: its aggregates disagree with metrics.json")
    return evidence
