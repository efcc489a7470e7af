"""Images that travel to the site: a job's image the local engine lacks is fetched from the artefact store, checked
against the archive the registry recorded (size first, then the tarball's sha256), stripped of any tags it carries,
loaded, and run by id only if the engine now holds exactly that id."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from contracts.messages import Archive, JobSpec
from contracts.sealing import SealError, decrypt_file, open_key
from contracts.signing import KeyPair
from contracts.subjects import IMAGES_BUCKET
from site_worker.containers import ContainerRunner
from site_worker.execution import JobRefused

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class ArchiveMissing(Exception):
    """The store holds nothing under that name."""


class ImageStore(Protocol):
    """Where pushed images are, by image id (the NATS object store by default)."""

    async def size(self, image: str) -> int:
        """Its size in bytes; ArchiveMissing when absent."""
        ...

    async def fetch(self, image: str, into: io.BufferedWriter) -> None: ...


class NatsImageStore:
    def __init__(self, store) -> None:  # type: ignore[no-untyped-def]  # nats.js.object_store.ObjectStore
        self._store = store

    async def size(self, image: str) -> int:
        from nats.js.errors import ObjectNotFoundError

        try:
            return int((await self._store.get_info(image)).size)
        except ObjectNotFoundError:
            raise ArchiveMissing(image) from None

    async def fetch(self, image: str, into: io.BufferedWriter) -> None:
        await self._store.get(image, writeinto=into)


class BusImageStore:
    """The NATS object store of pushed images, reached through the worker's own connection once it is up."""

    def __init__(self, broker) -> None:  # type: ignore[no-untyped-def]  # faststream's NatsBroker
        self._broker = broker
        self._store: NatsImageStore | None = None

    async def _opened(self) -> NatsImageStore:
        if self._store is None:
            self._store = NatsImageStore(await self._broker.object_storage(IMAGES_BUCKET, declare=False))
        return self._store

    async def size(self, image: str) -> int:
        return await (await self._opened()).size(image)

    async def fetch(self, image, into) -> None:  # type: ignore[no-untyped-def]
        await (await self._opened()).fetch(image, into)


class S3ImageStore:
    """Pushed images in an S3 bucket (MinIO, or any S3), under `images/<image id>`: chosen by configuration,
    `s3://` or `s3+http://ACCESS:SECRET@host:port/bucket` (see `s3_store`)."""

    def __init__(self, client, bucket: str) -> None:  # type: ignore[no-untyped-def]  # a minio.Minio
        self._client, self._bucket = client, bucket

    @staticmethod
    def name(image: str) -> str:
        return f"images/{image}"

    async def size(self, image: str) -> int:
        from minio.error import S3Error

        try:
            return int((await asyncio.to_thread(self._client.stat_object, self._bucket, self.name(image))).size)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NoSuchBucket"):
                raise ArchiveMissing(image) from None
            raise

    async def fetch(self, image: str, into: io.BufferedWriter) -> None:
        def copy() -> None:
            response = self._client.get_object(self._bucket, self.name(image))
            try:
                for chunk in response.stream(CHUNK):
                    into.write(chunk)
            finally:
                response.close()
                response.release_conn()

        await asyncio.to_thread(copy)

    def put(self, image: str, path: Path) -> None:
        self._client.fput_object(self._bucket, self.name(image), str(path))


def s3_store(url: str) -> S3ImageStore:
    """The S3 store a URL names: `s3://ACCESS:SECRET@host:port/bucket` (TLS) or `s3+http://…` (plain, for a MinIO
    on the same host or network)."""
    from urllib.parse import unquote, urlsplit

    from minio import Minio

    parts = urlsplit(url)
    bucket = parts.path.strip("/")
    if parts.scheme not in ("s3", "s3+http") or not parts.hostname or not bucket or "/" in bucket:
        raise ValueError("an S3 image store is s3://ACCESS:SECRET@host:port/bucket (or s3+http:// without TLS), "
                         f"not {parts.scheme}://{parts.hostname or ''}/{bucket}")
    client = Minio(f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname,
                   access_key=unquote(parts.username or ""), secret_key=unquote(parts.password or ""),
                   secure=parts.scheme == "s3")
    return S3ImageStore(client, bucket)


