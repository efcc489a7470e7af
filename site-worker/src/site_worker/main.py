"""The site worker: pulls its site's jobs, runs them in the sandbox, signs and publishes the result, then acks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from pathlib import Path

from faststream import AckPolicy, FastStream
from faststream.nats import ConsumerConfig, JStream, NatsBroker, NatsMessage, PullSub
from pydantic import ValidationError

from assay_telemetry import nats_middlewares
from contracts import subjects
from contracts.envelope import Envelope, utcnow
from contracts.messages import DeadLetter, JobSpec, SiteResult
from contracts.signing import KeyPair, SignatureError, metrics_hash, verify
from contracts.streams import PUBLISH_TIMEOUT_S
from site_worker.config import Settings
from site_worker.containers import ContainerRunner, Limits
from site_worker.execution import JobRefused, execute

log = logging.getLogger("site_worker")


def create_app(settings: Settings, runner: ContainerRunner, broker: NatsBroker | None = None) -> FastStream:
    site = subjects.token(settings.site_id, "site id")
    key = KeyPair.load(settings.key_file)
    broker = broker or NatsBroker(settings.nats_url, logger=None,
                                  middlewares=nats_middlewares(f"site-worker-{site}", settings.otlp_endpoint))
    results = broker.publisher(subjects.results(site), stream=JStream(subjects.RESULTS_STREAM, declare=False),
                               title=f"results:{site}", timeout=PUBLISH_TIMEOUT_S)
    dead_letters = broker.publisher(subjects.dead_letter(f"site-{site}"),
                                    stream=JStream(subjects.DEAD_LETTERS_STREAM, declare=False),
                                    timeout=PUBLISH_TIMEOUT_S)
    limits = Limits(timeout_s=settings.container_timeout_s)
    source = f"site:{site}/{settings.worker_id}"

    async def give_up(msg: NatsMessage, job_id: str, deliveries: int, reason: str) -> None:
        log.error("job %s given up after %d deliveries: %s", job_id, deliveries, reason)
        letter = Envelope.wrap(DeadLetter(consumer=f"site-{site}", subject=msg.raw_message.subject,
                                          message_id=job_id, deliveries=deliveries, error=reason[:4000]), source=source)
        await dead_letters.publish(letter.model_dump_json().encode(), headers={"Nats-Msg-Id": f"dlq:{site}:{job_id}"})

    async def heartbeat(msg: NatsMessage) -> None:
        while True:
            await asyncio.sleep(settings.heartbeat_s)
            await msg.raw_message.in_progress()

    @broker.subscriber(
        subjects.jobs(site), stream=JStream(subjects.JOBS_STREAM, declare=False), durable=f"site-{site}",
        pull_sub=PullSub(batch_size=1, timeout=1.0),
        # one delivery more than the code uses: a worker that dies in the last attempt is followed by one that
        # dead-letters the job, instead of the server dropping it silently
        config=ConsumerConfig(max_deliver=settings.max_deliver + 1, ack_wait=settings.ack_wait_s),
        ack_policy=AckPolicy.NACK_ON_ERROR, title=f"jobs:{site}",
    )
    async def run_job(msg: NatsMessage) -> None:
        deliveries = msg.raw_message.metadata.num_delivered or 1
        try:
            envelope = Envelope[JobSpec].model_validate_json(msg.body)
            verify(envelope, settings.scheduler_public_key)
        except (ValidationError, SignatureError) as exc:
            await give_up(msg, msg.headers.get("Nats-Msg-Id", "?"), deliveries, f"refused, not a valid signed job: {exc}")
            return
        job = envelope.data
        if deliveries > settings.max_deliver:
            await give_up(msg, job.job_id, deliveries, "a worker stopped during the last attempt")
            return
        ticker = asyncio.create_task(heartbeat(msg))
        try:
            await run_and_publish(job)
        except JobRefused as exc:
            await give_up(msg, job.job_id, deliveries, str(exc))
        except Exception as exc:  # a failed container, or the bus away: retried, and never dropped silently
            if deliveries >= settings.max_deliver:
                await give_up(msg, job.job_id, deliveries, f"{type(exc).__name__}: {exc}")
                return
            await msg.nack(delay=min(2.0 * deliveries, 30.0))
            raise
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker

    async def run_and_publish(job: JobSpec) -> None:
        if job.site_id != site:
            raise JobRefused(f"job {job.job_id} is addressed to site {job.site_id}, not {site}")
        datasets = json.loads(settings.datasets_file.read_text()) if settings.datasets_file.exists() else {}
        if job.dataset_id not in datasets:
            raise JobRefused(f"dataset {job.dataset_id} is not prepared at site {site}")
        outcome = await asyncio.to_thread(execute, job, Path(datasets[job.dataset_id]), runner,
                                          settings.work_dir, limits)
        result = SiteResult(
            job_id=job.job_id, benchmark_id=job.benchmark_id, model_id=job.model_id, dataset_id=job.dataset_id,
            site_id=site, model_image=job.model_image, evaluator_image=job.evaluator_image,
            dataset_hash=job.dataset_hash, metrics=outcome.metrics, case_count=outcome.case_count,
            metrics_hash=metrics_hash(outcome.metrics), worker_id=settings.worker_id, finished_at=utcnow())
        signed = key.sign(Envelope.wrap(result, source=source, id=f"result-{job.job_id}"))
        body = signed.model_dump_json().encode()
        # the dedupe id covers the signed bytes: nobody can pre-empt it by publishing a forgery with a guessed id
        # (the leaderboard counts each job once however often a re-run publishes)
        await results.publish(body, headers={"Nats-Msg-Id": f"{signed.id}:{hashlib.sha256(body).hexdigest()[:32]}"})
        log.info("job %s done: %s", job.job_id, outcome.metrics)

    return FastStream(broker)
