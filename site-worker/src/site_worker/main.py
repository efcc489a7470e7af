"""The site worker: pulls its site's jobs, judges them by the site's policy, runs them in the sandbox, keeps each
result until it may leave, then signs and publishes it; it says what became of every job it did not answer."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Annotated

from faststream import Context, FastStream
from faststream.context import ContextRepo
from faststream.nats import NatsBroker
from faststream.nats.annotations import NatsMessage

from nats.errors import ConnectionReconnectingError, NoRespondersError, StaleConnectionError
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import Tracer

from assay_telemetry import OtlpTls, telemetry
from assay_telemetry.metrics import Meters
from contracts import subjects
from contracts.envelope import Envelope, utcnow
from contracts import messages as m
from contracts.messages import JobSpec, JobState, SiteReport, SiteResult
from contracts.signing import KeyPair, SignatureError, metrics_hash, verify
from service_kit.alive import keep_alive
from service_kit.connection import connection_options, inbox_of, servers
from service_kit.edge import Delivery, Refused, Retry
from service_kit.wiring import Consumer, Outlet, Outlets, Wiring
from site_worker.audit import AuditLog, verify_log
from site_worker.cancelled import Cancellations
from site_worker.capacity import Budget, Capacity
from site_worker.config import Settings
from site_worker.containers import ContainerRunner, Limits, TracedRunner
from site_worker.demo import demo_folder
from site_worker.execution import JobRefused, RunFailed, clean_failed, dataset_folder, execute
from site_worker.heartbeat import HeartbeatStore, LazyBucket, LeafBucket, beat, beat_forever
from site_worker.images import BusImageStore, ImageStore, ensure_images, s3_store
from site_worker.policy import PolicyFile, SitePolicy, judge
from site_worker.review import Decision, Held, Review

log = logging.getLogger("site_worker")
# what a publish meets while the bus is away for a moment (no stream leader, a reconnection): tried again; a refusal
# (too large, say) is not
BUS_AWAY = (NoRespondersError, NoStreamResponseError, ServiceUnavailableError, TimeoutError,
            ConnectionReconnectingError, StaleConnectionError)
BUS_PATIENCE_S = 30.0
SETTLED_NS = 1_000_000_000  # a store's stamp this old cannot hide a write made as it was read
HELD_REASON = "it ran; its result waits at the site for the data owner's review"


class FailedForGood(Refused):
    """The job ran and failed in a way that will recur: reported, dead-lettered, never tried again."""


@dataclass(frozen=True)
class Site:
    """What the worker's handler works with, in its app's context as `site`."""

    settings: Settings
    key: KeyPair
    runner: ContainerRunner
    outlets: Outlets
    source: str
    policies: PolicyFile
    review: Review
    audit: AuditLog
    sending: asyncio.Lock
    images: ImageStore | None
    capacity: Capacity
    cancellations: Cancellations
    tracer: Tracer  # the container runs' spans, children of the job's
    meters: Meters  # how long they ran, and what this worker dead-lettered
    running: dict[str, asyncio.Future[BaseException | None]] = field(default_factory=dict)  # job id: how it ends


SiteDep = Annotated[Site, Context("site")]


async def run_job(job: Envelope[JobSpec], site: SiteDep, message: NatsMessage, delivery: Delivery) -> None:
    """Run a job the scheduler signed, keeping its lease with heartbeats; refuse, at once, one it did not. Whatever
    keeps a genuine job from a result is reported to the scheduler with its reason."""
    try:
        verify(job, site.settings.scheduler_public_key)
    except SignatureError as exc:
        raise JobRefused(f"refused, not a valid signed job: {exc}") from exc
    spec = job.data
    if spec.site_id != site.settings.site_id:
        raise JobRefused(f"job {spec.job_id} is addressed to site {spec.site_id}, not {site.settings.site_id}")
    if (reason := await site.cancellations.reason(spec.site_id, spec.job_id)) is not None:
        await note(site, "job_cancelled", spec.job_id, reason=reason)
        log.info("job %s was cancelled by the scheduler before it ran (%s): not run", spec.job_id, reason)
        return  # acknowledged: the scheduler has it CANCELLED already
    waited: BaseException | None = None  # how the run of it that this delivery waited for ended
    while (running := site.running.get(spec.job_id)) is not None:
        waited = await the_run_here(site, spec, message, running)
    ending: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    site.running[spec.job_id] = ending  # from here on, another delivery of this job waits for this one
    try:
        if (kept := await asyncio.to_thread(site.review.get, spec.job_id)) is not None:
            if delivery.attempt > 1:  # the same message again, never a replay (one is a new message): its first
                await resend(site, kept)  # delivery kept the result, but its acknowledgement or what it sent was lost
                return
            raise JobRefused(f"job {spec.job_id} already ran at this site (its result was kept at "
                             f"{kept.held_at.isoformat(timespec='seconds')}); a job runs once per site, so this "
                             "delivery is a replay")
        if isinstance(waited, Refused):  # refused, or failed for good: that run said so and dead-lettered it
            return
        if waited is not None:  # a failure that may pass: delivered again, as that run's delivery is
            raise RunFailed(f"the run of job {spec.job_id} this delivery waited for failed "
                            f"({type(waited).__name__}: {waited})")
        await run_keeping_lease(job, site, message, delivery.attempt)
    except BaseException as exc:
        ending.set_result(exc)
        raise
    else:
        ending.set_result(None)
    finally:
        del site.running[spec.job_id]


async def run_keeping_lease(job: Envelope[JobSpec], site: Site, message: NatsMessage, attempt: int) -> None:
    """Run the job with heartbeats extending its lease; say to the scheduler why, if it did not end in a result."""
    spec = job.data
    async with lease_kept(message, site.settings.heartbeat_s):  # kept while the scheduler is told, too
        try:
            await run_and_keep(job, site, attempt)
        except JobRefused as exc:
            await tell(site, spec, JobState.REFUSED, str(exc), attempt=attempt)
            raise
        except RunFailed as exc:
            if exc.recurs:
                await tell(site, spec, JobState.FAILED, f"{exc} (not tried again: it would fail the same way)",
                           attempt=attempt)
                raise FailedForGood(str(exc)) from exc
            tries = f"attempt {attempt} of {site.settings.max_deliver}"
            if attempt >= site.settings.max_deliver:
                await tell(site, spec, JobState.FAILED, f"{exc} ({tries})", attempt=attempt)
            else:  # the operator sees why it is tried again, as the job's state and in the worker's log
                log.warning("job %s failed, %s; it is tried again: %s", spec.job_id, tries, exc)
            raise


async def the_run_here(site: Site, job: JobSpec, message: NatsMessage,
                       running: asyncio.Future[BaseException | None]) -> BaseException | None:
    """The job came again while it runs here (its lease lapsed: the heartbeats did not reach the bus for the whole
    ack wait). A job never runs twice at once at a site: this delivery keeps the lease too, waits for that run, and
    is told how it ended."""
    log.warning("job %s was delivered again while it runs here (its lease lapsed): this delivery waits for that run",
                job.job_id)
    async with lease_kept(message, site.settings.heartbeat_s):
        return await asyncio.shield(running)


@contextlib.asynccontextmanager
async def lease_kept(message: NatsMessage, every_s: float) -> AsyncIterator[None]:
    """While inside, the delivery's lease is extended every `every_s` (well inside the consumer's ack wait)."""
    ticker = asyncio.create_task(heartbeat(message, every_s))
    try:
        yield
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker


async def heartbeat(message: NatsMessage, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await message.in_progress()
        except Exception as exc:  # the bus away for a moment: the next beat may reach it, and the job goes on
            log.warning("could not extend the lease of a job (%s); trying again in %.0f s", exc, every_s)


async def send(site: Site, subject: str, body: bytes, message_id: str) -> None:
    """Publish, waiting out a bus that is away for a moment (a cluster electing a stream's leader takes seconds),
    for up to BUS_PATIENCE_S: a job's few deliveries are for what its containers do, not spent on the bus. Its
    Nats-Msg-Id makes a resend of what was stored after all harmless."""
    wait, deadline = 0.25, time.monotonic() + BUS_PATIENCE_S
    while True:
        try:
            return await site.outlets.publish(subject, body, message_id)
        except BUS_AWAY as exc:
            if time.monotonic() + wait > deadline:
                raise
            log.warning("could not publish %s on %s yet (%s); trying again in %.2f s", message_id, subject, exc, wait)
            await asyncio.sleep(wait)
            wait = min(2 * wait, 4.0)


def limits_of(job: JobSpec) -> Limits:
    asked = job.limits
    # a model may write one file per case (and a folder or two): the file count follows the dataset
    return Limits(memory=f"{asked.memory_mb}m", nano_cpus=int(asked.cpus * 1e9), timeout_s=asked.timeout_s,
                  output_bytes=asked.output_mb << 20, output_files=max(10_000, 2 * job.binding.case_count + 100))


async def run_and_keep(signed_job: Envelope[JobSpec], site: Site, attempt: int = 1) -> None:
    """Judge the job by the policy, run it (the scheduler told it runs), and keep its result: released at once
    where the policy says so, else held for the data owner (and the scheduler told so)."""
    job, settings = signed_job.data, site.settings
    bound = job.binding
    policy = await asyncio.to_thread(received, site, job)
    if job.expires_at <= utcnow():
        raise JobRefused(f"job {job.job_id} expired at {job.expires_at.isoformat(timespec='seconds')}; it is not run")
    if not (verdict := judge(policy, job)):
        raise JobRefused(f"{verdict.reason}; nothing was run")
    await tell(site, job, JobState.RUNNING, f"worker {settings.worker_id} runs it (attempt {attempt})",
               attempt=attempt)
    if job.demo_data is None:
        folder, expected = dataset_folder(settings.datasets_file, bound.dataset_id, settings.site_id), None
    for image in await ensure_images(job, site.runner, site.images, settings.work_dir / ".images",
                                     policy.limits.image_mb << 20, site.key):
        await note(site, "image_fetched", job.job_id, image=image, sha256=job.archives[image].sha256,
                   size=job.archives[image].size)
    if job.demo_data is not None:  # a compatibility check: on the benchmark's demo data, prepared here
        demo = await demo_folder(job, site.runner, site.images, settings.work_dir, limits_of(job))
        folder, expected = demo.folder, demo.content_hash
    async with site.capacity.granted(job) as gpus:
        traced = TracedRunner(site.runner, site.tracer, job, site.meters)
        metrics = await asyncio.to_thread(execute, job, folder, traced, settings.work_dir, limits_of(job), gpus,
                                          expected)
    result = SiteResult(job_id=job.job_id, site_id=settings.site_id, binding=bound, metrics=metrics.leaving,
                        metrics_hash=metrics_hash(metrics.leaving), worker_id=settings.worker_id,
                        finished_at=utcnow(), job=signed_job, evidence=metrics.evidence)
    hold = policy.holds(bound.benchmark_id)
    trace: dict[str, str] = {}
    propagate.inject(trace)  # the job's trace context: the result continues its trace whenever it leaves
    kept = {"undeclared_metrics": list(metrics.kept), "folder": f"jobs/{job.job_id}", "trace": trace}
    await asyncio.to_thread(keep_result, site, result, kept, policy, hold)
    await say_kept(site, job, hold)


async def resend(site: Site, kept: Held) -> None:
    """A job redelivered after its result was kept, as when a server fails over between the keeping and the
    acknowledgement: nothing runs again, and what its first delivery may not have sent is sent (each thing once)."""
    job = kept.result.job.data
    log.info("job %s was delivered again after its result was kept (its acknowledgement was lost): not run again",
             job.job_id)
    await say_kept(site, job, kept.state is Decision.HELD)


async def say_kept(site: Site, job: JobSpec, held: bool) -> None:
    """What follows a kept result: the scheduler told it waits for the data owner (under one id, however often it
    is said), or what was decided sent."""
    if held:
        await tell(site, job, JobState.HELD, HELD_REASON, id=f"held-{job.job_id}")
    else:
        await send_decisions(site)


def received(site: Site, job: JobSpec) -> SitePolicy:
    """The job's arrival in the audit log, then the policy it is judged by: one hop to a thread, not two."""
    bound = job.binding
    site.audit.append("job_received", job.job_id, benchmark=bound.benchmark_id, model=bound.model_id,
                      model_owner=job.model_owner, dataset=bound.dataset_id)
    return policy_in_force(site)


def keep_result(site: Site, result: SiteResult, kept: dict[str, object], policy: SitePolicy, hold: bool) -> None:
    """The run in the audit log, the result kept durably, then the policy's decision in the log, in this order and in
    one hop to a thread (they were three): each entry is on disk before the next step acts on what it records."""
    job, bound = result.job.data, result.binding
    site.audit.append("job_run", job.job_id, model_image=bound.model_image, evaluator_image=bound.evaluator_image,
                      dataset_hash=bound.dataset_hash, cases=bound.case_count, kept_at_site=kept["undeclared_metrics"])
    # released by the policy: signed now and kept signed, so what leaves next is what was kept, in one write
    signed = None if hold else signed_result(site, result).model_dump_json()
    site.review.keep(result, release=not hold, by=f"policy {policy.digest[:19]}", kept=kept, signed=signed)
    if hold:
        site.audit.append("result_held", job.job_id, metrics=sorted(result.metrics))
    else:
        site.audit.append("result_approved", job.job_id, by=f"policy {policy.digest}")


async def send_decisions(site: Site) -> int:
    """Send what was decided and has not left: an approved result, signed once, or the fact that the data owner
    declined one (with the reason the site gives, never its metrics). Each leaves once however often this runs."""
    sent = 0
    async with site.sending:
        for held in await asyncio.to_thread(site.review.unsent):
            with in_its_trace(held):
                if held.state is Decision.APPROVED:
                    await publish_result(site, held)
                    said = ("result_released", {"by": held.decided_by, "metrics_hash": held.result.metrics_hash})
                else:
                    reason = f"the data owner declined to release its result: {held.reason or 'no reason given'}"
                    await tell(site, held.result.job.data, JobState.DECLINED, reason, id=f"declined-{held.job_id}")
                    said = ("rejection_sent", {"by": held.decided_by})
            await asyncio.to_thread(mark_sent, site, held.job_id, *said)
            sent += 1
    return sent


def mark_sent(site: Site, job_id: str, kind: str, details: dict[str, object]) -> None:
    """What left, in the audit log and then in the store, in one hop to a thread (they were two)."""
    site.audit.append(kind, job_id, **details)
    site.review.sent(job_id)


@contextlib.contextmanager
def in_its_trace(held: Held) -> Iterator[None]:
    """Within the trace of the job `held` answers, as kept with it: what was decided leaves as part of its job's trace,
    whether the policy released it at once or the data owner decided days later."""
    kept = held.kept.get("trace")
    token = otel_context.attach(propagate.extract(kept if isinstance(kept, dict) else {}))
    try:
        yield
    finally:
        otel_context.detach(token)


def signed_result(site: Site, result: SiteResult) -> Envelope[SiteResult]:
    return site.key.sign(Envelope.wrap(result, source=site.source, id=f"result-{result.job_id}"))


async def publish_result(site: Site, held: Held) -> None:
    """Publish a released result in the envelope it was signed in: made once (as the policy released it, or now for
    the data owner's release), so a resend sends the same bytes."""
    if (kept := held.signed) is None:
        kept = await asyncio.to_thread(site.review.sign_once, held.job_id,
                                       signed_result(site, held.result).model_dump_json())
    body = kept.encode()
    # the dedupe id covers the signed bytes: nobody can pre-empt it by publishing a forgery with a guessed id
    # (the leaderboard counts each job once however often a re-run publishes)
    await send(site, subjects.results(site.settings.site_id), body,
               f"result-{held.job_id}:{hashlib.sha256(body).hexdigest()[:32]}")
    log.info("job %s: its result left (%s)", held.job_id, held.result.metrics)


async def tell(site: Site, job: JobSpec, state: JobState, reason: str, id: str | None = None,
               attempt: int = 1) -> None:
    """Report a job's state to the scheduler, signed; and keep it in the site's audit log."""
    report = SiteReport(job_id=job.job_id, site_id=site.settings.site_id, state=state, reason=reason[:2000],
                        worker_id=site.settings.worker_id, at=utcnow(), attempt=attempt)
    signed = site.key.sign(Envelope.wrap(report, source=site.source, id=id))
    await send(site, subjects.reports(site.settings.site_id), signed.model_dump_json().encode(), signed.id)
    if state in (JobState.REFUSED, JobState.FAILED):
        await note(site, f"job_{state.value.lower()}", job.job_id, reason=reason)
    log.info("job %s: %s (%s)", job.job_id, state.value, reason)


async def note(site: Site, kind: str, job_id: str | None = None, **details: object) -> None:
    await asyncio.to_thread(site.audit.append, kind, job_id, **details)


async def clean_forever(site: Site, every_s: float = 3600.0) -> None:
    """What failed jobs wrote stays for the site's retention period, then goes (and the audit log says so)."""
    while True:
        kept = {held.job_id for held in await asyncio.to_thread(site.review.all)}
        for job_id in await asyncio.to_thread(clean_failed, site.settings.work_dir,
                                              site.settings.keep_failed_days * 86400, kept, time.time()):
            await note(site, "job_folder_removed", job_id, after_days=site.settings.keep_failed_days)
        await asyncio.sleep(every_s)


async def send_decisions_forever(site: Site) -> None:
    """The data owner decides in the CLI, which has no bus: what it decided leaves from here. The store is read only
    when it changed, or when a round failed."""
    seen: tuple[int, ...] = ()
    while True:
        await asyncio.sleep(site.settings.release_every_s)
        try:
            if (stamp := await asyncio.to_thread(site.review.stamp)) == seen:
                continue
            await send_decisions(site)
            # a file's time is the kernel's coarse clock (a few ms a tick): a write in the tick the stamp was read in
            # would leave it as it was, so a stamp that recent is looked at again on the next round
            seen = stamp if time.time_ns() - max(stamp) > SETTLED_NS else ()
        except Exception as exc:  # the bus is away: the decision stays unsent, and is sent on a later round
            log.warning("could not send the data owner's decisions yet: %s", exc)


def wiring(site_id: str, *, worker_id: str, max_deliver: int, ack_wait_s: float, max_jobs: int = 1) -> Wiring:
    """The worker's one consumer (its site's queue, `max_jobs` at once) and its ways out (results, reports).

    `site_id` may be `subjects.SITE`, the placeholder the AsyncAPI document shows.
    """
    return Wiring(
        owner=f"site-{site_id}", source=f"site:{site_id}/{worker_id}",
        consumers=(Consumer(run_job, subject=subjects.jobs(site_id), ack_wait_s=ack_wait_s, batch=1,
                            workers=max_jobs),),
        publishes=(Outlet(subjects.results(site_id), SiteResult), Outlet(subjects.reports(site_id), SiteReport)),
        # a container that failed is tried again after 2 s, then 4 s: long enough for a busy engine to recover
        retry=Retry(failures=max_deliver, waits=0, base_s=2.0, cap_s=30.0), outbox=False,
    )


def site_wiring(settings: Settings) -> Wiring:
    return wiring(subjects.token(settings.site_id, "site id"), worker_id=settings.worker_id,
                  max_deliver=settings.max_deliver, ack_wait_s=settings.ack_wait_s, max_jobs=settings.max_jobs)


def otlp_tls(settings: Settings) -> OtlpTls | None:
    """The site's proof of who it is to the centre's authenticated telemetry endpoint, where it chose to export there;
    a client certificate is never sent over plain HTTP."""
    if settings.otlp_cert is None and settings.otlp_key is None and settings.otlp_ca is None:
        return None
    if not (settings.otlp_endpoint or "").startswith("https://"):
        raise ValueError("otlp_ca, otlp_cert and otlp_key are for an https:// otlp_endpoint "
                         f"(it is {settings.otlp_endpoint or 'unset'})")
    return OtlpTls(settings.otlp_ca, settings.otlp_cert, settings.otlp_key)


def create_app(settings: Settings, runner: ContainerRunner, images: ImageStore | None = None,
               spans: SpanExporter | None = None, metric_reader: MetricReader | None = None) -> FastStream:
    """`images`: where pushed images are fetched from (unless given: S3 where `images_s3` says so, else the bus's
    object store); `spans`, `metric_reader`: where the spans and metrics go (unless given: OTLP where `otlp_endpoint`
    says so, else nowhere: a site's telemetry stays at the site unless it is configured to leave)."""
    key = KeyPair.load(settings.key_file)
    policies = PolicyFile(settings.policy_file)
    context = ContextRepo()
    plan = site_wiring(settings)
    told = telemetry(f"site-worker-{settings.site_id}", settings.otlp_endpoint, spans=spans,
                     metric_reader=metric_reader, tls=otlp_tls(settings))
    domain = settings.nats_domain or None  # unset, or set empty (compose passes it through): the centre itself
    broker = NatsBroker(servers(settings.nats_url), logger=None, context=context, middlewares=told.middlewares(),
                        js_options={"domain": domain} if domain else None,
                        **connection_options(plan.owner, settings.nats_url, settings.nats_creds, settings.nats_ca))
    outlets = plan.declare(broker, units=None, inbox=inbox_of(settings.nats_url, settings.nats_creds),
                           meters=told.meters)
    site = Site(settings, key, runner, outlets, plan.source, policies, Review(settings.review_file),
                AuditLog(settings.audit_file, key), asyncio.Lock(),
                images or (s3_store(settings.images_s3) if settings.images_s3 else BusImageStore(broker)),
                Capacity.of(runner, settings.gpus),
                Cancellations(lambda: broker.key_value(subjects.CANCELLED_BUCKET, declare=False),
                              settings.scheduler_public_key), told.tracer_provider.get_tracer("site_worker"),
                told.meters)
    context.set_global("site", site)
    app = FastStream(broker)
    tasks: list[asyncio.Task[None]] = []

    @app.on_startup
    async def prepare() -> None:
        """A worker killed mid-job leaves its container running: it goes before any new job starts. A policy that
        changed since the last start is in the audit log before any job is judged by it."""
        if removed := await asyncio.to_thread(runner.remove_leftovers):
            log.warning("removed %d container(s) a killed run of this worker left running", len(removed))
        await asyncio.to_thread(check_audit_log, site)
        await asyncio.to_thread(policy_in_force, site)

    @app.after_startup
    async def start_sending() -> None:
        tasks.append(asyncio.create_task(send_decisions_forever(site)))
        tasks.append(asyncio.create_task(clean_forever(site)))
        async def sites_bucket() -> HeartbeatStore:
            if domain is None:
                return await broker.key_value(subjects.SITES_BUCKET, declare=False)
            js = broker.config.connection_state.connection.jetstream(domain=domain)
            return LeafBucket(js, subjects.SITES_BUCKET, domain)

        sites = LazyBucket(sites_bucket)
        tasks.append(asyncio.create_task(beat_forever(sites, key, lambda: alive(site), settings.sites_every_s)))
        if settings.alive_file is not None:

            async def bus() -> bool:
                return await broker.ping(timeout=2.0)

            async def engine() -> bool:
                await asyncio.to_thread(runner.host)  # the engine answers (what it has is in the heartbeat)
                return True

            tasks.append(asyncio.create_task(keep_alive(settings.alive_file, [bus, engine])))

    @app.on_shutdown
    async def stop_sending() -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @app.after_shutdown
    async def send_the_rest() -> None:
        await asyncio.to_thread(told.shutdown)  # the last spans and metrics leave (a blocking HTTP call), if any

    return app


def alive(site: Site) -> m.SiteHeartbeat:
    """What this worker has, what of it is free, what runs, the policy it judges by (`assay sites list`), and the
    signed head of its audit log."""
    ledger, settings = site.capacity.ledger, site.settings

    def capacity(budget: Budget) -> m.Capacity:
        return m.Capacity(cpus=budget.cpus, memory_mb=budget.memory_mb, gpus=budget.gpus)

    alive = beat(settings.site_id, settings.worker_id, policy_digest=site.policies.current.digest,
                 capacity=capacity(ledger.budget), free=capacity(ledger.free()), running=ledger.running,
                 every_s=settings.sites_every_s)
    return alive.model_copy(update={"audit_head": site.audit.head()})  # what its log said, as it signed it


def check_audit_log(site: Site) -> None:
    """A worker whose audit log was changed behind its back takes no job: what it would add could not be trusted to
    follow what is there. A crash's half line is repaired by the next entry, and said so."""
    path = site.settings.audit_file
    if not path.exists():
        return
    verdict = verify_log(path, site.key.public_key)
    if not verdict.ok and not verdict.crash:
        raise RuntimeError(f"the site's audit log {path} fails its check: {verdict.problem}. Keep it for the "
                           "auditor, move it (and audit.head.json) aside, and start again with a new log")
    if verdict.crash:
        log.warning("audit log: %s", verdict.problem)


def policy_in_force(site: Site) -> SitePolicy:
    """The site's policy now; a change since the last one the audit log names is logged before any job is judged by
    it, and a file edited into an invalid state is said (the previous policy stays in force)."""
    policy = site.policies.fresh()
    if site.policies.error:
        log.error("site policy: %s", site.policies.error)
    if site.policies.logged is None:  # the first look since the start: what the audit log says was in force
        site.policies.logged = next((str(e.details.get("digest")) for e in reversed(site.audit.entries())
                                     if e.kind == "policy"), "")
    last = site.policies.logged
    if last != policy.digest:
        found = site.settings.policy_file
        site.audit.append("policy", None, digest=policy.digest, previous=last,
                          file=str(found) if found and found.exists() else "(none: the default policy)",
                          policy=policy.model_dump(mode="json"))
        site.policies.logged = policy.digest
    return policy
