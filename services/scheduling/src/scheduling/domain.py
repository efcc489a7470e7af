"""Job planning, as a pure function: every approved (model, dataset) pair of an approved benchmark, once."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from contracts.messages import Archive, BenchmarkSpec, CheckOf, EntityKind, JobBinding, JobSpec


@dataclass(frozen=True)
class PlannedDataset:
    dataset_id: str
    site_id: str
    content_hash: str
    case_count: int


def job_id(benchmark_id: str, model_digest: str, evaluator: str, dataset_hash: str, model_id: str,
           dataset_id: str) -> str:
    """Deterministic: planning the same pair twice, in any replica, names the same job."""
    key = "|".join((benchmark_id, model_id, model_digest, evaluator, dataset_id, dataset_hash))
    return "job-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def plan_jobs(benchmark: BenchmarkSpec, models: dict[str, str], datasets: list[PlannedDataset],
              existing: set[str], expires_at: datetime,
              owners: Mapping[str, str | None] | None = None,
              archives: Mapping[str, Archive] | None = None,
              keys: Mapping[tuple[str, str], str] | None = None,
              cancelled: set[str] | frozenset[str] = frozenset()) -> list[JobSpec]:
    """The jobs still missing: `models` maps approved model ids to their image digests, `owners` to who registered
    them (a site's policy may accept only some), `archives` the pushed model images by digest (a site that lacks one
    fetches it). A private image (its archive encrypted) is planned at a site only once `keys` holds its key sealed
    to that site, (digest, site id) -> sealed key; the job carries it. A pair whose every job so far was
    `cancelled` (its consent was withdrawn, then given again) is planned once more, as round `-r<n>`."""
    pushed = dict(archives or {})
    if benchmark.evaluator.archive is not None:
        pushed[benchmark.evaluator.digest] = benchmark.evaluator.archive
    rounds_of: dict[str, list[str]] = {}  # a pair's job id: its jobs so far (it, then `<it>-r1`, ...), found once
    for known in existing:
        first, again, n = known.rpartition("-r")
        rounds_of.setdefault(first if again and n.isdigit() else known, []).append(known)
    jobs = []
    for model_id, digest in sorted(models.items()):
        for ds in sorted(datasets, key=lambda d: d.dataset_id):
            jid = job_id(benchmark.benchmark_id, digest, benchmark.evaluator.digest, ds.content_hash, model_id,
                         ds.dataset_id)
            rounds = rounds_of.get(jid, [])
            private = digest in pushed and pushed[digest].encrypted
            sealed = (keys or {}).get((digest, ds.site_id))
            if any(j not in cancelled for j in rounds) or (private and sealed is None):
                continue
            jid = f"{jid}-r{len(rounds)}" if rounds else jid
            binding = JobBinding(benchmark_id=benchmark.benchmark_id, model_id=model_id, dataset_id=ds.dataset_id,
                                 model_image=digest, evaluator_image=benchmark.evaluator.digest,
                                 dataset_hash=ds.content_hash, case_count=ds.case_count)
            jobs.append(JobSpec(job_id=jid, site_id=ds.site_id, binding=binding, metrics=benchmark.metrics,
                                expires_at=expires_at, model_owner=(owners or {}).get(model_id),
                                limits=benchmark.limits, predictions=benchmark.predictions, pooling=benchmark.pooling,
                                keys={digest: sealed} if private and sealed else {},
                                archives={image: pushed[image] for image in (digest, benchmark.evaluator.digest)
                                          if image in pushed}))
    return jobs


DEMO_DATASET = "demo-data"  # the dataset id a compatibility check's binding names: the benchmark's demo data
REFERENCE_MODEL = "reference-model"  # the model id a dataset check's binding names: the benchmark's reference model


def check_id(request_id: str, benchmark_id: str, kind: EntityKind, entity_id: str) -> str:
    """One check per request (the AssociationRequested event's id): asking again after a fix runs it again."""
    key = "|".join((request_id, benchmark_id, kind.value, entity_id))
    return "check-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def model_check(benchmark: BenchmarkSpec, request_id: str, model_id: str, digest: str, expires_at: datetime,
                owner: str | None = None, archive: Archive | None = None, key: str | None = None) -> JobSpec | None:
    """The model on the benchmark's demo data, with its preparator and evaluator, at its check site (None when the
    benchmark has no demo data). A private image's key, sealed to the check site, travels with it (without one, the
    site says so, and the approver sees why)."""
    demo = benchmark.demo_data
    if demo is None or benchmark.check_site is None:
        return None
    binding = JobBinding(benchmark_id=benchmark.benchmark_id, model_id=model_id, dataset_id=DEMO_DATASET,
                         model_image=digest, evaluator_image=benchmark.evaluator.digest,
                         dataset_hash=demo.archive.sha256, case_count=demo.cases)
    preparator = None if demo.prepared else benchmark.preparator
    pushed = {ref.digest: ref.archive for ref in (benchmark.evaluator, preparator) if ref and ref.archive}
    if archive is not None:
        pushed[digest] = archive
    return JobSpec(job_id=check_id(request_id, benchmark.benchmark_id, EntityKind.MODEL, model_id),
                   site_id=benchmark.check_site, binding=binding, metrics=benchmark.metrics, expires_at=expires_at,
                   model_owner=owner, limits=benchmark.limits, predictions=benchmark.predictions,
                   keys={digest: key} if key else {}, archives=pushed,
                   check=CheckOf(kind=EntityKind.MODEL, entity_id=model_id), demo_data=demo,
                   preparator=preparator.digest if preparator else None)


def dataset_check(benchmark: BenchmarkSpec, request_id: str, dataset: PlannedDataset, expires_at: datetime,
                  owner: str | None = None) -> JobSpec:
    """The benchmark's reference model on the dataset, at its site: its result passes the site's release rules like
    any result."""
    reference, evaluator = benchmark.reference_model, benchmark.evaluator
    binding = JobBinding(benchmark_id=benchmark.benchmark_id, model_id=REFERENCE_MODEL, dataset_id=dataset.dataset_id,
                         model_image=reference.digest, evaluator_image=evaluator.digest,
                         dataset_hash=dataset.content_hash, case_count=dataset.case_count)
    return JobSpec(job_id=check_id(request_id, benchmark.benchmark_id, EntityKind.DATASET, dataset.dataset_id),
                   site_id=dataset.site_id, binding=binding, metrics=benchmark.metrics, expires_at=expires_at,
                   model_owner=owner, limits=benchmark.limits, predictions=benchmark.predictions,
                   archives={ref.digest: ref.archive for ref in (reference, evaluator) if ref.archive},
                   check=CheckOf(kind=EntityKind.DATASET, entity_id=dataset.dataset_id))
