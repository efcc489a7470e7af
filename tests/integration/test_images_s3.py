"""Images kept in S3 (MinIO, or any S3) by configuration, against a real S3 endpoint (moto's server): what the CLI
pushes with ASSAY_IMAGES_S3 set, a site configured with the same bucket fetches, checks and loads; what is not
there, or is not the registered archive, is refused."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from assay.push import S3_VARIABLE, upload
from contracts import messages as m
from site_worker.containers import FakeRunner
from site_worker.execution import JobRefused
from site_worker.images import ensure_images, s3_store
from tests.service.test_site_images import TRAVELLER, archive_of


@pytest.fixture
def bucket_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    bucket = f"assay-images-{uuid.uuid4().hex[:12]}"  # moto keeps one state per process: a bucket per test
    url = f"s3+http://assay:secret-key@{host}:{port}/{bucket}"
    s3_store(url)._client.make_bucket(bucket)
    try:
        yield url
    finally:
        server.stop()


def job_with(archive: m.Archive) -> m.JobSpec:
    binding = m.JobBinding(benchmark_id="bm", model_id="traveller", dataset_id="ds", model_image=TRAVELLER,
                           evaluator_image=TRAVELLER, dataset_hash="sha256:" + "d" * 64, case_count=2)
    return m.JobSpec(job_id="job-1", site_id="site-a", binding=binding, metrics=(m.MetricSpec(name="auc"),),
                     expires_at=datetime(2100, 1, 1, tzinfo=UTC), archives={TRAVELLER: archive})


async def test_an_image_pushed_to_s3_is_fetched_checked_and_loaded_by_a_site(bucket_url, tmp_path, monkeypatch):
    body = archive_of(TRAVELLER)
    (tmp_path / "image.tar").write_bytes(body)
    monkeypatch.setenv(S3_VARIABLE, bucket_url)
    await upload("nats://unused:4222", TRAVELLER, tmp_path / "image.tar")  # the CLI's push, to S3 by configuration
    archive = m.Archive(sha256="sha256:" + hashlib.sha256(body).hexdigest(), size=len(body))
    runner = FakeRunner()

    fetched = await ensure_images(job_with(archive), runner, s3_store(bucket_url), tmp_path / "scratch", 1 << 20)

    assert fetched == [TRAVELLER] and runner.image_id(TRAVELLER) == TRAVELLER


@pytest.mark.parametrize("fault", ["missing", "changed"])
async def test_what_s3_does_not_hold_as_registered_is_refused(bucket_url, tmp_path, fault):
    body = archive_of(TRAVELLER)
    store = s3_store(bucket_url)
    if fault == "changed":
        (tmp_path / "other.tar").write_bytes(archive_of("sha256:" + "6" * 64))
        store.put(TRAVELLER, tmp_path / "other.tar")
    archive = m.Archive(sha256="sha256:" + hashlib.sha256(body).hexdigest(), size=len(body))

    with pytest.raises(JobRefused, match={"missing": "the artefact store holds no archive of it",
                                          "changed": "it was changed or corrupted"}[fault]):
        await ensure_images(job_with(archive), FakeRunner(), store, tmp_path / "scratch", 1 << 20)


def test_an_s3_url_that_names_no_bucket_is_refused_with_the_form_to_use() -> None:
    with pytest.raises(ValueError, match=r"s3://ACCESS:SECRET@host:port/bucket"):
        s3_store("https://key:secret@minio.example.org:9000/")


async def test_a_large_archive_travels_in_parts_and_arrives_whole(bucket_url, tmp_path):
    big = tmp_path / "big.tar"
    big.write_bytes(hashlib.sha256(b"seed").digest() * (12 * (1 << 20) // 32))  # 12 MiB: above S3's 5 MiB part
    store = s3_store(bucket_url)

    store.put("sha256:" + "7" * 64, big)
    stat = store._client.stat_object(store._bucket, store.name("sha256:" + "7" * 64))
    with (tmp_path / "back.tar").open("wb") as back:
        await store.fetch("sha256:" + "7" * 64, back)

    assert stat.etag.rsplit("-", 1)[-1].isdigit() and "-" in stat.etag, "uploaded in parts (a multipart ETag)"
    assert await store.size("sha256:" + "7" * 64) == big.stat().st_size
    assert hashlib.sha256((tmp_path / "back.tar").read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()
