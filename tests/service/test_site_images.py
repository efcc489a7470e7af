"""Images that travel, at the site under the test broker: a job whose model the site lacks has it fetched from the
artefact store, checked and loaded before it runs, and the audit log says so; one never pushed, or whose archive is
not the registered one, is refused with the reason before any container."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

from contracts import messages as m
from contracts import subjects
from site_worker.containers import FakeRunner
from tests.service.test_site import JOBS, job, prepare, reports, signed
from tests.support.federation import MODEL
from tests.support.service import Harness

TRAVELLER = "sha256:" + "7" * 64  # a model image this site has never had


def archive_of(image: str) -> bytes:
    """A `docker save` tarball, as far as loading it goes: a manifest naming the image's config."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        body = json.dumps([{"Config": image.removeprefix("sha256:") + ".json", "RepoTags": None, "Layers": []}])
        info = tarfile.TarInfo("manifest.json")
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body.encode()))
    return buffer.getvalue()


def travelling_job(site: Harness, archive: m.Archive | None) -> m.JobSpec:
    planned = job(prepare(site))
    return planned.model_copy(update={"binding": planned.binding.model_copy(update={"model_image": TRAVELLER}),
                                      "archives": {TRAVELLER: archive} if archive else {}})


async def test_a_pushed_model_is_fetched_checked_loaded_and_run(site, actors, runner: FakeRunner):
    body = archive_of(TRAVELLER)
    worker = site.broker.context.get("site")
    worker.images.archives[TRAVELLER] = body
    archive = m.Archive(sha256="sha256:" + hashlib.sha256(body).hexdigest(), size=len(body))

    await site.deliver(JOBS, signed(actors, travelling_job(site, archive)))

    assert worker.images.fetched == [TRAVELLER] and runner.image_id(TRAVELLER) == TRAVELLER
    assert [spec.image for spec in runner.specs][0] == TRAVELLER
    assert len(site.published(subjects.results("site-a"))) == 1
    [fetched] = [e for e in worker.audit.entries() if e.kind == "image_fetched"]
    assert fetched.details == {"image": TRAVELLER, "sha256": archive.sha256, "size": archive.size}


async def test_a_model_neither_here_nor_pushed_is_refused_with_what_to_do(site, actors, runner):
    await site.deliver(JOBS, signed(actors, travelling_job(site, None)))

    [report] = reports(site)
    assert report.state is m.JobState.REFUSED and runner.specs == []
    assert report.reason == (f"image {TRAVELLER}: not present at this site and not pushed to the artefact store: "
                             "push it (`assay model push`) or load it here (`docker load`), then retry the job "
                             "(`assay job retry`); the job is not run")


async def test_an_archive_changed_in_the_store_is_refused_and_nothing_is_loaded(site, actors, runner):
    body = archive_of(TRAVELLER)
    worker = site.broker.context.get("site")
    worker.images.archives[TRAVELLER] = archive_of(MODEL)  # same size, other content: another image
    archive = m.Archive(sha256="sha256:" + hashlib.sha256(body).hexdigest(), size=len(body))

    await site.deliver(JOBS, signed(actors, travelling_job(site, archive)))

    [report] = reports(site)
    assert report.state is m.JobState.REFUSED and "it was changed or corrupted" in report.reason
    assert runner.image_id(TRAVELLER) is None and runner.specs == []


async def test_a_private_model_opens_only_with_the_key_sealed_to_this_site(site, actors, runner, tmp_path):
    from contracts.sealing import encrypt_file, new_key, seal_key

    plain, sealed = tmp_path / "plain.tar", tmp_path / "sealed.tar"
    plain.write_bytes(archive_of(TRAVELLER))
    key = new_key()
    encrypt_file(plain, sealed, key)
    body = sealed.read_bytes()
    worker = site.broker.context.get("site")
    worker.images.archives[TRAVELLER] = body
    archive = m.Archive(sha256="sha256:" + hashlib.sha256(body).hexdigest(), size=len(body), encrypted=True)
    for_another_site = seal_key(key, actors.key("site-b").public_key)
    planned = travelling_job(site, archive)

    await site.deliver(JOBS, signed(actors, planned.model_copy(update={"job_id": "job-2"})))  # no key at all
    await site.deliver(JOBS, signed(actors, planned.model_copy(update={"job_id": "job-3",
                                                                       "keys": {TRAVELLER: for_another_site}})))
    assert [r.reason for r in reports(site)] == [
        f"image {TRAVELLER}: it is private, and its owner has not given this site its key; the job is not run",
        f"image {TRAVELLER}: the image's key is not sealed to this site's key; the job is not run"]
    assert runner.image_id(TRAVELLER) is None

    await site.deliver(JOBS, signed(actors, planned.model_copy(update={
        "keys": {TRAVELLER: seal_key(key, actors.key("site-a").public_key)}})))

    assert runner.image_id(TRAVELLER) == TRAVELLER and len(site.published(subjects.results("site-a"))) == 1