class FakeImageStore:
    def __init__(self) -> None:
        self.archives: dict[str, bytes] = {}
        self.fetched: list[str] = []

    async def size(self, image: str) -> int:
        if image not in self.archives:
            raise ArchiveMissing(image)
        return len(self.archives[image])

    async def fetch(self, image: str, into: io.BufferedWriter) -> None:
        self.fetched.append(image)
        into.write(self.archives[image])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def untagged(source: Path, target: Path) -> None:
    """A copy of a `docker save` tarball that names no tag: loading it cannot move a name the site uses (a hostile
    archive could tag itself as the site's evaluator)."""
    with tarfile.open(source) as old, tarfile.open(target, "w") as new:
        for member in old:
            if member.name in ("repositories", "index.json", "oci-layout") and member.isfile():
                continue  # the legacy tag list, and an OCI index whose annotations name tags: manifest.json suffices
            if member.name == "manifest.json" and member.isfile():
                manifest = json.load(old.extractfile(member))  # type: ignore[arg-type]
                body = json.dumps([{**entry, "RepoTags": None} for entry in manifest]).encode()
                member.size = len(body)
                new.addfile(member, io.BytesIO(body))
                continue
            new.addfile(member, old.extractfile(member) if member.isfile() else None)


def _refuse(image: str, reason: str) -> JobRefused:
    return JobRefused(f"image {image}: {reason}; the job is not run")


async def ensure_images(job: JobSpec, runner: ContainerRunner, store: ImageStore | None, scratch: Path,
                        max_bytes: int, site: KeyPair | None = None) -> list[str]:
    """Make every image of `job` present in the engine; the ids fetched. Cached images are reused. A private image
    is opened with the key the job carries, sealed to `site`."""
    fetched = []
    for image in (job.binding.model_image, job.binding.evaluator_image, *filter(None, (job.preparator,))):
        if runner.image_id(image) == image:
            continue
        archive = job.archives.get(image)
        if archive is None or store is None:
            raise _refuse(image, "not present at this site and not pushed to the artefact store: push it (`assay "
                          "model push`) or load it here (`docker load`), then retry the job (`assay job retry`)"
                          if store is not None else "not present at this site, which fetches no images")
        key = None
        if archive.encrypted:
            if image not in job.keys or site is None:
                raise _refuse(image, "it is private, and its owner has not given this site its key")
            try:
                key = open_key(job.keys[image], site)
            except SealError as exc:
                raise _refuse(image, str(exc)) from None
        await fetch_and_load(image, archive, runner, store, scratch, max_bytes, key)
        fetched.append(image)
    return fetched


async def fetch_and_load(image: str, archive: Archive, runner: ContainerRunner, store: ImageStore, scratch: Path,
                         max_bytes: int, key: bytes | None = None) -> None:
    if archive.size > max_bytes:
        raise _refuse(image, f"its archive is {archive.size:,} bytes; this site's policy allows images of at most "
                             f"{max_bytes:,}")
    try:
        stored = await store.size(image)
    except ArchiveMissing:
        raise _refuse(image, "the artefact store holds no archive of it") from None
    if stored != archive.size:
        raise _refuse(image, f"the stored archive is {stored:,} bytes, not the {archive.size:,} registered")
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        raw, clean = Path(folder) / "image.tar", Path(folder) / "untagged.tar"
        with raw.open("wb") as stream:
            await store.fetch(image, stream)
        found = await asyncio.to_thread(sha256_of, raw)
        if found != archive.sha256:
            raise _refuse(image, f"the fetched archive has sha256 {found}, not the registered {archive.sha256}: "
                                 "it was changed or corrupted")
        if key is not None:  # checked as stored (its hash is of the encrypted archive), then opened
            opened = Path(folder) / "opened.tar"
            try:
                await asyncio.to_thread(decrypt_file, raw, opened, key)
            except SealError as exc:
                raise _refuse(image, str(exc)) from None
            raw.unlink()
            raw = opened
        try:
            await asyncio.to_thread(untagged, raw, clean)
        except (tarfile.TarError, ValueError, KeyError, TypeError) as exc:
            raise _refuse(image, f"the archive is not a `docker save` tarball ({type(exc).__name__})") from None
        loaded = await asyncio.to_thread(runner.load, clean)
    if image not in loaded or runner.image_id(image) != image:
        raise _refuse(image, f"its archive loaded {_names(loaded)}, not this image")
    log.info("fetched and loaded image %s (%d bytes)", image, archive.size)


def _names(ids: Iterable[str]) -> str:
    return ", ".join(ids) or "nothing"
