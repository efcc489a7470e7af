"""Images that travel, on a nats-server with `assay up`'s users and the real Docker engine: the CLI pushes an image
into the object store, a site that never had it fetches, checks and loads it, and reuses it after; a changed or
missing archive, one over the site's limit, and one that tries to take a tag the site uses are refused or harmless."""

from __future__ import annotations

import asyncio
import json
import tarfile
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import docker
import nats
import pytest

from assay.access import CLI, Access
from assay.demo.build import BASE_IMAGE, ensure_base_image
from assay.push import save, upload
from contracts import messages as m
from contracts.streams import ensure_streams
from contracts.subjects import IMAGES_BUCKET
from site_worker.containers import DockerRunner, RunSpec
from site_worker.execution import JobRefused
from site_worker.images import NatsImageStore, ensure_images
from tests.conftest import serving_nats

pytestmark = pytest.mark.docker
SITE = "site-a"


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[tuple[Access, str]]:
    """A JetStream server with the users and permissions `assay up` gives, and the streams declared."""
    access = Access.new([SITE])
    with serving_nats(tmp_path / "nats", access.config()) as url:
        hostport = url.removeprefix("nats://")

        async def provision() -> None:
            nc = await nats.connect(access.url("supervisor", hostport))
            await ensure_streams(nc.jetstream())
            await nc.close()

        asyncio.run(provision())
        yield access, hostport


def build(client: docker.DockerClient, folder: Path, base: str, entrypoint: str = "") -> str:
    """An image no engine has seen before (its content is new)."""
    folder.mkdir()
    (folder / "marker").write_text(uuid.uuid4().hex)
    (folder / "Dockerfile").write_text(f"FROM {base}\nCOPY marker /marker\n{entrypoint}")
    image, _ = client.images.build(path=str(folder), tag=f"assay-test/travel:{uuid.uuid4().hex[:8]}",
                                   network_mode="none", rm=True)
    return str(image.id)


@pytest.fixture
def fresh_image(docker_client: docker.DockerClient, tmp_path: Path) -> str:
    """A new image of one small file: its archive is a few KiB."""
    return build(docker_client, tmp_path / "context", "scratch")


@pytest.fixture
def runnable_image(docker_client: docker.DockerClient, tmp_path: Path) -> str:
    """A new image that runs, on the Python base."""
    ensure_base_image(docker_client)
    return build(docker_client, tmp_path / "runnable", BASE_IMAGE,
                 'ENTRYPOINT ["python3", "-c", "print(\'ran at the site\')"]\n')


def job_with(image: str, archive: m.Archive | None, evaluator: str) -> m.JobSpec:
    binding = m.JobBinding(benchmark_id="bm", model_id="traveller", dataset_id="ds", model_image=image,
                           evaluator_image=evaluator, dataset_hash="sha256:" + "d" * 64, case_count=2)
    return m.JobSpec(job_id="job-1", site_id=SITE, binding=binding, metrics=(m.MetricSpec(name="auc"),),
                     expires_at=datetime(2100, 1, 1, tzinfo=UTC), archives={image: archive} if archive else {})


@pytest.fixture
async def site_store(bus: tuple[Access, str]) -> AsyncIterator[NatsImageStore]:
    access, hostport = bus
    nc = await nats.connect(access.url(f"site-{SITE}", hostport), inbox_prefix=f"_INBOX.site-{SITE}")
    yield NatsImageStore(await nc.jetstream().object_store(IMAGES_BUCKET))
    await nc.close()


async def test_a_pushed_image_runs_at_a_site_that_never_had_it_and_is_reused_after(
        docker_client, bus, runnable_image, site_store, tmp_path):
    access, hostport = bus
    fresh_image = runnable_image
    archive = save(docker_client, fresh_image, tmp_path / "image.tar")
    await upload(access.url(CLI, hostport), fresh_image, tmp_path / "image.tar")
    docker_client.images.remove(fresh_image, force=True)  # the site has never had it
    runner = DockerRunner(docker_client)
    evaluator = fresh_image  # the same image stands in for the evaluator: one fetch serves both
    job = job_with(fresh_image, archive, evaluator)

    fetched = await ensure_images(job, runner, site_store, tmp_path / "scratch", max_bytes=1 << 30)

    assert fetched == [fresh_image] and runner.image_id(fresh_image) == fresh_image
    assert await ensure_images(job, runner, site_store, tmp_path / "scratch", max_bytes=1 << 30) == []  # cached
    assert list((tmp_path / "scratch").iterdir()) == []  # the archive goes once it is loaded
    ran = runner.run(RunSpec(fresh_image, "infer", ()))
    assert ran.ok and "ran at the site" in ran.log_tail


@pytest.mark.parametrize("fault", ["changed", "missing", "too large", "size differs"])
async def test_an_archive_that_is_not_the_registered_one_is_refused_and_nothing_is_loaded(
        docker_client, bus, fresh_image, site_store, tmp_path, fault):
    access, hostport = bus
    archive = save(docker_client, fresh_image, tmp_path / "image.tar")
    if fault != "missing":
        await upload(access.url(CLI, hostport), fresh_image, tmp_path / "image.tar")
    docker_client.images.remove(fresh_image, force=True)
    registered = {"changed": archive.model_copy(update={"sha256": "sha256:" + "e" * 64}), "missing": archive,
                  "too large": archive, "size differs": archive.model_copy(update={"size": archive.size + 1})}[fault]
    runner = DockerRunner(docker_client)

    with pytest.raises(JobRefused) as refused:
        await ensure_images(job_with(fresh_image, registered, fresh_image), runner, site_store, tmp_path / "scratch",
                            max_bytes=archive.size - 1 if fault == "too large" else 1 << 30)

    words = {"changed": "it was changed or corrupted", "missing": "the artefact store holds no archive of it",
             "too large": "this site's policy allows images of at most",
             "size differs": "bytes, not the"}[fault]
    assert words in str(refused.value) and str(refused.value).endswith("; the job is not run")
    assert runner.image_id(fresh_image) is None


