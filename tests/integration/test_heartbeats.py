"""Heartbeats on a real nats-server: a worker's beats land in the `assay-sites` bucket, signed, one value per worker;
read back they say it is online or busy, and once it stops beating it reads as silent since its last beat. A value
put under a site's key by anyone else is a problem, never a standing; a site's user may beat under its own keys only,
a reader may read and not write; `assay sites list` shows it all."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import nats
import pytest
from nats.js.kv import KeyValue
from rich.console import Console
from typer.testing import CliRunner

from assay import cli
from assay.home import Home
from assay.sites_cli import sites_list
from contracts.messages import Capacity, SiteHeartbeat
from contracts.signing import KeyPair
from contracts.subjects import SITES_BUCKET
from assay.access import READ_HEARTBEATS as READ_RIGHTS
from assay.access import heartbeat_rights as site_rights
from contracts.streams import ensure_sites_bucket
from site_worker.heartbeat import (
    State,
    beat,
    beat_forever,
    read_heartbeats,
    signed_value,
    standing,
)
from tests.conftest import serving_nats

SITE = "hospital-a"
POLICY = "sha256:" + "0f" * 32
HOST = Capacity(cpus=4, memory_mb=8192, gpus=())
EVERY_S = 0.05


class CountingKV:
    """The real bucket, and an event once it took `want` beats: the test waits on that, not on a clock."""

    def __init__(self, kv: KeyValue, want: int) -> None:
        self.kv, self.want, self.puts = kv, want, 0
        self.enough = asyncio.Event()

    async def put(self, key: str, value: bytes) -> int:
        revision = await self.kv.put(key, value)
        self.puts += 1
        if self.puts >= self.want:
            self.enough.set()
        return revision


def maker(worker: str, running: Callable[[], int]) -> Callable[[], SiteHeartbeat]:
    return lambda: beat(SITE, worker, policy_digest=POLICY, capacity=HOST, free=HOST, running=running(),
                        every_s=EVERY_S)


async def beat_a_while(kv: KeyValue, key: KeyPair, make: Callable[[], SiteHeartbeat], beats: int) -> None:
    counting = CountingKV(kv, beats)
    task = asyncio.create_task(beat_forever(counting, key, make, EVERY_S))
    try:
        await asyncio.wait_for(counting.enough.wait(), timeout=30)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_beats_read_back_as_online_or_busy_then_silent_once_they_stop(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        kv = await ensure_sites_bucket(js)
        await ensure_sites_bucket(js)  # declaring it again changes nothing
        site = KeyPair.generate()
        await beat_a_while(kv, site, maker("idle", lambda: 0), beats=2)
        await beat_a_while(kv, site, maker("working", lambda: 1), beats=2)

        readings = await read_heartbeats(js, {SITE: site.public_key})
        assert [(r.key, r.problem) for r in readings] == [(f"{SITE}.idle", ""), (f"{SITE}.working", "")]
        beats = [r.heartbeat for r in readings if r.heartbeat is not None]
        for r in readings:
            assert len(await kv.history(r.key)) == 1  # the latest beat only, of the two or more put
        # each as it stood when it last beat (one moment for both would time how long the test took between them)
        assert [(hb.worker_id, standing([hb], hb.at)[0].state) for hb in beats] == [
            ("idle", State.ONLINE), ("working", State.BUSY)]
        last = max(hb.at for hb in beats)

        # nobody beats any more: a little past three beats after its last, each worker is silent since that beat
        later = last + timedelta(seconds=3 * EVERY_S + 0.001)
        for s in standing(beats, later):
            assert s.state is State.SILENT and s.last_seen == s.heartbeat.at
    finally:
        await nc.close()


async def test_a_heartbeat_put_under_a_site_by_another_key_is_not_trusted(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        kv = await ensure_sites_bucket(nc.jetstream())
        site, intruder = KeyPair.generate(), KeyPair.generate()
        await kv.put(f"{SITE}.worker-1", signed_value(maker("worker-1", lambda: 0)(), intruder))
        await kv.put(f"{SITE}.gone", signed_value(maker("gone", lambda: 0)(), site))
        await kv.delete(f"{SITE}.gone")  # an operator removed a worker that is no more
        [reading] = await read_heartbeats(nc.jetstream(), {SITE: site.public_key})
        assert reading.heartbeat is None and f"not signed by site {SITE}" in reading.problem
    finally:
        await nc.close()


async def test_an_empty_bucket_reads_as_no_heartbeats(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        await ensure_sites_bucket(nc.jetstream())
        assert await read_heartbeats(nc.jetstream(), {}) == []
    finally:
        await nc.close()


@pytest.fixture
def home(tmp_path: Path, nats_url: str, monkeypatch: pytest.MonkeyPatch) -> Home:
    """A state folder as `assay up` leaves it: where the bus is, and the site set up with its key."""
    home = Home(tmp_path / "assay")
    home.root.mkdir()
    home.platform_file.write_text(json.dumps({"nats_url": nats_url}))
    home.site_dir(SITE).mkdir(parents=True)
    (home.site_dir(SITE) / "site.json").write_text("{}")
    monkeypatch.setitem(cli.state, "home", home)
    monkeypatch.setattr(cli, "console", Console(width=250))  # one line a row, whatever the terminal here
    return home


def list_sites(*args: str) -> tuple[int, str]:
    import typer

    app = typer.Typer()
    app.command()(sites_list)
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


async def test_sites_list_shows_each_worker_and_says_when_none_reported(home: Home, nats_url: str) -> None:
    code, out = await asyncio.to_thread(list_sites)
    assert code == 0 and "no site worker has reported yet" in out  # not even the bucket is there yet

    site, stranger = KeyPair.generate(), KeyPair.generate()
    site.save(home.key_file(SITE))
    nc = await nats.connect(nats_url)
    try:
        kv = await ensure_sites_bucket(nc.jetstream())
        await beat_a_while(kv, site, maker("worker-1", lambda: 1), beats=1)
        other = beat("hospital-b", "w1", policy_digest=POLICY, capacity=HOST, free=HOST, running=0, every_s=EVERY_S)
        await kv.put("hospital-b.w1", signed_value(other, stranger))
    finally:
        await nc.close()

    code, out = await asyncio.to_thread(list_sites)
    flat = " ".join(out.split())
    assert code == 0, out
    assert "busy (1 running)" in flat or "silent since" in flat  # the reading is not timed: either is right
    assert "hospital-b.w1: unverified: no public key for hospital-b here" in flat
    assert POLICY[:19] in flat and "4/4" in flat

    code, out = await asyncio.to_thread(list_sites, "--json")
    doc = json.loads(out)
    assert code == 0 and [(w["site_id"], w["problem"]) for w in doc["workers"]] == [
        (SITE, None), ("hospital-b", "unverified: no public key for hospital-b here")]
    assert datetime.fromisoformat(doc["workers"][0]["last_seen"]) == \
        SiteHeartbeat.model_validate(doc["workers"][0]["heartbeat"]).at


@pytest.fixture
def guarded_bus(tmp_path: Path) -> Iterator[str]:
    """A JetStream server whose site and reader users have the rights heartbeat.py names, and nothing else; its
    host:port (users `admin`, `site-hospital-a`, `reader`, each with the password `pw`)."""
    users = [{"user": "admin", "password": "pw", "permissions": {"publish": [">"], "subscribe": [">"]}},
             {"user": f"site-{SITE}", "password": "pw",
              "permissions": {"publish": site_rights(SITE), "subscribe": [f"_INBOX.site-{SITE}.>"]}},
             {"user": "reader", "password": "pw",
              "permissions": {"publish": READ_RIGHTS, "subscribe": ["_INBOX.reader.>"]}}]
    with serving_nats(tmp_path / "guarded", f"authorization {{\n  users: {json.dumps(users)}\n}}\n") as url:
        yield url.removeprefix("nats://")


async def as_user(hostport: str, user: str) -> nats.NATS:
    return await nats.connect(f"nats://{user}:pw@{hostport}", inbox_prefix=f"_INBOX.{user}", allow_reconnect=False)


async def test_a_site_beats_under_its_own_keys_only_and_a_reader_reads_without_writing(guarded_bus: str) -> None:
    admin = await as_user(guarded_bus, "admin")
    await ensure_sites_bucket(admin.jetstream())
    await admin.close()
    key = KeyPair.generate()
    own = maker("worker-1", lambda: 0)()
    other = beat("hospital-b", "w1", policy_digest=POLICY, capacity=HOST, free=HOST, running=0, every_s=EVERY_S)

    site = await as_user(guarded_bus, f"site-{SITE}")
    try:
        kv = await site.jetstream(timeout=2).key_value(SITES_BUCKET)  # what faststream's key_value(declare=False) does
        await kv.put(f"{SITE}.worker-1", signed_value(own, key))
        with pytest.raises(nats.errors.TimeoutError):  # the server refuses it: no ack comes
            await kv.put("hospital-b.w1", signed_value(other, key))
    finally:
        await site.close()

    reader = await as_user(guarded_bus, "reader")
    try:
        readings = await read_heartbeats(reader.jetstream(timeout=2), {SITE: key.public_key})
        assert [(r.key, r.problem) for r in readings] == [(f"{SITE}.worker-1", "")]
        with pytest.raises(nats.errors.TimeoutError):
            await (await reader.jetstream(timeout=2).key_value(SITES_BUCKET)).put(f"{SITE}.worker-1", b"{}")
    finally:
        await reader.close()
