"""Job planning, as a pure function: every approved (model, dataset) pair of an approved benchmark, once."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from contracts.messages import Archive, BenchmarkSpec, JobBinding, JobSpec


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
              keys: Mapping[tuple[str, str], str] | None = None) -> list[JobSpec]:
    """The jobs still missing: `models` maps approved model ids to their image digests, `owners` to who registered
    them (a site's policy may accept only some), `archives` the pushed model images by digest (a site that lacks one
    fetches it). A private image (its archive encrypted) is planned at a site only once `keys` holds its key sealed
    to that site, (digest, site id) -> sealed key; the job carries it."""
    pushed = dict(archives or {})
    if benchmark.evaluator.archive is not None:
        pushed[benchmark.evaluator.digest] = benchmark.evaluator.archive
    jobs = []
    for model_id, digest in sorted(models.items()):
        for ds in sorted(datasets, key=lambda d: d.dataset_id):
            jid = job_id(benchmark.benchmark_id, digest, benchmark.evaluator.digest, ds.content_hash, model_id,
                         ds.dataset_id)
            private = digest in pushed and pushed[digest].encrypted
            sealed = (keys or {}).get((digest, ds.site_id))
            if jid in existing or (private and sealed is None):
                continue
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
