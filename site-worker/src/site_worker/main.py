"""The site worker: pulls its site's jobs, runs them in the sandbox, signs and publishes the result, then acks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from faststream import Context, FastStream
from faststream.context import ContextRepo
from faststream.nats import NatsBroker
from faststream.nats.annotations import NatsMessage

from assay_telemetry import nats_middlewares
from contracts import subjects
from contracts.envelope import Envelope, utcnow
from contracts.messages import JobSpec, SiteResult
from contracts.signing import KeyPair, SignatureError, metrics_hash, verify
from service_kit.connection import connection_options, inbox_of
from service_kit.edge import Retry
from service_kit.wiring import Consumer, Outlet, Outlets, Wiring
from site_worker.config import Settings
from site_worker.containers import ContainerRunner, Limits
from site_worker.execution import JobRefused, execute

log = logging.getLogger("site_worker")
FINISHED = "finished"  # in a job's folder: the site's record that the job ran and its result left


@dataclass(frozen=True)
class Site:
    """What the worker's handler works with, in its app's context as `site`."""

    settings: Settings
    key: KeyPair
    runner: ContainerRunner
    outlets: Outlets
    source: str


SiteDep = Annotated[Site, Context("site")]


async def run_job(job: Envelope[JobSpec], site: SiteDep, message: NatsMessage) -> None:
    """Run a job the scheduler signed, keeping its lease with heartbeats; refuse, at once, one it did not."""
    try:
        verify(job, site.settings.scheduler_public_key)
    except SignatureError as exc:
        raise JobRefused(f"refused, not a valid signed job: {exc}") from exc
    ticker = asyncio.create_task(heartbeat(message, site.settings.heartbeat_s))
    try:
        await run_and_publish(job, site)
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker


async def heartbeat(message: NatsMessage, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        await message.in_progress()


async def run_and_publish(signed_job: Envelope[JobSpec], site: Site) -> None:
    job, settings = signed_job.data, site.settings
    if job.site_id != settings.site_id:
        raise JobRefused(f"job {job.job_id} is addressed to site {job.site_id}, not {settings.site_id}")
    if job.expires_at <= utcnow():
        raise JobRefused(f"job {job.job_id} expired at {job.expires_at.isoformat(timespec='seconds')}; it is not run")
    finished = settings.work_dir / job.job_id / FINISHED
    if finished.exists():
        raise JobRefused(f"job {job.job_id} already ran at this site ({finished.read_text().strip()}); a job runs "
                         "once per site, so this delivery is a replay or a redelivery after its result left")
    datasets = json.loads(settings.datasets_file.read_text()) if settings.datasets_file.exists() else {}
    if job.binding.dataset_id not in datasets:
        raise JobRefused(f"dataset {job.binding.dataset_id} is not prepared at site {settings.site_id}")
    metrics = await asyncio.to_thread(execute, job, Path(datasets[job.binding.dataset_id]), site.runner,
                                      settings.work_dir, Limits(timeout_s=settings.container_timeout_s))
    result = SiteResult(job_id=job.job_id, site_id=settings.site_id, binding=job.binding, metrics=metrics,
                        metrics_hash=metrics_hash(metrics), worker_id=settings.worker_id, finished_at=utcnow(),
                        job=signed_job)
    signed = site.key.sign(Envelope.wrap(result, source=site.source, id=f"result-{job.job_id}"))
    body = signed.model_dump_json().encode()
    # the dedupe id covers the signed bytes: nobody can pre-empt it by publishing a forgery with a guessed id
    # (the leaderboard counts each job once however often a re-run publishes)
    await site.outlets.publish(subjects.results(settings.site_id), body,
                               f"{signed.id}:{hashlib.sha256(body).hexdigest()[:32]}")
    finished.write_text(f"its result {signed.id} left at {result.finished_at.isoformat(timespec='seconds')}\n")
    log.info("job %s done: %s", job.job_id, metrics)


def wiring(site_id: str, *, worker_id: str, max_deliver: int, ack_wait_s: float) -> Wiring:
    """The worker's one consumer (its site's queue, one job at a time) and its one way out (its results).

    `site_id` may be `subjects.SITE`, the placeholder the AsyncAPI document shows.
    """
    return Wiring(
        owner=f"site-{site_id}", source=f"site:{site_id}/{worker_id}",
        consumers=(Consumer(run_job, subject=subjects.jobs(site_id), ack_wait_s=ack_wait_s, batch=1),),
        publishes=(Outlet(subjects.results(site_id), SiteResult),),
        # a container that failed is tried again after 2 s, then 4 s: long enough for a busy engine to recover
        retry=Retry(failures=max_deliver, waits=0, base_s=2.0, cap_s=30.0), outbox=False,
    )


def site_wiring(settings: Settings) -> Wiring:
    return wiring(subjects.token(settings.site_id, "site id"), worker_id=settings.worker_id,
                  max_deliver=settings.max_deliver, ack_wait_s=settings.ack_wait_s)


def create_app(settings: Settings, runner: ContainerRunner) -> FastStream:
    key = KeyPair.load(settings.key_file)
    context = ContextRepo()
    plan = site_wiring(settings)
    broker = NatsBroker(settings.nats_url, logger=None, context=context,
                        middlewares=nats_middlewares(f"site-worker-{settings.site_id}", settings.otlp_endpoint),
                        **connection_options(plan.owner, settings.nats_url))
    outlets = plan.declare(broker, units=None, inbox=inbox_of(settings.nats_url))
    context.set_global("site", Site(settings, key, runner, outlets, plan.source))
    app = FastStream(broker)

    @app.on_startup
    async def remove_leftovers() -> None:
        """A worker killed mid-job leaves its container running: it goes before any new job starts."""
        if removed := await asyncio.to_thread(runner.remove_leftovers):
            log.warning("removed %d container(s) a killed run of this worker left running", len(removed))

    return app
