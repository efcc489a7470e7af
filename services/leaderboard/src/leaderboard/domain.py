"""The leaderboard's rules as pure functions: whether a signed site result may count, and how results become a board.

Per-case scores never leave the sites: a site sends one value per declared metric and its case count. The pooled
value of a metric is therefore the case-weighted mean of the site values: a pooled AUC is the weighted mean of the
site AUCs, not an AUC over the pooled cases (nobody outside the sites could compute that).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from contracts import subjects
from contracts.envelope import Envelope
from contracts.messages import (
    BenchmarkSpec,
    JobSpec,
    Leaderboard,
    LeaderboardRow,
    LeaderboardUpdated,
    Role,
    SiteResult,
)
from contracts.metrics import (
    MetricNamesRefused,
    MetricsRefused,
    MetricValueRefused,
    checked_metrics,
)
from contracts.signing import SignatureError, metrics_hash, verify

# pooled values are weighted means: two models with the same site values may differ in the last bits
TIE_REL_TOL = 1e-9


class Check(StrEnum):
    """The checks a result must pass, in the order they run; a rejection names the one that failed."""

    SIGNATURE = "signature"
    SIGNER_ROLE = "signer_role"
    SIGNER_SITE = "signer_site"
    SUBJECT = "subject"
    JOB_SIGNATURE = "job_signature"
    JOB_SITE = "job_site"
    BINDING = "binding"
    METRIC_NAMES = "metric_names"
    METRIC_VALUE = "metric_value"
    METRICS_HASH = "metrics_hash"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Verdict:
    ok: bool
    check: Check | None = None
    reason: str = ""

    @classmethod
    def reject(cls, check: Check, detail: str) -> Verdict:
        return cls(ok=False, check=check, reason=f"{check.value}: {detail}")


ACCEPTED = Verdict(ok=True)


@dataclass(frozen=True)
class Signer:
    """The registered actor holding the key a result was signed with."""

    actor_id: str
    role: str
    public_key: str


def check_origin(envelope: Envelope[SiteResult], *, subject: str, signer: Signer | None) -> Verdict:
    """Who sent it: signed by a registered site's key, that site is the one the result names and published it.

    `signer` is the actor holding `envelope.signature.key_id`, None when no registered actor holds it.
    """
    result = envelope.data
    if envelope.signature is None:
        return Verdict.reject(Check.SIGNATURE, "the result is not signed; a site signs every result with its key")
    key_id = envelope.signature.key_id
    if signer is None:
        return Verdict.reject(Check.SIGNATURE,
                              f"key {key_id} belongs to no registered actor, so not to site {result.site_id}")
    try:
        verify(envelope, signer.public_key)
    except SignatureError as exc:
        return Verdict.reject(Check.SIGNATURE, f"{exc} (key {key_id} of {signer.actor_id})")
    if signer.role != Role.SITE:
        return Verdict.reject(Check.SIGNER_ROLE,
                              f"signed by {signer.actor_id}, whose role is {signer.role}; only a site signs results")
    if signer.actor_id != result.site_id:
        return Verdict.reject(Check.SIGNER_SITE,
                              f"the result names site {result.site_id} but is signed by site {signer.actor_id}")
    expected = subjects.results(result.site_id)
    if subject != expected:
        return Verdict.reject(Check.SUBJECT,
                              f"published on {subject}, but a result of site {result.site_id} travels on {expected}")
    return ACCEPTED


def check_job(result: SiteResult, *, scheduler_key: str) -> Verdict:
    """The job the result answers is one the scheduler signed: its binding is the scheduler's word, not the site's."""
    try:
        verify(result.job, scheduler_key)
    except SignatureError as exc:
        return Verdict.reject(Check.JOB_SIGNATURE, f"the job the result carries is not the scheduler's: {exc}")
    return ACCEPTED


def check_binding(result: SiteResult, *, job: JobSpec, benchmark: BenchmarkSpec, accepted_before: bool) -> Verdict:
    """What it claims: the job it answers, the pinned artefacts, the declared metrics in range, and counted once."""
    if result.job_id != job.job_id or job.binding.benchmark_id != benchmark.benchmark_id:
        return Verdict.reject(Check.BINDING, f"result of job {result.job_id} checked against job {job.job_id} "
                                             f"of benchmark {job.binding.benchmark_id} and benchmark "
                                             f"{benchmark.benchmark_id}")
    if result.site_id != job.site_id:
        return Verdict.reject(Check.JOB_SITE,
                              f"job {job.job_id} was sent to site {job.site_id}, not to site {result.site_id}")
    claimed, planned = result.binding.model_dump(), job.binding.model_dump()
    mismatched = [f"{name} is {claimed[name]}, the job has {planned[name]}" for name in planned
                  if claimed[name] != planned[name]]
    if mismatched:
        return Verdict.reject(Check.BINDING, f"the result does not match job {job.job_id}: " + "; ".join(mismatched))
    try:
        checked_metrics(result.metrics, benchmark.metrics)
    except MetricsRefused as refused:
        return Verdict.reject(Check(refused.check), _metrics_refusal(refused, benchmark))
    expected = metrics_hash(result.metrics)
    if result.metrics_hash != expected:
        return Verdict.reject(Check.METRICS_HASH,
                              f"metrics_hash is {result.metrics_hash}, the metrics hash to {expected}")
    if accepted_before:
        return Verdict.reject(Check.DUPLICATE, f"job {job.job_id} already has an accepted result; this one is not counted")
    return ACCEPTED


def _metrics_refusal(refused: MetricsRefused, benchmark: BenchmarkSpec) -> str:
    """The leaderboard names the values: they arrived signed, from a site that let them leave."""
    if isinstance(refused, MetricNamesRefused):
        return (f"missing {refused.missing}, undeclared {refused.undeclared}; benchmark {benchmark.benchmark_id} "
                f"declares {refused.declared}")
    assert isinstance(refused, MetricValueRefused)
    if not refused.finite:
        return f"{refused.spec.name} is {refused.value}, not a finite number"
    spec = refused.spec
    return f"{spec.name} = {refused.value} is outside its declared range [{spec.minimum}, {spec.maximum}]"


# --- aggregation and ranking --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """One accepted result, as the board needs it."""

    model_id: str
    site_id: str
    metrics: Mapping[str, float]
    case_count: int


def case_weighted(scores: Sequence[Score], names: Iterable[str]) -> dict[str, float]:
    """Each metric's mean over `scores`, each weighted by its case count."""
    cases = sum(score.case_count for score in scores)
    return {name: sum(score.metrics[name] * score.case_count for score in scores) / cases for name in names}


