"""Onboarding on a running `assay up`: each member makes its own NATS key and sends only the public half, the operator
enrols it with `assay bus enrol` (the server takes it with no restart), and the credentials that issues give each
role what it needs and nothing else. A site reads neither another site's jobs nor its results nor its replies; a model
owner never sees a site's dataset statistics; an integration reads the events and does nothing else; a revoked site
is cut off at once and refused from then on. A site worker connects as its enrolled key."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nkeys
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from assay.platform import free_ports, nats_server_binary, private
from assay.roster import public_of
from contracts import messages as m
from contracts import subjects
from contracts.envelope import Envelope
from contracts.signing import KeyPair
from site_worker.config import Settings as SiteSettings
from site_worker.images import NatsImageStore


def assay(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ASSAY_")}
    return subprocess.run([sys.executable, "-m", "assay", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=120, env={**clean, "COLUMNS": "200"})


@pytest.fixture
def central(tmp_path: Path) -> Iterator[Path]:
    """The operator's `assay up`, with no site of its own; its state folder."""
    home = tmp_path / "central"
    KeyPair.generate().save(home / "keys" / "operator.key")
    up = subprocess.Popen([sys.executable, "-m", "assay", "--home", str(home), "up", "--leaf-port",
                           str(free_ports(1)[0])], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not (home / "platform.json").exists():
            assert up.poll() is None and time.monotonic() < deadline, "assay up did not come up"
            time.sleep(0.1)
        yield home
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)


def onboard(central: Path, member_home: Path, name: str, role: str) -> dict[str, Any]:
    """The member's one command, the operator's one command, and the bundle it hands back."""
    made = assay(member_home, "bus", "key", name)
    assert made.returncode == 0, made.stderr
    public = made.stdout.strip().splitlines()[-1]
    assert not (member_home / "keys" / f"{name}.nk").read_text().startswith(public), "the seed is not what is sent"
    enrolled = assay(central, "bus", "enrol", name, "--role", role, "--nkey", public)
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    assert "with no restart" in enrolled.stdout
    bundle = json.loads(enrolled.stdout[enrolled.stdout.index("{"):])
    seed = (member_home / "keys" / f"{name}.nk").read_text().strip()
    assert bundle["nkey"] == public and seed not in json.dumps(bundle), "the bundle holds no seed"
    return bundle


class Member:
    """A connection as an enrolled member, and the permission violations the server reports on it."""

    def __init__(self, url: str, seed: Path) -> None:
        self.url, self.seed = url, seed
        self.inbox = f"_INBOX.{public_of(seed)}"
        self.said: asyncio.Queue[str] = asyncio.Queue()
        self.nc: nats.NATS

    async def __aenter__(self) -> Member:
        async def note(exc: Exception) -> None:
            self.said.put_nowait(str(exc))

        self.nc = await nats.connect(self.url, nkeys_seed=str(self.seed), inbox_prefix=self.inbox, error_cb=note,
                                     allow_reconnect=False)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.nc.close()

    async def refused(self, subject: str, *, subscribe: bool = False) -> None:
        if subscribe:
            await self.nc.subscribe(subject)
        else:
            await self.nc.publish(subject, b"{}")
        await self.nc.flush()
        said = await asyncio.wait_for(self.said.get(), 10)
        kind = "subscription" if subscribe else "publish"
        assert f'permissions violation for {kind} to "{subject}"'.lower() in said.lower(), said


@pytest.fixture
async def admin(central: Path) -> AsyncIterator[nats.NATS]:
    nc = await nats.connect(json.loads((central / "platform.json").read_text())["admin_url"])
    yield nc
    await nc.close()


def bus_of(central: Path) -> str:
    from service_kit.connection import where

    return where(json.loads((central / "platform.json").read_text())["nats_url"])


