"""`assay model push`: an image, as `docker save` writes it (by id, so it names no tag), into the artefact store
under its image id; a site that lacks the image fetches it from there and loads it only if it is that archive."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import docker

from assay.client import connected
from assay.home import Home
from contracts.messages import Archive, DemoData, GrantImageKey, ImageRef
from contracts.sealing import encrypt_file, new_key, seal_key
from contracts.subjects import IMAGES_BUCKET


def save(client: docker.DockerClient, image_id: str, into: Path) -> Archive:
    """`docker save` of `image_id` into the file `into` (readable by this user only); its archive."""
    digest, size = hashlib.sha256(), 0
    with os.fdopen(os.open(into, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as stream:
        for chunk in client.images.get(image_id).save(named=False):
            stream.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return Archive(sha256="sha256:" + digest.hexdigest(), size=size)


S3_VARIABLE = "ASSAY_IMAGES_S3"  # where the images are kept when not on the bus: s3://KEY:SECRET@host:port/bucket


async def upload(nats_url: str, image_id: str, path: Path) -> None:
    """Into the store the sites read: the S3 bucket `ASSAY_IMAGES_S3` names, else the bus's object store."""
    if s3 := os.environ.get(S3_VARIABLE):
        import asyncio

        from site_worker.images import s3_store

        await asyncio.to_thread(s3_store(s3).put, image_id, path)
        return
    async with connected(nats_url) as (nc, _):
        store = await nc.jetstream(timeout=30).object_store(IMAGES_BUCKET)
        with path.open("rb") as stream:
            await store.put(image_id, stream)


def archive_file(home: Home, image_id: str) -> Path:
    return home.root / "archives" / f"{image_id.removeprefix('sha256:')}.json"


def key_file(home: Home, image_id: str) -> Path:
    return archive_file(home, image_id).with_suffix(".key")


async def push(home: Home, client: docker.DockerClient, image_id: str, private: bool = False) -> Archive:
    """Save, upload, and remember the archive here, so registering the image names it. Private: the archive is
    encrypted with a new key kept here (mode 0600), which `assay model grant` seals to each site that may run it."""
    with tempfile.TemporaryDirectory(prefix="assay-push-") as folder:
        path = Path(folder) / "image.tar"
        archive = save(client, image_id, path)
        if private:
            key, sealed = new_key(), Path(folder) / "image.tar.sealed"
            encrypt_file(path, sealed, key)
            path.unlink()
            path, archive = sealed, Archive(sha256=_sha256(sealed), size=sealed.stat().st_size, encrypted=True)
            secret = key_file(home, image_id)
            secret.parent.mkdir(parents=True, exist_ok=True)
            with os.fdopen(os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as stream:
                stream.write(key)
        await upload(home.nats_url(), image_id, path)
    record = archive_file(home, image_id)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(archive.model_dump_json())
    return archive


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def grant(home: Home, image_id: str, site_id: str) -> GrantImageKey:
    """The command that gives `site_id` the key of a private image pushed from here, sealed to the site's key."""
    secret = key_file(home, image_id)
    if not secret.exists():
        raise FileNotFoundError(f"no key of image {image_id} here: it was not pushed private from this state folder "
                                "(assay model push IMAGE --private)")
    return GrantImageKey(image=image_id, site_id=site_id, sealed_key=seal_key(secret.read_bytes(),
                                                                               home.public_key(site_id)))


def pushed(home: Home, image_id: str) -> Archive | None:
    record = archive_file(home, image_id)
    return Archive.model_validate(json.loads(record.read_text())) if record.exists() else None


def image_ref(home: Home, image_id: str, name: str) -> ImageRef:
    """The image as a command names it: with its archive when it was pushed from here."""
    return ImageRef(digest=image_id, name=name, archive=pushed(home, image_id))


def pack(folder: Path, into: Path) -> Archive:
    """`folder` as a tar archive that depends on its files alone (sorted names, no times, owners or modes beyond
    read and execute), so the same folder always has the same sha256."""
    import tarfile

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
        return info

    paths = sorted(p for p in folder.rglob("*") if p.is_file() or p.is_dir())
    if not any(p.is_file() for p in paths):
        raise ValueError(f"{folder} holds no files: demo data is a folder of cases")
    with tarfile.open(into, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in paths:
            if path.is_symlink():
                raise ValueError(f"{path} is a link: demo data holds plain files and folders only")
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False, filter=plain)
    return Archive(sha256=_sha256(into), size=into.stat().st_size)


async def push_demo(home: Home, folder: Path, cases: int) -> DemoData:
    """The benchmark's demo data into the artefact store under its archive's sha256: prepared when the folder holds
    data/ and labels/, else raw (the check site runs the preparator on it)."""
    with tempfile.TemporaryDirectory(prefix="assay-demo-") as scratch:
        path = Path(scratch) / "demo.tar"
        archive = pack(folder, path)
        await upload(home.nats_url(), archive.sha256, path)
    return DemoData(archive=archive, prepared=(folder / "data").is_dir() and (folder / "labels").is_dir(),
                    cases=cases)
