"""The bus of `assay up` lets each process do only what it does, as compose's does: a process with no password
cannot connect, the CLI cannot announce events or send jobs, a site cannot publish as another site or as a service,
and no user reads another's replies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import nats
import pytest

from contracts import subjects
from contracts.signing import KeyPair


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Path]:
    """`assay up` with one site, running; its state folder."""
    for name in ("operator", "hospital-a"):
        KeyPair.generate().save(tmp_path / "keys" / f"{name}.key")
    subprocess.run([sys.executable, "-m", "assay", "--home", str(tmp_path), "site", "add", "hospital-a"], check=True,
                   capture_output=True)
    up = subprocess.Popen([sys.executable, "-m", "assay", "--home", str(tmp_path), "up"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "platform.json").exists():
            assert up.poll() is None and time.monotonic() < deadline, "assay up did not come up"
            time.sleep(0.1)
        yield tmp_path
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)


def urls(home: Path) -> dict[str, str]:
    """Every user's URL, from the server's configuration (which only this OS user may read)."""
    hostport = urlsplit(json.loads((home / "platform.json").read_text())["nats_url"]).netloc.split("@")[1]
    users = json.loads((home / "nats" / "users.conf").read_text().removeprefix("users: "))
    return {u["user"]: f"nats://{u['user']}:{u['password']}@{hostport}" for u in users if "user" in u}


async def violation(url: str, subject: str, *, subscribe: bool = False) -> str:
    """What the server says when `url`'s user publishes (or subscribes) on `subject`."""
    said: asyncio.Queue[str] = asyncio.Queue()

    async def note(exc: Exception) -> None:
        said.put_nowait(str(exc))

    nc = await nats.connect(url, error_cb=note, allow_reconnect=False)
    try:
        if subscribe:
            await nc.subscribe(subject)
        else:
            await nc.publish(subject, b"{}")
        await nc.flush()
        return await asyncio.wait_for(said.get(), 10)
    finally:
        await nc.close()


def test_each_process_of_assay_up_may_do_only_what_it_does(platform: Path) -> None:
    users = urls(platform)
    bare = f"nats://{urlsplit(users['cli']).netloc.split('@')[1]}"

    async def attempts() -> None:
        with pytest.raises(Exception, match="(?i)authorization"):
            await nats.connect(bare, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)
        for user, subject in (("cli", subjects.evt("association", "approved")), ("cli", subjects.jobs("hospital-a")),
                              ("site-hospital-a", subjects.evt("benchmark", "approved")),
                              ("site-hospital-a", subjects.results("hospital-b")),
                              ("registry", subjects.jobs("hospital-a")), ("approval", subjects.results("hospital-a")),
                              ("auditor", subjects.evt("result", "accepted")), ("auditor", subjects.results("x")),
                              ("auditor", subjects.cmd("registry", "register_actor")),
                              ("auditor", "$JS.API.CONSUMER.CREATE.JOBS")):
            said = await violation(users[user], subject)
            assert f'permissions violation for publish to "{subject}"'.lower() in said.lower(), (user, subject, said)
        for user, subject in (("site-hospital-a", "_INBOX.cli.>"), ("site-hospital-a", "_INBOX.>"),
                              ("registry", subjects.cmd("approval", ">")), ("auditor", "_INBOX.cli.>")):
            said = await violation(users[user], subject, subscribe=True)
            assert f'permissions violation for subscription to "{subject}"'.lower() in said.lower(), (user, subject)

    asyncio.run(attempts())
    logs = " ".join(log.read_text(errors="replace") for log in (platform / "logs").glob("*.log"))
    assert not [user for user, url in users.items() if urlsplit(url).password in logs], "a password was logged"


def test_only_the_scheduler_cancels_and_a_site_reads_only_its_own_cancellations(platform: Path) -> None:
    users = urls(platform)

    async def attempts() -> None:
        scheduler = await nats.connect(users["scheduling"], inbox_prefix="_INBOX.scheduling")
        for site_id in ("hospital-a", "hospital-b"):
            await scheduler.jetstream().publish(subjects.cancelled(site_id, "job-1"), site_id.encode(), timeout=10)
        await scheduler.close()
        site = await nats.connect(users["site-hospital-a"], inbox_prefix="_INBOX.site-hospital-a")
        bucket = await site.jetstream().key_value(subjects.CANCELLED_BUCKET)
        assert (await bucket.get("hospital-a.job-1")).value == b"hospital-a"
        await site.close()
        for subject in (subjects.cancelled("hospital-a", "job-2"),
                        "$JS.API.DIRECT.GET.KV_assay-cancelled.$KV.assay-cancelled.hospital-b.job-1",
                        "$JS.API.STREAM.MSG.GET.KV_assay-cancelled"):
            said = await violation(users["site-hospital-a"], subject)
            assert f'permissions violation for publish to "{subject}"'.lower() in said.lower(), (subject, said)

    asyncio.run(attempts())


def test_a_command_through_the_cli_still_works_as_its_own_user(platform: Path) -> None:
    KeyPair.generate().save(platform / "keys" / "vendor.key")
    done = subprocess.run([sys.executable, "-m", "assay", "--home", str(platform), "actor", "register", "vendor",
                           "--role", "model_owner", "--as", "operator"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0 and "registered model_owner vendor" in done.stdout, done.stderr


def test_an_integration_follows_the_events_through_its_own_durable_and_loses_none_while_away(platform: Path) -> None:
    def assay(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "assay", "--home", str(platform), *args], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})

    def registered(lines: str) -> list[str]:
        return [json.loads(line)["data"]["actor_id"] for line in lines.splitlines()
                if json.loads(line)["type"] == "assay.v1.ActorRegistered"]

    for name in ("vendor", "rival"):
        KeyPair.generate().save(platform / "keys" / f"{name}.key")
    assert assay("actor", "register", "vendor", "--role", "model_owner", "--as", "operator").returncode == 0
    first = assay("events", "follow", "--count", "2", "--json")  # from the start of the history
    assert assay("actor", "register", "rival", "--role", "model_owner", "--as", "operator").returncode == 0  # away
    second = assay("events", "follow", "--count", "1", "--json")
    none_left = assay("events", "follow", "--count", "1", "--wait", "1")

    assert first.returncode == 0 and registered(first.stdout) == ["operator", "vendor"], first.stderr
    assert second.returncode == 0 and registered(second.stdout) == ["rival"], second.stderr  # not vendor's again
    assert none_left.returncode == 1 and "only 0 of 1 event(s) came within 1 s" in none_left.stderr
    users = urls(platform)

    async def attempts() -> None:
        for subject in (subjects.evt("actor", "registered"), subjects.cmd("registry", "register_actor"),
                        "$JS.API.CONSUMER.CREATE.EVENTS.registry-actor-registered",
                        "$JS.API.CONSUMER.CREATE.RESULTS", "$JS.API.STREAM.INFO.JOBS"):
            said = await violation(users["integration"], subject)
            assert f'permissions violation for publish to "{subject}"'.lower() in said.lower(), (subject, said)

    asyncio.run(attempts())
