"""How accepted results become a board: each metric pooled as exactly as its aggregates allow, 95% intervals from the
sites' paired bootstrap replicates (site as stratum), ranks that are shared where intervals overlap, the distribution
of each model's rank across replicates, and how stable the ranking is.

Pooling, per metric and per set of results (a model's results, or one site's):
- a confusion metric (sensitivity, specificity, PPV, NPV, accuracy) from the summed confusion counts: exact, and the
  same as weighing each site's value by its own denominator (its positives, for sensitivity);
- an AUC from the summed score histograms: the AUC over all the sites' cases, to within the bin error it reports;
- a mean of per-case values by cases: exact;
- anything else, or where a site withheld its aggregate, the case-weighted mean of the site values, named so.
Replicate r of a pooled value is the pooled value moved by the weighted mean of each site's replicate-r deviation from
its own value, with the weights of the pooling (positives for sensitivity, positive x negative pairs for an AUC, ...):
for the means it is exactly the pooled value of the resampled sites.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from contracts.messages import (
    CONFUSION_KINDS,
    BenchmarkSpec,
    Confusion,
    Histograms,
    Interval,
    Leaderboard,
    LeaderboardRow,
    MetricKind,
    MetricSpec,
    SiteValue,
)
from contracts.statistics import add_confusion, add_histograms, denominator, from_confusion, histogram_auc

TIE_REL_TOL = 1e-9  # pooled values are weighted sums: two models with the same site values may differ in the last bits
LEVEL = 95.0


@dataclass(frozen=True)
class Score:
    """One accepted result, as the board needs it."""

    model_id: str
    site_id: str
    metrics: Mapping[str, float]
    case_count: int
    replicates: Mapping[str, np.ndarray] = field(default_factory=dict)
    confusion: Confusion | None = None
    histograms: Histograms | None = None


@dataclass(frozen=True)
class Pooled:
    value: float
    method: str
    replicates: np.ndarray | None = None
    bin_error: float | None = None
    interval: Interval | None = None  # of the replicates: `with_intervals` computes them for many at once


def with_intervals(pools: Mapping[tuple[str, str], Pooled]) -> dict[tuple[str, str], Pooled]:
    """`pools` with the percentile interval of each one's replicates, in one numpy call (thousands per board)."""
    keys = [key for key, p in pools.items() if p.replicates is not None]
    done = dict(pools)
    if keys:
        bounds = np.percentile(np.stack([pools[k].replicates for k in keys]),  # type: ignore[misc]
                               [(100 - LEVEL) / 2, (100 + LEVEL) / 2], axis=1)
        for key, low, high in zip(keys, bounds[0], bounds[1], strict=True):
            done[key] = replace(pools[key], interval=Interval(low=float(low), high=float(high)))
    return done


def _weighted(parts: Sequence[Score], name: str, weights: Sequence[float], value: float, method: str,
              bin_error: float | None = None) -> Pooled:
    """`value` with its replicates: each part's replicate deviations, weighted by `weights`, around it."""
    total = float(sum(weights))
    replicates = None
    if all(name in part.replicates for part in parts):
        deviations = np.stack([part.replicates[name] - part.metrics[name] for part in parts])
        replicates = value + np.asarray(weights, dtype=np.float64) @ deviations / total
    return Pooled(value, method, replicates, bin_error)


def _case_weighted(parts: Sequence[Score], name: str, method: str) -> Pooled:
    cases = [part.case_count for part in parts]
    value = sum(part.metrics[name] * n for part, n in zip(parts, cases, strict=True)) / sum(cases)
    return _weighted(parts, name, cases, value, method)