async def test_a_site_enrolled_by_the_operator_reads_only_its_own_jobs_results_and_replies(
        central: Path, admin: nats.NATS, tmp_path: Path) -> None:
    for site in ("hospital-b", "hospital-c"):
        onboard(central, tmp_path / site, site, "site")
    js = admin.jetstream()
    for site in ("hospital-b", "hospital-c"):
        await js.publish(subjects.jobs(site), site.encode(), timeout=10)
    url = bus_of(central)
    async with Member(url, tmp_path / "hospital-b" / "keys" / "hospital-b.nk") as b:
        queue = await b.nc.jetstream().pull_subscribe(subjects.jobs("hospital-b"), durable="site-hospital-b-jobs",
                                                      stream=subjects.JOBS_STREAM)
        [job] = await queue.fetch(1, timeout=10)
        assert job.data == b"hospital-b"
        await job.ack_sync(timeout=10)
        assert (await b.nc.jetstream().publish(subjects.results("hospital-b"), b"{}", timeout=10)).stream == "RESULTS"
        c_inbox = f"_INBOX.{public_of(tmp_path / 'hospital-c' / 'keys' / 'hospital-c.nk')}.>"
        for subject in ("$JS.API.CONSUMER.MSG.NEXT.JOBS.site-hospital-c-jobs", subjects.results("hospital-c"),
                        subjects.jobs("hospital-b"), "$JS.API.CONSUMER.CREATE.RESULTS", "$JS.API.STREAM.INFO.JOBS"):
            await b.refused(subject)
        for subject in (subjects.jobs("hospital-c"), subjects.RESULTS_ALL, c_inbox):
            await b.refused(subject, subscribe=True)
    assert (await js.stream_info(subjects.JOBS_STREAM)).state.messages == 1, "hospital-c's job still waits for it"


async def test_a_model_owner_never_sees_a_sites_dataset_statistics_and_a_committee_does(
        central: Path, admin: nats.NATS, tmp_path: Path) -> None:
    onboard(central, tmp_path / "vendor", "vendor", "model_owner")
    onboard(central, tmp_path / "committee", "committee", "benchmark_owner")
    url = bus_of(central)
    async with (Member(url, tmp_path / "vendor" / "keys" / "vendor.nk") as vendor,
                Member(url, tmp_path / "committee" / "keys" / "committee.nk") as committee):
        seen: dict[str, list[str]] = {"vendor": [], "committee": []}
        for name, member in (("vendor", vendor), ("committee", committee)):
            async def note(msg: Any, name: str = name) -> None:
                seen[name].append(msg.subject)

            await member.nc.subscribe(subjects.EVENTS_ALL, cb=note)
            await member.nc.flush()
        await admin.publish(subjects.evt("dataset", "registered"), b'{"statistics": {"cases": 20}}')
        await admin.publish(subjects.evt("model", "registered"), b"{}")
        await admin.flush()
        for _ in range(100):
            if len(seen["committee"]) == 2 and seen["vendor"]:
                break
            await asyncio.sleep(0.05)
        await vendor.nc.flush()
    assert seen["committee"] == [subjects.evt("dataset", "registered"), subjects.evt("model", "registered")]
    assert seen["vendor"] == [subjects.evt("model", "registered")], "the dataset's statistics never reach a vendor"


async def test_an_enrolled_integration_follows_the_events_and_may_do_nothing_else(
        central: Path, admin: nats.NATS, tmp_path: Path) -> None:
    onboard(central, tmp_path / "archive", "archive", "integration")
    await admin.jetstream().publish(subjects.evt("actor", "registered"), b"event 1", timeout=10)
    async with Member(bus_of(central), tmp_path / "archive" / "keys" / "archive.nk") as archive:
        queue = await archive.nc.jetstream().pull_subscribe(
            subjects.EVENTS_ALL, durable="integration", stream=subjects.EVENTS_STREAM,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT))
        history = []  # what the platform announced at its start, then this
        while b"event 1" not in history:
            [event] = await queue.fetch(1, timeout=10)
            history.append(event.data)
            await event.ack_sync(timeout=10)
        for subject in (subjects.cmd("registry", "register_actor"), subjects.evt("actor", "registered"),
                        subjects.results("hospital-b"), "$JS.API.CONSUMER.CREATE.EVENTS.registry-actor-registered"):
            await archive.refused(subject)
        await archive.refused(subjects.EVENTS_ALL, subscribe=True)


