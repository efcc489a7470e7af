"""The arithmetic both ends of a result share: metrics from confusion counts, the AUC of score histograms and its bin
error, and the one check that a result's aggregates agree with its metrics (at the site before it leaves, at the
leaderboard before it counts).

A histogram AUC counts a positive and a negative in the same bin as half a correct pair; the exact AUC counts that
pair 0, 1/2 or 1. So the two differ by at most half the share of such pairs: `bin_error` below, computed from the
histograms themselves and shown beside every pooled AUC.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from contracts.messages import (
    CONFUSION_KINDS,
    Confusion,
    Evidence,
    Histograms,
    MetricKind,
    MetricSpec,
    Pooling,
)

AGREEMENT = 1e-6  # how far a metric may lie from what its aggregates say: float noise, never a different answer


def denominator(kind: MetricKind, counts: Confusion) -> int:
    """The cases a confusion metric is a share of: its weight when sites are pooled."""
    return {
        MetricKind.SENSITIVITY: counts.tp + counts.fn, MetricKind.SPECIFICITY: counts.tn + counts.fp,
        MetricKind.PPV: counts.tp + counts.fp, MetricKind.NPV: counts.tn + counts.fn,
        MetricKind.ACCURACY: counts.tp + counts.fp + counts.tn + counts.fn,
    }[kind]


def numerator(kind: MetricKind, counts: Confusion) -> int:
    return {
        MetricKind.SENSITIVITY: counts.tp, MetricKind.SPECIFICITY: counts.tn, MetricKind.PPV: counts.tp,
        MetricKind.NPV: counts.tn, MetricKind.ACCURACY: counts.tp + counts.tn,
    }[kind]


def from_confusion(kind: MetricKind, counts: Confusion) -> float | None:
    """The metric the counts give; None where it is undefined (no case in its denominator)."""
    total = denominator(kind, counts)
    return numerator(kind, counts) / total if total else None


def add_confusion(parts: Iterable[Confusion]) -> Confusion:
    parts = list(parts)
    return Confusion(tp=sum(c.tp for c in parts), fp=sum(c.fp for c in parts), tn=sum(c.tn for c in parts),
                     fn=sum(c.fn for c in parts))


def add_histograms(parts: Iterable[Histograms]) -> Histograms:
    parts = list(parts)
    return Histograms(positive=tuple(map(sum, zip(*(h.positive for h in parts), strict=True))),
                      negative=tuple(map(sum, zip(*(h.negative for h in parts), strict=True))))


def histogram_auc(histograms: Histograms) -> tuple[float, float] | None:
    """The AUC of the histograms and its bin error (see the module); None without positives or negatives."""
    positives, negatives = sum(histograms.positive), sum(histograms.negative)
    if not positives or not negatives:
        return None
    below = correct = same_bin = 0.0
    for pos, neg in zip(histograms.positive, histograms.negative, strict=True):
        correct += pos * (below + neg / 2)
        same_bin += pos * neg
        below += neg
    pairs = positives * negatives
    return correct / pairs, same_bin / pairs / 2


def bin_of(score: float, pooling: Pooling) -> int:
    """The histogram bin of a score: equal bins of the score range, scores outside it in the end bins."""
    low, high = pooling.score_range
    clipped = min(max(score, low), high)  # first: a huge score would overflow the arithmetic
    return min(pooling.bins - 1, max(0, math.floor((clipped - low) / (high - low) * pooling.bins)))


def small_cells(counts: Iterable[int], minimum: int) -> bool:
    """Whether a cell holds fewer than `minimum` cases but some: such an aggregate is withheld."""
    return any(0 < count < minimum for count in counts)


def disagreement(evidence: Evidence, metrics: Mapping[str, float], declared: Iterable[MetricSpec], pooling: Pooling,
                 case_count: int) -> str | None:
    """Why the evidence does not fit the metrics it comes with (named, with the numbers), or None when it does."""
    specs = list(declared)
    kinds = {spec.name: spec.kind for spec in specs if spec.name in metrics}  # the metrics' own check names a gap
    expected = {spec.name for spec in specs if spec.kind is not None} if pooling.replicates else set()
    if set(evidence.replicates) != expected:
        return (f"replicates are given for {sorted(evidence.replicates)}; the benchmark asks for {sorted(expected)} "
                f"(every metric with a kind, {pooling.replicates} each)")
    for spec in specs:
        values = evidence.replicates.get(spec.name, ())
        if spec.name in evidence.replicates and len(values) != pooling.replicates:
            return f"{spec.name} has {len(values)} replicates; the benchmark asks for {pooling.replicates}"
        if any(not math.isfinite(v) or not spec.minimum <= v <= spec.maximum for v in values):
            return f"a replicate of {spec.name} is outside its declared range [{spec.minimum}, {spec.maximum}]"
    if (counts := evidence.confusion) is not None:
        if not pooling.confusion:
            return "it carries confusion counts, which the benchmark does not allow"
        if counts.tp + counts.fp + counts.tn + counts.fn != case_count:
            return f"the confusion counts add up to {counts.tp + counts.fp + counts.tn + counts.fn}, not {case_count}"
        if small_cells((counts.tp, counts.fp, counts.tn, counts.fn), pooling.min_count):
            return f"a confusion cell holds fewer than {pooling.min_count} cases (it should have been withheld)"
        for name, kind in kinds.items():
            if kind in CONFUSION_KINDS and (value := from_confusion(kind, counts)) is not None:
                if abs(value - metrics[name]) > AGREEMENT:
                    return f"{name} is {metrics[name]}, but the confusion counts give {value}"
    if (histograms := evidence.histograms) is not None:
        if not pooling.bins:
            return "it carries score histograms, which the benchmark does not allow"
        if len(histograms.positive) != pooling.bins or len(histograms.negative) != pooling.bins:
            return f"the histograms have {len(histograms.positive)} and {len(histograms.negative)} bins, " \
                   f"not {pooling.bins}"
        if sum(histograms.positive) + sum(histograms.negative) != case_count:
            return f"the histograms hold {sum(histograms.positive) + sum(histograms.negative)} cases, not {case_count}"
        if min(histograms.positive + histograms.negative) < 0:
            return "a histogram cell is negative"
        if small_cells(histograms.positive + histograms.negative, pooling.min_count):
            return f"a histogram cell holds fewer than {pooling.min_count} cases (it should have been withheld)"
        if counts is not None and sum(histograms.positive) != counts.tp + counts.fn:
            return (f"the histograms hold {sum(histograms.positive)} positive cases, the confusion counts "
                    f"{counts.tp + counts.fn}")
        auc = histogram_auc(histograms)
        for name, kind in kinds.items():
            if kind is MetricKind.AUC and auc is not None and abs(auc[0] - metrics[name]) > auc[1] + AGREEMENT:
                return (f"{name} is {metrics[name]}, but the histograms give {auc[0]} (within a bin error of "
                        f"{auc[1]})")
    return None
