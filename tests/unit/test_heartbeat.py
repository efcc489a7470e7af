"""Heartbeats: who is online, busy or silent at a given moment; a value not signed by its site is a problem, never a
standing; the beating loop outlives a bus that is away; and `assay sites list` shows all of it."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest
from nats.js.errors import BucketNotFoundError
from rich.console import Console

from assay import cli
from assay.sites_cli import ago, show
from contracts.envelope import Envelope
from contracts.messages import Capacity, SiteHeartbeat
from contracts.signing import KeyPair
from site_worker.heartbeat import (
    LazyBucket,
    Reading,
    State,
    beat,
    beat_forever,
    check,
    key_of,
    no_public_key,
    signed_value,
    standing,
)

NOON = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
POLICY = "sha256:" + "ab" * 32
HOST = Capacity(cpus=8, memory_mb=32768, gpus=("GPU-0", "GPU-1"))


def heartbeat(site: str = "hospital-a", worker: str = "worker-1", *, running: int = 0, at: datetime = NOON,
              every_s: float = 10.0) -> SiteHeartbeat:
    free = HOST if running == 0 else Capacity(cpus=6, memory_mb=28672, gpus=("GPU-1",))
    return beat(site, worker, policy_digest=POLICY, capacity=HOST, free=free, running=running, every_s=every_s,
                at=at)


def test_a_worker_that_beat_lately_and_runs_nothing_is_online() -> None:
    [s] = standing([heartbeat()], NOON + timedelta(seconds=25))
    assert s.state is State.ONLINE and s.age_s == 25


def test_a_worker_that_beat_lately_and_runs_a_job_is_busy() -> None:
    [s] = standing([heartbeat(running=1)], NOON + timedelta(seconds=5))
    assert s.state is State.BUSY


def test_a_worker_silent_for_more_than_three_of_its_beats_is_silent_since_its_last() -> None:
    hb = heartbeat(running=1, every_s=10)
    assert standing([hb], NOON + timedelta(seconds=30))[0].state is State.BUSY  # three beats missed at most
    [s] = standing([hb], NOON + timedelta(seconds=31))
    assert s.state is State.SILENT and s.last_seen == NOON


def test_each_worker_is_judged_by_its_own_beat_and_listed_by_site_then_worker() -> None:
    slow = heartbeat("hospital-b", "w1", every_s=60, at=NOON)
    fast = heartbeat("hospital-a", "w2", every_s=1, at=NOON)
    busy = heartbeat("hospital-a", "w1", running=2, at=NOON + timedelta(seconds=100))
    found = standing([slow, fast, busy], NOON + timedelta(seconds=120))
    assert [(s.heartbeat.site_id, s.heartbeat.worker_id, s.state) for s in found] == [
        ("hospital-a", "w1", State.BUSY), ("hospital-a", "w2", State.SILENT), ("hospital-b", "w1", State.ONLINE)]


def test_a_heartbeat_says_its_version_and_the_hosts_load() -> None:
    hb = heartbeat()
    assert hb.version and hb.load >= 0 and hb.policy_digest == POLICY


def test_a_heartbeat_signed_by_its_site_is_trusted() -> None:
    site = KeyPair.generate()
    hb = heartbeat()
    assert check(key_of("hospital-a", "worker-1"), signed_value(hb, site), {"hospital-a": site.public_key}) == \
        Reading("hospital-a.worker-1", hb, "")


def test_a_heartbeat_signed_by_another_key_is_a_problem_not_a_standing() -> None:
    site, other = KeyPair.generate(), KeyPair.generate()
    reading = check("hospital-a.worker-1", signed_value(heartbeat(), other), {"hospital-a": site.public_key})
    assert reading.heartbeat is None and "not signed by site hospital-a" in reading.problem


def test_an_unsigned_or_altered_heartbeat_is_a_problem() -> None:
    site = KeyPair.generate()
    keys = {"hospital-a": site.public_key}
    unsigned = Envelope.wrap(heartbeat(), source="site:hospital-a/worker-1").model_dump_json().encode()
    assert "not signed" in check("hospital-a.worker-1", unsigned, keys).problem
    altered = json.loads(signed_value(heartbeat(running=1), site))
    altered["data"]["running"] = 0  # a busy worker made to look idle
    reading = check("hospital-a.worker-1", json.dumps(altered).encode(), keys)
    assert reading.heartbeat is None and "does not match" in reading.problem
    assert check("hospital-a.worker-1", b"{not json", keys).problem.startswith("not a heartbeat")


def test_a_site_cannot_speak_for_another_key() -> None:
    site = KeyPair.generate()
    value = signed_value(heartbeat("hospital-a", "worker-1"), site)
    reading = check("hospital-a.worker-2", value, {"hospital-a": site.public_key})
    assert reading.heartbeat is None and reading.problem == "claims to be hospital-a.worker-1"


def test_a_heartbeat_from_a_site_whose_key_is_not_here_is_shown_unverified() -> None:
    reading = check("hospital-z.worker-1", signed_value(heartbeat("hospital-z"), KeyPair.generate()), {})
    assert reading.heartbeat is not None and reading.problem == no_public_key("hospital-z")


class FakeKV:
    """A bucket whose first put fails as if the bus were away; it tells when it holds enough beats."""

    def __init__(self, want: int) -> None:
        self.values: list[tuple[str, bytes]] = []
        self.attempts = 0
        self.want = want
        self.enough = asyncio.Event()

    async def put(self, key: str, value: bytes) -> int:
        self.attempts += 1
        if self.attempts == 1:
            raise ConnectionError("nats: connection closed")
        self.values.append((key, value))
        if len(self.values) >= self.want:
            self.enough.set()
        return len(self.values)


async def test_beating_survives_a_failed_put_and_stops_when_cancelled(caplog: pytest.LogCaptureFixture) -> None:
    site, kv = KeyPair.generate(), FakeKV(want=2)
    task = asyncio.create_task(beat_forever(kv, site, lambda: heartbeat(at=datetime.now(UTC)), every_s=0.001))
    await asyncio.wait_for(kv.enough.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "could not send a heartbeat" in caplog.text and "connection closed" in caplog.text
    for key, value in kv.values:
        assert key == "hospital-a.worker-1"
        assert check(key, value, {"hospital-a": site.public_key}).problem == ""


async def test_a_beat_that_cannot_be_built_is_logged_and_the_next_one_goes(caplog: pytest.LogCaptureFixture) -> None:
    made = 0

    def make() -> SiteHeartbeat:
        nonlocal made
        made += 1
        if made == 1:
            raise OSError("policy file unreadable")
        return heartbeat()

    kv = FakeKV(want=1)
    kv.attempts = 1  # its one failure spent: only the first make fails here
    task = asyncio.create_task(beat_forever(kv, KeyPair.generate(), make, every_s=0.001))
    await asyncio.wait_for(kv.enough.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "policy file unreadable" in caplog.text


async def test_a_bucket_not_there_at_the_start_is_opened_at_a_later_beat(caplog: pytest.LogCaptureFixture) -> None:
    kv, opened = FakeKV(want=1), 0
    kv.attempts = 1  # its own failure spent: only the opening fails here

    async def open_bucket() -> FakeKV:
        nonlocal opened
        opened += 1
        if opened == 1:
            raise BucketNotFoundError(description="bucket not found")  # as nats-py says it, before provisioning
        return kv

    task = asyncio.create_task(beat_forever(LazyBucket(open_bucket), KeyPair.generate(), heartbeat, every_s=0.001))
    await asyncio.wait_for(kv.enough.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert opened == 2 and "bucket not found" in caplog.text


def test_ago_says_how_long_in_the_largest_unit() -> None:
    assert [ago(s) for s in (4, 300, 7200, 200000)] == ["4 s", "5 min", "2 h", "2 d"]


def test_the_list_shows_each_state_and_what_could_not_be_trusted(capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "console", Console(width=300))  # one line a row, whatever the terminal here
    site = KeyPair.generate()
    keys = {"hospital-a": site.public_key}
    readings = [check("hospital-a.w1", signed_value(heartbeat(worker="w1"), site), keys),
                check("hospital-a.w2", signed_value(heartbeat(worker="w2", running=1), site), keys),
                check("hospital-a.w3", signed_value(heartbeat(worker="w3", at=NOON - timedelta(minutes=5)), site),
                      keys),
                check("hospital-a.w4", signed_value(heartbeat(worker="w4"), KeyPair.generate()), keys),
                check("hospital-z.w1", signed_value(heartbeat("hospital-z", "w1"), KeyPair.generate()), keys)]
    show(readings, NOON + timedelta(seconds=1), as_json=False)
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("online", "busy (1 running)", "silent since", "(5 min)", "not trusted", "6/8", "1/2",
                  "unverified: no public key for hospital-z here", POLICY[:19]):
        assert shown in out, shown
    show(readings, NOON + timedelta(seconds=1), as_json=True)
    doc = json.loads(capsys.readouterr().out)
    assert [w["state"] for w in doc["workers"]] == ["online", "busy", "silent", "online"]
    assert doc["workers"][2]["silent_s"] == 301.0
    assert [r["key"] for r in doc["not_trusted"]] == ["hospital-a.w4"]


def test_an_empty_bucket_says_nobody_reported(capsys: pytest.CaptureFixture[str]) -> None:
    show([], NOON, as_json=False)
    assert "no site worker has reported yet" in capsys.readouterr().out