async def test_a_revoked_site_is_cut_off_at_once_and_refused_from_then_on(central: Path, tmp_path: Path) -> None:
    onboard(central, tmp_path / "hospital-b", "hospital-b", "site")
    seed = tmp_path / "hospital-b" / "keys" / "hospital-b.nk"
    async with Member(bus_of(central), seed) as site:
        revoked = assay(central, "bus", "revoke", "hospital-b")
        assert revoked.returncode == 0, revoked.stderr
        for _ in range(200):
            if site.nc.is_closed or not site.nc.is_connected:
                break
            await asyncio.sleep(0.05)
        assert not site.nc.is_connected, "the server closed the revoked site's connection"
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(bus_of(central), nkeys_seed=str(seed), allow_reconnect=False, connect_timeout=5)
    refused = assay(tmp_path / "hospital-b", "--nats", bus_of(central), "--creds", str(seed), "sites", "list")
    assert refused.returncode == 1 and "Authorization Violation" in refused.stderr
    listed = assay(central, "bus", "users")
    assert "hospital-b" not in listed.stdout


def test_what_the_operator_gets_wrong_is_refused_and_changes_nothing(central: Path, tmp_path: Path) -> None:
    bundle = onboard(central, tmp_path / "hospital-b", "hospital-b", "site")
    before = (central / "nats" / "users.conf").read_text()
    seed_text = (tmp_path / "hospital-b" / "keys" / "hospital-b.nk").read_text().strip()
    fresh = nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))).public_key.decode()
    for args, says in ((["hospital-b", "--role", "site", "--nkey", bundle["nkey"]], "enrolled already"),
                       (["hospital-d", "--role", "site", "--nkey", bundle["nkey"]], "enrolled already, under another"),
                       (["hospital-d", "--role", "wizard", "--nkey", bundle["nkey"]], "no NATS role 'wizard'"),
                       (["hospital-d", "--role", "site", "--nkey", seed_text], "that is a seed"),
                       (["hospital-d", "--role", "site", "--nkey", "U" + "A" * 55], "not a NATS user public key"),
                       (["registry2", "--role", "service", "--nkey", fresh], "no service is called 'registry2'"),
                       (["vendor", "--role", "model_owner", "--site", "hospital-b", "--nkey", fresh],
                        "names the site of a worker")):
        refused = assay(central, "bus", "enrol", *args)
        assert refused.returncode != 0 and says in refused.stderr.replace("\n", " "), refused.stderr
    assert (central / "nats" / "users.conf").read_text() == before
    assert bundle["scheduler_public_key"] == (central / "keys" / "scheduling.pub").read_text().strip()


def site_worker(central: Path, tmp_path: Path, **env: str) -> subprocess.Popen[bytes]:
    """Hospital B onboarded (its key, the operator's enrolment, `assay bus join`) and its worker started with the
    environment the join printed, changed by `env`; its log is tmp_path/worker.log."""
    hospital = tmp_path / "hospital-b"
    bundle = onboard(central, hospital, "hospital-b", "site")
    bundle_file = hospital / "bundle.json"
    bundle_file.write_text(json.dumps(bundle))
    joined = assay(hospital, "bus", "join", str(bundle_file))
    assert joined.returncode == 0, joined.stderr
    worker_env = dict(line.split("=", 1) for line in joined.stdout.splitlines() if line.startswith("ASSAY_SITE_"))
    KeyPair.generate().save(hospital / "keys" / "hospital-b.key")
    (hospital / "datasets.json").write_text("{}")
    settings = {"key_file": hospital / "keys" / "hospital-b.key", "datasets_file": hospital / "datasets.json",
                "work_dir": hospital / "jobs", "state_dir": hospital, "policy_file": hospital / "policy.toml",
                "sites_every_s": 1}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ASSAY_")}, **worker_env,
           **{f"ASSAY_SITE_{k.upper()}": str(v) for k, v in settings.items()}, **env}
    assert set(SiteSettings.model_fields) >= {k.removeprefix("ASSAY_SITE_").lower() for k in worker_env}
    with (tmp_path / "worker.log").open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "assay.serve", "site"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)


