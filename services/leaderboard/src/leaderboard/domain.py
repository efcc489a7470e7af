"""The leaderboard's rules as pure functions: whether a signed site result may count (how results become a board is
`leaderboard.board`, who sees what of it `leaderboard.sharing`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from contracts import subjects
from contracts.envelope import Envelope, aware
from contracts.messages import (
    BenchmarkSpec,
    Evidence,
    JobSpec,
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
from contracts.statistics import disagreement


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
    EVIDENCE = "evidence"
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
    retired_at: datetime | None = None  # the actor replaced this key then: nothing signed later with it counts
    also: tuple[str, ...] = ()  # the other roles it holds


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
    if signer.retired_at is not None and aware(envelope.time) >= aware(signer.retired_at):
        return Verdict.reject(Check.SIGNATURE, f"signed at {envelope.time.isoformat(timespec='seconds')} with key "
                                               f"{key_id}, which {signer.actor_id} retired at "
                                               f"{signer.retired_at.isoformat(timespec='seconds')}")
    if Role.SITE not in (signer.role, *signer.also):
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


def check_binding(result: SiteResult, *, job: JobSpec, benchmark: BenchmarkSpec,
                  accepted_before: str | None) -> Verdict:
    """What it claims: the job it answers, the pinned artefacts, the declared metrics in range, and counted once:
    `accepted_before` is the job whose result counts for this model on this dataset already, if any (this job, or an
    earlier round of it: a job retried or planned again after its pair was approved again)."""
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
    if job.check is None and (reason := evidence_disagreement(result, benchmark)):  # a check sends none
        return Verdict.reject(Check.EVIDENCE, reason)
    if accepted_before == job.job_id:
        return Verdict.reject(Check.DUPLICATE, f"job {job.job_id} already has an accepted result; this one is not counted")
    if accepted_before is not None:
        return Verdict.reject(Check.DUPLICATE, f"model {job.binding.model_id} on dataset {job.binding.dataset_id} "
                                               f"already has an accepted result (job {accepted_before}); this one is "
                                               "not counted")
    return ACCEPTED


def evidence_disagreement(result: SiteResult, benchmark: BenchmarkSpec) -> str | None:
    """Why the replicates and aggregates do not fit the metrics they come with, or None when they do."""
    reason = disagreement(result.evidence or Evidence(), result.metrics, benchmark.metrics, benchmark.pooling,
                          result.binding.case_count)
    return None if reason is None else f"{reason}; the result is not counted"


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