async def test_an_archive_that_names_a_tag_the_site_uses_cannot_move_it(docker_client, bus, fresh_image,
                                                                        site_store, tmp_path):
    access, hostport = bus
    victim = f"assay-test/site-evaluator:{uuid.uuid4().hex[:8]}"
    docker_client.images.get(BASE_IMAGE).tag(victim)
    plain = tmp_path / "plain.tar"
    save(docker_client, fresh_image, plain)
    hostile = tmp_path / "hostile.tar"
    with tarfile.open(plain) as old, tarfile.open(hostile, "w") as new:  # the same image, claiming the site's tag
        for member in old:
            if member.name == "manifest.json":
                manifest = json.load(old.extractfile(member))  # type: ignore[arg-type]
                body = json.dumps([{**entry, "RepoTags": [victim]} for entry in manifest]).encode()
                member.size = len(body)
                new.addfile(member, __import__("io").BytesIO(body))
            else:
                new.addfile(member, old.extractfile(member) if member.isfile() else None)
    from site_worker.images import sha256_of

    archive = m.Archive(sha256=sha256_of(hostile), size=hostile.stat().st_size)
    await upload(access.url(CLI, hostport), fresh_image, hostile)
    docker_client.images.remove(fresh_image, force=True)
    try:
        runner = DockerRunner(docker_client)
        await ensure_images(job_with(fresh_image, archive, fresh_image), runner, site_store, tmp_path / "s",
                            max_bytes=1 << 30)

        assert runner.image_id(fresh_image) == fresh_image
        assert docker_client.images.get(victim).id == docker_client.images.get(BASE_IMAGE).id  # not moved
    finally:
        docker_client.images.remove(victim)


async def test_a_site_may_read_the_images_but_not_write_them(bus, tmp_path):
    access, hostport = bus
    nc = await nats.connect(access.url(f"site-{SITE}", hostport), inbox_prefix=f"_INBOX.site-{SITE}")
    try:
        store = await nc.jetstream(timeout=3).object_store(IMAGES_BUCKET)
        with pytest.raises(Exception):  # noqa: B017  the server refuses the chunk: no ack comes
            await store.put("sha256:" + "f" * 64, b"a site's own image")
    finally:
        await nc.close()


async def test_a_private_image_travels_encrypted_and_only_the_granted_site_opens_it(
        docker_client, bus, fresh_image, site_store, tmp_path):
    from contracts.sealing import encrypt_file, new_key, seal_key
    from contracts.signing import KeyPair
    from site_worker.images import sha256_of

    access, hostport = bus
    save(docker_client, fresh_image, tmp_path / "image.tar")
    key, sealed = new_key(), tmp_path / "image.tar.sealed"
    encrypt_file(tmp_path / "image.tar", sealed, key)
    await upload(access.url(CLI, hostport), fresh_image, sealed)
    docker_client.images.remove(fresh_image, force=True)
    stored = await site_store._store.get(fresh_image)
    assert b"manifest.json" not in stored.data  # what the store holds (and every site can read) is ciphertext
    archive = m.Archive(sha256=sha256_of(sealed), size=sealed.stat().st_size, encrypted=True)
    site, other = KeyPair.generate(), KeyPair.generate()
    job = job_with(fresh_image, archive, fresh_image).model_copy(update={"keys": {fresh_image: seal_key(
        key, site.public_key)}})
    runner = DockerRunner(docker_client)

    with pytest.raises(JobRefused, match="not sealed to this site's key"):
        await ensure_images(job, runner, site_store, tmp_path / "scratch", max_bytes=1 << 30, site=other)
    assert await ensure_images(job, runner, site_store, tmp_path / "scratch", max_bytes=1 << 30,
                               site=site) == [fresh_image]
    assert runner.image_id(fresh_image) == fresh_image


async def test_a_site_prefetches_its_planned_jobs_images_through_the_cli(docker_client, bus, fresh_image, tmp_path,
                                                                          monkeypatch):
    from assay import cli
    from assay.home import Home
    from assay.site_cli import _prefetch
    from contracts.signing import KeyPair

    access, hostport = bus
    home = Home(tmp_path / "home")
    home.root.mkdir()
    (home.root / "platform.json").write_text(json.dumps({"nats_url": access.url(CLI, hostport)}))
    KeyPair.generate().save(home.key_file(SITE))
    monkeypatch.setitem(cli.state, "home", home)
    archive = save(docker_client, fresh_image, tmp_path / "image.tar")
    await upload(access.url(CLI, hostport), fresh_image, tmp_path / "image.tar")
    docker_client.images.remove(fresh_image, force=True)
    runner = DockerRunner(docker_client)

    said = await _prefetch([job_with(fresh_image, archive, fresh_image)], runner, SITE, 1 << 30)
    again = await _prefetch([job_with(fresh_image, archive, fresh_image)], runner, SITE, 1 << 30)

    assert said == {(fresh_image, "traveller"): "fetched, checked, loaded"}
    assert again == {(fresh_image, "traveller"): "present"} and runner.image_id(fresh_image) == fresh_image