async def pulls(admin: nats.NATS, worker: subprocess.Popen[bytes], log: Path) -> None:
    """Until the worker's durable consumer exists: it pulls its queue, as its own user."""
    js = admin.jetstream()
    for _ in range(600):
        try:
            await js.consumer_info(subjects.JOBS_STREAM, "site-hospital-b-jobs")
            return
        except nats.js.errors.NotFoundError:
            assert worker.poll() is None, log.read_text()
            await asyncio.sleep(0.1)
    pytest.fail("the worker never pulled its queue:\n" + log.read_text()[-3000:])


async def test_a_site_worker_runs_as_the_key_its_hospital_enrolled(central: Path, admin: nats.NATS,
                                                                   tmp_path: Path) -> None:
    worker = site_worker(central, tmp_path)
    try:
        await pulls(admin, worker, tmp_path / "worker.log")
    finally:
        worker.terminate()
        worker.wait(30)
    assert "violation" not in (tmp_path / "worker.log").read_text().lower()


async def test_a_site_worker_behind_its_hospitals_own_leaf_node_takes_its_jobs_and_answers_through_it(
        central: Path, admin: nats.NATS, tmp_path: Path) -> None:
    """The hospital runs a nats-server of its own, a leaf node that dials out to the centre as the site's enrolled
    key (nothing dials in); its worker connects only to that local server and names the centre's JetStream domain.
    Its queue is pulled, its heartbeat stored, its job answered and a pushed image read through the leaf, with the
    site's rights alone."""
    platform = json.loads((central / "platform.json").read_text())
    hospital = tmp_path / "hospital-b"
    port = free_ports(1)[0]
    leaf_conf = tmp_path / "leaf.conf"

    def leaf_server() -> subprocess.Popen[bytes]:
        seed, public = (hospital / "keys" / "hospital-b.nk").read_text().strip(), public_of(
            hospital / "keys" / "hospital-b.nk")
        private(leaf_conf, f"listen: 127.0.0.1:{port}\n"  # the site's seed: mode 0600, as the worker's own
                f'leafnodes {{ remotes: [ {{ url: "{platform["leafnodes"][0]}", nkey: "{seed}" }} ] }}\n'
                f"authorization {{ users: [ {{ nkey: {public} }} ] }}\n")
        with (tmp_path / "leaf.log").open("wb") as log:
            return subprocess.Popen([nats_server_binary(), "-c", str(leaf_conf)],
                                    stdout=log, stderr=subprocess.STDOUT)

    worker = leaf = None
    try:
        worker = site_worker(central, tmp_path, ASSAY_SITE_NATS_URL=f"nats://127.0.0.1:{port}",
                             ASSAY_SITE_NATS_DOMAIN=platform["jetstream_domain"])
        leaf = leaf_server()
        await pulls(admin, worker, tmp_path / "worker.log")
        js = admin.jetstream()
        sites = await js.key_value(subjects.SITES_BUCKET)
        for _ in range(100):  # its signed heartbeat, written through the leaf into the centre's bucket
            try:
                beat = await sites.get("hospital-b.worker-1")
                break
            except nats.js.errors.KeyNotFoundError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("no heartbeat came through the leaf:\n" + (tmp_path / "worker.log").read_text()[-3000:])
        assert json.loads(beat.value)["data"]["site_id"] == "hospital-b"

        binding = m.JobBinding(benchmark_id="bm", model_id="model-1", dataset_id="ds-z", case_count=2,
                               model_image="sha256:" + "a" * 64, evaluator_image="sha256:" + "b" * 64,
                               dataset_hash="sha256:" + "c" * 64)
        spec = m.JobSpec(expires_at=datetime.now(UTC) + timedelta(hours=1), job_id="job-leaf", site_id="hospital-b",
                         binding=binding, metrics=(m.MetricSpec(name="auc"),))
        job = KeyPair.load(central / "keys" / "scheduling.key").sign(
            Envelope.wrap(spec, source="service:scheduling", id="job-leaf"))
        letters = await js.subscribe(subjects.DEAD_LETTERS_ALL, ordered_consumer=True)
        reports = await js.subscribe(subjects.reports("hospital-b"), ordered_consumer=True)
        await js.publish(subjects.jobs("hospital-b"), job.model_dump_json().encode(),
                         headers={"Nats-Msg-Id": "job-leaf"})
        letter = json.loads((await letters.next_msg(timeout=30)).data)
        assert "dataset ds-z is not prepared at site hospital-b" in json.dumps(letter), letter
        said = [json.loads((await reports.next_msg(timeout=30)).data)["data"] for _ in range(2)]
        assert [(r["job_id"], r["state"]) for r in said] == [("job-leaf", "RUNNING"), ("job-leaf", "REFUSED")]
        for _ in range(100):  # acknowledged through the leaf once its dead letter was stored
            info = await js.consumer_info(subjects.JOBS_STREAM, "site-hospital-b-jobs")
            if (info.num_ack_pending, info.num_pending) == (0, 0):
                break
            await asyncio.sleep(0.1)
        assert (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)

        # a pushed image (a model's `docker save`), read through the leaf as the worker reads it, chunk by chunk
        archive = os.urandom(40 << 20)  # enough for the server to ask for flow control, as a real image does
        await (await js.object_store(subjects.IMAGES_BUCKET)).put("sha256:" + "d" * 64, archive)
        async with Member(f"nats://127.0.0.1:{port}", hospital / "keys" / "hospital-b.nk") as site:
            images = NatsImageStore(await site.nc.jetstream(domain=platform["jetstream_domain"]).object_store(
                subjects.IMAGES_BUCKET))
            assert await images.size("sha256:" + "d" * 64) == len(archive)
            with (tmp_path / "image.tar").open("wb") as into:
                await images.fetch("sha256:" + "d" * 64, into)
        assert (tmp_path / "image.tar").read_bytes() == archive
    finally:
        for process in (worker, leaf):
            if process is not None:
                process.terminate()
                process.wait(30)
    assert "violation" not in (tmp_path / "worker.log").read_text().lower()
    assert "violation" not in (tmp_path / "leaf.log").read_text().lower(), (tmp_path / "leaf.log").read_text()


def test_on_assay_up_a_command_signed_as_an_enrolled_member_connects_as_its_key(central: Path) -> None:
    onboard(central, central, "vendor", "model_owner")  # the demo's way: every actor's keys in one state folder
    KeyPair.generate().save(central / "keys" / "vendor.key")
    registered = assay(central, "actor", "register", "vendor", "--role", "model_owner", "--as", "operator")
    assert registered.returncode == 0, registered.stderr
    listed = assay(central, "model", "list", "--as", "vendor")
    assert listed.returncode == 0, listed.stderr
    assert assay(central, "bus", "revoke", "vendor").returncode == 0
    refused = assay(central, "model", "list", "--as", "vendor")  # as its own NATS user, which is gone
    assert refused.returncode == 1 and "Authorization Violation" in refused.stderr, refused.stdout + refused.stderr
    assert assay(central, "model", "list", "--as", "operator").returncode == 0, "no key of its own: the local user"