def pool(spec: MetricSpec, parts: Sequence[Score]) -> Pooled:
    """One metric over `parts` (see the module)."""
    name, kind = spec.name, spec.kind
    if len(parts) == 1:  # one result (a site's, most often): its value is exact, its replicates its own
        return Pooled(parts[0].metrics[name], "exact: one site's own value", parts[0].replicates.get(name))
    if kind in CONFUSION_KINDS and all(part.confusion is not None for part in parts):
        counts = [part.confusion for part in parts]
        weights = [denominator(kind, c) for c in counts]  # type: ignore[arg-type]
        value = from_confusion(kind, add_confusion(counts))  # type: ignore[arg-type]
        if value is not None:
            return _weighted(parts, name, weights, value, "exact: pooled confusion counts")
    if kind is MetricKind.AUC and all(part.histograms is not None for part in parts):
        summed = histogram_auc(add_histograms(part.histograms for part in parts))  # type: ignore[misc]
        if summed is not None:
            pairs = [sum(p.histograms.positive) * sum(p.histograms.negative) for p in parts]  # type: ignore[union-attr]
            return _weighted(parts, name, pairs, summed[0], "exact: pooled score histograms", bin_error=summed[1])
    if kind is MetricKind.MEAN:
        return _case_weighted(parts, name, "exact: case-weighted mean of per-case values")
    if kind is None:
        return _case_weighted(parts, name, "case-weighted mean of site values")
    return _case_weighted(parts, name, "case-weighted mean of site values (a site withheld its aggregates)")


def better(a: float, b: float, higher_is_better: bool) -> bool:
    """Whether `a` is better than `b` beyond float noise."""
    if math.isclose(a, b, rel_tol=TIE_REL_TOL):
        return False
    return a > b if higher_is_better else a < b


def shared_ranks(values: Sequence[float], intervals: Sequence[Interval | None], higher_is_better: bool) -> list[int]:
    """1 + how many models beat each beyond doubt: with intervals on both, one beats another when its whole interval
    lies on the better side of the other's; without, when its value is better. Overlapping models share a rank."""
    ranks = []
    for i, (value, interval) in enumerate(zip(values, intervals, strict=True)):
        beaten_by = 0
        for j, (other, other_interval) in enumerate(zip(values, intervals, strict=True)):
            if i == j:
                continue
            if interval is not None and other_interval is not None:
                beaten_by += (other_interval.low > interval.high if higher_is_better
                              else other_interval.high < interval.low)
            else:
                beaten_by += better(other, value, higher_is_better)
        ranks.append(1 + beaten_by)
    return ranks


