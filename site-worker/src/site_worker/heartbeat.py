"""A site worker's heartbeat: its signed word, every few seconds, in the KV bucket `assay-sites` under
`<site_id>.<worker_id>` (capacity, what is free, load, version, policy digest); and the reading of that bucket into
who is online, busy, or silent since when."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import NamedTuple, Protocol

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from pydantic import ValidationError

from contracts.envelope import Envelope, describe, utcnow
from contracts.messages import Capacity, SiteHeartbeat
from contracts.signing import KeyPair, SignatureError, verify
from contracts.subjects import SITES_BUCKET

log = logging.getLogger("site_worker.heartbeat")

SILENT_AFTER_BEATS = 3     # a worker that missed this many beats in a row is silent


class HeartbeatStore(Protocol):
    """Where heartbeats go: nats-py's `KeyValue` (from `js.key_value(SITES_BUCKET)`) or a fake."""

    async def put(self, key: str, value: bytes) -> int: ...


class LeafBucket:
    """A bucket of the centre's, written through a leaf node of the site's: nats-py writes `$KV.<bucket>.<key>`, which
    a leaf node does not carry into another JetStream domain; the domain's own subject for the write it does."""

    def __init__(self, js: JetStreamContext, bucket: str, domain: str) -> None:
        self._js, self._prefix = js, f"$JS.{domain}.API.$KV.{bucket}."

    async def put(self, key: str, value: bytes) -> int:
        return (await self._js.publish(self._prefix + key, value)).seq


class LazyBucket:
    """A store opened at its first put, and opened again after an open that failed: a worker may start while the
    bus, or the bucket, is not there yet (its beats fail, and say so, until it is)."""

    def __init__(self, open: Callable[[], Awaitable[HeartbeatStore]]) -> None:
        self._open = open
        self._store: HeartbeatStore | None = None

    async def put(self, key: str, value: bytes) -> int:
        if self._store is None:
            self._store = await self._open()
        return await self._store.put(key, value)


def key_of(site_id: str, worker_id: str) -> str:
    return f"{site_id}.{worker_id}"


def assay_version() -> str:
    try:
        return importlib.metadata.version("assay")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def host_load() -> float:
    try:
        return max(0.0, os.getloadavg()[0])
    except (OSError, AttributeError):  # a platform without a load average
        return 0.0


def beat(site_id: str, worker_id: str, *, policy_digest: str, capacity: Capacity, free: Capacity, running: int,
         every_s: float, at: datetime | None = None) -> SiteHeartbeat:
    """The heartbeat a worker sends now: what it has, what is free of it, what runs, and this host's load."""
    return SiteHeartbeat(site_id=site_id, worker_id=worker_id, version=assay_version(), policy_digest=policy_digest,
                         capacity=capacity, free=free, running=running, load=host_load(), every_s=every_s,
                         at=at or utcnow())


def signed_value(heartbeat: SiteHeartbeat, key_pair: KeyPair) -> bytes:
    source = f"site:{heartbeat.site_id}/{heartbeat.worker_id}"
    return key_pair.sign(Envelope.wrap(heartbeat, source=source)).model_dump_json().encode()


async def beat_forever(kv: HeartbeatStore, key_pair: KeyPair, make: Callable[[], SiteHeartbeat],
                       every_s: float) -> None:
    """Put a signed heartbeat every `every_s` seconds, the first at once, until cancelled. A beat that cannot be
    built or put is logged and the next one tries again: a heartbeat loses nothing when one is missed, and a loop
    that died would make a working worker look silent."""
    while True:
        try:
            heartbeat = make()
            await kv.put(key_of(heartbeat.site_id, heartbeat.worker_id), signed_value(heartbeat, key_pair))
        except Exception as exc:  # the bus is away, or the worker's state could not be read: try at the next beat
            log.warning("could not send a heartbeat (trying again in %g s): %s: %s", every_s, type(exc).__name__, exc)
        await asyncio.sleep(every_s)


# --- reading --------------------------------------------------------------------------------------------------------


class Reading(NamedTuple):
    """One key of the bucket: its heartbeat when it can be trusted (or, with a problem saying so, when it could not
    be checked here), else None and what is wrong with it."""

    key: str
    heartbeat: SiteHeartbeat | None
    problem: str = ""


def no_public_key(site_id: str) -> str:
    return f"unverified: no public key for {site_id} here"


def check(key: str, value: bytes, public_keys: Mapping[str, str]) -> Reading:
    """Whether the value under `key` is a heartbeat its site signed for that very key."""
    try:
        envelope = Envelope[SiteHeartbeat].model_validate_json(value)
    except ValidationError as exc:
        return Reading(key, None, f"not a heartbeat: {describe(exc)}")
    heartbeat = envelope.data
    if key != key_of(heartbeat.site_id, heartbeat.worker_id):
        return Reading(key, None, f"claims to be {key_of(heartbeat.site_id, heartbeat.worker_id)}")
    public_key = public_keys.get(heartbeat.site_id)
    if public_key is None:
        if envelope.signature is None:
            return Reading(key, None, "the heartbeat is not signed")
        return Reading(key, heartbeat, no_public_key(heartbeat.site_id))
    try:
        verify(envelope, public_key)
    except SignatureError as exc:
        return Reading(key, None, f"not signed by site {heartbeat.site_id}: {exc}")
    return Reading(key, heartbeat)


async def latest_values(js: JetStreamContext) -> dict[str, bytes]:
    """Every key of the bucket with its latest value, deleted keys left out, by request and reply alone: the
    bucket's keys from its stream's info, then each one's last value. No consumer is made (so a reader needs no
    right to make one, and nothing of its reading stays on the server). BucketNotFoundError when there is none."""
    kv = await js.key_value(SITES_BUCKET)
    prefix = f"$KV.{SITES_BUCKET}."
    info = await js.stream_info(f"KV_{SITES_BUCKET}", subjects_filter=prefix + ">")
    values: dict[str, bytes] = {}
    for subject in sorted(info.state.subjects or {}):  # a request each: a federation has tens of workers, not more
        key = subject.removeprefix(prefix)
        try:
            values[key] = (await kv.get(key, validate_keys=False)).value or b""
        except KeyNotFoundError:  # deleted, or purged since the listing
            continue
    return values


async def read_heartbeats(js: JetStreamContext, public_keys: Mapping[str, str]) -> list[Reading]:
    """Every heartbeat in the bucket, each checked against its site's public key (site_id -> key), by key."""
    return [check(key, value, public_keys) for key, value in (await latest_values(js)).items()]


class State(StrEnum):
    ONLINE = "online"
    BUSY = "busy"
    SILENT = "silent"


@dataclass(frozen=True)
class Standing:
    heartbeat: SiteHeartbeat
    state: State
    age_s: float  # since its last beat (negative when its clock is ahead of the reader's)

    @property
    def last_seen(self) -> datetime:
        return self.heartbeat.at


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def standing(heartbeats: list[SiteHeartbeat], now: datetime) -> list[Standing]:
    """Where each worker stands at `now`: silent when its last beat is older than a few of its own beats, else busy
    while it runs a job, else online. By site, then worker."""
    found = []
    for hb in sorted(heartbeats, key=lambda hb: (hb.site_id, hb.worker_id)):
        age = (_aware(now) - _aware(hb.at)).total_seconds()
        if age > SILENT_AFTER_BEATS * hb.every_s:
            state = State.SILENT
        else:
            state = State.BUSY if hb.running > 0 else State.ONLINE
        found.append(Standing(hb, state, age))
    return found