def competition_ranks(values: Sequence[float], *, higher_is_better: bool) -> list[int]:
    """Rank of each value ("1224" ranking): equal values share the best rank of their group, the next rank skips."""
    order = sorted(range(len(values)), key=lambda i: values[i], reverse=higher_is_better)
    ranks = [0] * len(values)
    for position, index in enumerate(order):
        previous = order[position - 1] if position else None
        if previous is not None and math.isclose(values[index], values[previous], rel_tol=TIE_REL_TOL):
            ranks[index] = ranks[previous]
        else:
            ranks[index] = position + 1
    return ranks


def aggregate(benchmark: BenchmarkSpec, scores: Iterable[Score]) -> Leaderboard:
    """The board of `benchmark`: per model, each site's values and the pooled values, ranked by the primary metric.

    A site with several datasets in the benchmark gets the case-weighted mean of them; pooled values are the
    case-weighted mean over all the model's results (the same as weighting each site's value by its cases).
    """
    names = tuple(spec.name for spec in benchmark.metrics)
    primary = next(spec for spec in benchmark.metrics if spec.name == benchmark.primary_metric)
    by_model: dict[str, list[Score]] = defaultdict(list)
    for score in scores:
        by_model[score.model_id].append(score)
    models = sorted(by_model)
    pooled = [case_weighted(by_model[model], names) for model in models]
    ranks = competition_ranks([values[primary.name] for values in pooled], higher_is_better=primary.higher_is_better)
    rows = []
    for model, rank, model_pooled in zip(models, ranks, pooled, strict=True):
        by_site: dict[str, list[Score]] = defaultdict(list)
        for score in by_model[model]:
            by_site[score.site_id].append(score)
        rows.append(LeaderboardRow(
            rank=rank, model_id=model, pooled=model_pooled,
            site_values={site: case_weighted(by_site[site], names) for site in sorted(by_site)},
            case_count=sum(score.case_count for score in by_model[model]), sites=len(by_site),
        ))
    rows.sort(key=lambda row: (row.rank, row.model_id))
    return Leaderboard(benchmark_id=benchmark.benchmark_id, primary_metric=primary.name, metrics=names,
                       rows=tuple(rows))


def standing(board: Leaderboard, model_id: str) -> LeaderboardUpdated:
    """What the board says of one model, as the bounded event that announces its change."""
    row = next(row for row in board.rows if row.model_id == model_id)
    return LeaderboardUpdated(benchmark_id=board.benchmark_id, primary_metric=board.primary_metric,
                              models=len(board.rows), model_id=row.model_id, rank=row.rank, pooled=row.pooled,
                              case_count=row.case_count, sites=row.sites)
