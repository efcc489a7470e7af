"""The scheduler's jobs as gauges, read from its store (it knows every job's state): how many are in each state, by
benchmark and site, and how deep each site's queue is (sent and not finished there)."""

from __future__ import annotations

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import col, select

from assay_telemetry.metrics import BENCHMARK, JOBS, QUEUE, SITE, STATE, Metric, Reading
from contracts.messages import JobState
from scheduling.models import Job
from service_kit.gauges import Sample

QUEUED = (JobState.SCHEDULED, JobState.RUNNING)  # sent to the site, neither answered nor given up on


async def jobs_by_state(connection: AsyncConnection) -> dict[Metric, Reading]:
    """Each (benchmark, site) pair that has jobs reports every state, 0 included, so a state that empties shows 0
    rather than its last value going stale. A job retried as a new round counts once, as that round."""
    rows = (await connection.execute(
        select(Job.benchmark_id, Job.site_id, Job.status, func.count())
        .where(col(Job.retried_as).is_(None)).group_by(Job.benchmark_id, Job.site_id, Job.status))).all()
    counted: dict[tuple[str, str], dict[str, int]] = {}
    for benchmark, site, state, count in rows:
        counted.setdefault((benchmark, site), {})[state] = int(count)
    jobs: Reading = []
    queues: dict[str, int] = {}
    for (benchmark, site), states in sorted(counted.items()):
        for state in JobState:
            jobs.append((float(states.get(state, 0)), {STATE: state.value, BENCHMARK: benchmark, SITE: site}))
        queues[site] = queues.get(site, 0) + sum(states.get(state, 0) for state in QUEUED)
    return {JOBS: jobs, QUEUE: [(float(depth), {SITE: site}) for site, depth in sorted(queues.items())]}


JOBS_BY_STATE = Sample((JOBS, QUEUE), jobs_by_state)
