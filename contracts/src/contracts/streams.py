"""The JetStream streams, declared once from here by whoever provisions the bus (`assay up`, compose init)."""

from __future__ import annotations

from dataclasses import replace

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, ObjectStoreConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue

from contracts import subjects as s

DUPLICATE_WINDOW_S = 120.0
# how long a publisher waits for the server to confirm a stored message; faststream's default of 0.5 s is too short
# for a server that fsyncs every write under load (a timeout re-runs finished jobs and republishes outbox batches)
PUBLISH_TIMEOUT_S = 10.0

DAY_S = 24 * 3600.0
HEARTBEAT_BYTES = 16 << 10  # one site worker's signed heartbeat: a few hundred bytes; more is not a heartbeat
# Sized for a federation's lifetime, by message count (a byte limit would reserve that much disk on every server):
# an event or a result is 1-3 KiB, so 20 million of them are tens of GiB. EVENTS and RESULTS are the history the
# board is rebuilt and checked from, so nothing is ever dropped from them: a full stream refuses new messages,
# which every publisher retries and says so, for an operator to act on. A job waits at most the scheduler's
# job_ttl_days (30 by default); a dead letter is kept half a year.
STREAMS: tuple[StreamConfig, ...] = (
    StreamConfig(name=s.EVENTS_STREAM, subjects=[s.EVENTS_ALL], storage=StorageType.FILE,
                 retention=RetentionPolicy.LIMITS, duplicate_window=DUPLICATE_WINDOW_S,
                 max_msgs=20_000_000, discard=DiscardPolicy.NEW),
    StreamConfig(name=s.JOBS_STREAM, subjects=[s.JOBS_ALL], storage=StorageType.FILE,
                 retention=RetentionPolicy.WORK_QUEUE, duplicate_window=DUPLICATE_WINDOW_S,
                 max_age=31 * DAY_S, max_msgs=5_000_000, discard=DiscardPolicy.NEW),
    StreamConfig(name=s.RESULTS_STREAM, subjects=[s.RESULTS_ALL, s.REPORTS_ALL], storage=StorageType.FILE,
                 retention=RetentionPolicy.LIMITS, duplicate_window=DUPLICATE_WINDOW_S,
                 max_msgs=20_000_000, discard=DiscardPolicy.NEW),
    StreamConfig(name=s.DEAD_LETTERS_STREAM, subjects=[s.DEAD_LETTERS_ALL], storage=StorageType.FILE,
                 retention=RetentionPolicy.LIMITS, duplicate_window=DUPLICATE_WINDOW_S,
                 max_age=183 * DAY_S, max_msgs=1_000_000, discard=DiscardPolicy.OLD),
)


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """Create the streams, the images' object store and the buckets, or bring an existing stream to this
    configuration. `replicas`: how many servers keep each (1 on one server; 3 on a cluster of three or more, so
    that losing one server loses nothing and stops nothing); said by whoever knows the bus, never guessed."""
    for config in STREAMS:
        config = replace(config, num_replicas=replicas)
        try:
            await js.add_stream(config=config)
        except BadRequestError:
            await js.update_stream(config=config)
    images = ObjectStoreConfig(storage=StorageType.FILE, description="docker save archives, named by image id",
                               replicas=replicas)
    try:
        await js.create_object_store(s.IMAGES_BUCKET, config=images)
    except BadRequestError:  # there already, made with another replica count: brought to this one below
        pass
    await ensure_sites_bucket(js, replicas)
    await ensure_cancelled_bucket(js, replicas)
    for bucket in (f"OBJ_{s.IMAGES_BUCKET}", f"KV_{s.SITES_BUCKET}", f"KV_{s.CANCELLED_BUCKET}"):
        config = (await js.stream_info(bucket)).config  # a bucket made on fewer servers (one, before a cluster)
        if config.num_replicas != replicas:
            await js.update_stream(config=replace(config, num_replicas=replicas))


async def ensure_cancelled_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """The bucket of cancellations: read by direct get only (a site's permission names its own keys), kept as long
    as a job may wait in its queue."""
    try:
        return await js.create_key_value(bucket=s.CANCELLED_BUCKET, history=1, storage=StorageType.FILE,
                                         ttl=31 * DAY_S, direct=True, max_value_size=HEARTBEAT_BYTES,
                                         replicas=replicas,
                                         description="the scheduler's signed JobCancelled, by site and job")
    except BadRequestError:
        return await js.key_value(s.CANCELLED_BUCKET)


async def ensure_sites_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """Create the bucket of heartbeats (the latest value per key, on disk), or open the one that is there."""
    try:
        return await js.create_key_value(bucket=s.SITES_BUCKET, history=1, storage=StorageType.FILE,
                                         max_value_size=HEARTBEAT_BYTES, replicas=replicas,
                                         description="each site worker's latest signed SiteHeartbeat")
    except BadRequestError:  # there already, made with another configuration: what it holds reads the same
        return await js.key_value(s.SITES_BUCKET)