def rank_distribution(replicates: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """(models, models): P(model i has rank k+1) across the replicates (columns of `replicates`, models x B); a
    replicate's rank is 1 + how many models do strictly better in it."""
    signed = replicates if higher_is_better else -replicates
    ranks = 1 + (signed[None, :, :] > signed[:, None, :]).sum(axis=1)  # [i, r]: models beating i in replicate r
    models = replicates.shape[0]
    return np.stack([(ranks == k + 1).mean(axis=1) for k in range(models)], axis=1)


def kendall_tau(point: np.ndarray, replicates: np.ndarray) -> float | None:
    """Median over replicates of Kendall's tau-b between the point values and each replicate's values (vectorised
    over replicates, which scipy's per-pair function is not); None for fewer than two models."""
    if len(point) < 2:
        return None
    upper = np.triu_indices(len(point), k=1)
    ours = np.sign(point[:, None] - point[None, :])[upper].astype(np.int8)  # (pairs,)
    theirs = np.sign(replicates[:, None, :] - replicates[None, :, :])[upper].astype(np.int8)  # (pairs, B)
    agree = (ours[:, None].astype(np.int32) * theirs).sum(axis=0)
    scale = np.sqrt(np.abs(ours).sum() * np.abs(theirs).sum(axis=0).astype(np.float64))
    taus = agree[scale > 0] / scale[scale > 0]
    return float(np.median(taus)) if len(taus) else None


@dataclass(frozen=True)
class ModelBoard:
    model_id: str
    pooled: dict[str, Pooled]
    sites: dict[str, dict[str, Pooled]]
    site_cases: dict[str, int]
    case_count: int


def model_board(model_id: str, scores: Sequence[Score], specs: Sequence[MetricSpec]) -> ModelBoard:
    by_site: dict[str, list[Score]] = defaultdict(list)
    for score in scores:
        by_site[score.site_id].append(score)
    pools = {("", spec.name): pool(spec, scores) for spec in specs}
    pools |= {(site, spec.name): pool(spec, parts) for site, parts in sorted(by_site.items()) for spec in specs}
    pools = with_intervals(pools)
    return ModelBoard(
        model_id=model_id, pooled={spec.name: pools[("", spec.name)] for spec in specs},
        sites={site: {spec.name: pools[(site, spec.name)] for spec in specs} for site in sorted(by_site)},
        site_cases={site: sum(p.case_count for p in parts) for site, parts in sorted(by_site.items())},
        case_count=sum(score.case_count for score in scores))


def _row(model: ModelBoard, specs: Sequence[MetricSpec], rank: int, shared: bool,
         probabilities: Sequence[float]) -> LeaderboardRow:
    intervals = {name: p.interval for name, p in model.pooled.items() if p.interval is not None}
    site_intervals = {site: {name: p.interval for name, p in values.items() if p.interval is not None}
                      for site, values in model.sites.items()}
    mean_of_sites, worst = {}, {}
    for spec in specs:
        values = {site: pooled[spec.name].value for site, pooled in model.sites.items()}
        mean_of_sites[spec.name] = sum(values.values()) / len(values)
        site = (min if spec.higher_is_better else max)(sorted(values), key=values.__getitem__)
        worst[spec.name] = SiteValue(site=site, value=values[site])
    return LeaderboardRow(
        rank=rank, shared=shared, model_id=model.model_id,
        pooled={name: p.value for name, p in model.pooled.items()},
        pooling={name: p.method for name, p in model.pooled.items()},
        intervals=intervals,  # type: ignore[arg-type]
        bin_error={name: p.bin_error for name, p in model.pooled.items() if p.bin_error is not None},
        site_values={site: {name: p.value for name, p in values.items()} for site, values in model.sites.items()},
        site_intervals={site: values for site, values in site_intervals.items() if values},  # type: ignore[misc]
        site_cases=model.site_cases, mean_of_sites=mean_of_sites, worst_site=worst,
        rank_probabilities=tuple(float(p) for p in probabilities),
        case_count=model.case_count, sites=len(model.sites))


def aggregate(benchmark: BenchmarkSpec, scores: Iterable[Score]) -> Leaderboard:
    """The whole board of `benchmark` (every row, every site, real names): what the sharing policy then narrows."""
    by_model: dict[str, list[Score]] = defaultdict(list)
    for score in scores:
        by_model[score.model_id].append(score)
    return rank(benchmark, [model_board(model, by_model[model], benchmark.metrics) for model in sorted(by_model)])


def rank(benchmark: BenchmarkSpec, models: Sequence[ModelBoard]) -> Leaderboard:
    """The board of models already pooled: ranked, with their rank distribution and the ranking's stability."""
    specs = benchmark.metrics
    primary = next(spec for spec in specs if spec.name == benchmark.primary_metric)
    headline = [model.pooled[primary.name] for model in models]
    values = [p.value for p in headline]
    ranks = shared_ranks(values, [p.interval for p in headline], primary.higher_is_better)
    probabilities: np.ndarray | list[list[float]] = [[] for _ in models]
    stability = None
    if models and all(p.replicates is not None for p in headline):
        replicates = np.stack([p.replicates for p in headline])  # type: ignore[misc]
        probabilities = rank_distribution(replicates, primary.higher_is_better)
        stability = kendall_tau(np.asarray(values), replicates)
    rows = [_row(model, specs, rank, ranks.count(rank) > 1, probs)
            for model, rank, probs in zip(models, ranks, probabilities, strict=True)]
    order = sorted(range(len(rows)), key=lambda i: (rows[i].rank, -values[i] if primary.higher_is_better
                                                    else values[i], rows[i].model_id))
    return Leaderboard(benchmark_id=benchmark.benchmark_id, primary_metric=primary.name,
                       metrics=tuple(spec.name for spec in specs),
                       higher_is_better={spec.name: spec.higher_is_better for spec in specs},
                       replicates=benchmark.pooling.replicates if stability is not None or any(
                           r.intervals for r in rows) else 0,
                       rank_stability=stability, rows=tuple(rows[i] for i in order), view="full")
