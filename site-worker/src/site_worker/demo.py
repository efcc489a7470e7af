"""A benchmark's demo data at its check site: fetched from the artefact store by its archive's sha256, checked,
unpacked without following anything that leaves its folder, and prepared with the benchmark's preparator when it is
raw; kept, by sha256, for the next model's compatibility check."""

from __future__ import annotations

import asyncio
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from contracts.messages import DemoData, JobSpec
from site_worker.containers import ContainerError, ContainerRunner, Limits
from site_worker.datasets import content_hash, prepare_dataset
from site_worker.execution import JobRefused, RunFailed
from site_worker.images import ArchiveMissing, ImageStore, sha256_of

READY = "ready.json"  # written last: a folder without it is a half-done preparation, done again


@dataclass(frozen=True)
class DemoFolder:
    folder: Path        # holds data/ and labels/, as a prepared dataset does
    content_hash: str   # of data/ and labels/ as prepared here, checked again right before the run


def _refuse(demo: DemoData, reason: str) -> JobRefused:
    return JobRefused(f"demo data {demo.archive.sha256}: {reason}; the check is not run")


async def demo_folder(job: JobSpec, runner: ContainerRunner, store: ImageStore | None, work_dir: Path,
                      limits: Limits) -> DemoFolder:
    """The prepared demo data of the job's benchmark, fetched and prepared on first use."""
    demo = job.demo_data
    assert demo is not None
    home = work_dir / ".demo" / demo.archive.sha256.removeprefix("sha256:")
    if (ready := home / READY).is_file():
        return DemoFolder(home, json.loads(ready.read_text())["content_hash"])
    if store is None:
        raise _refuse(demo, "this site fetches nothing from the artefact store")
    try:
        stored = await store.size(demo.archive.sha256)
    except ArchiveMissing:
        raise _refuse(demo, "the artefact store holds no such archive (assay benchmark register --demo-data pushes "
                            "it)") from None
    if stored != demo.archive.size:
        raise _refuse(demo, f"the stored archive is {stored:,} bytes, not the {demo.archive.size:,} registered")
    shutil.rmtree(home, ignore_errors=True)
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.parent) as scratch:
        archive, unpacked = Path(scratch) / "demo.tar", Path(scratch) / "unpacked"
        with archive.open("wb") as stream:
            await store.fetch(demo.archive.sha256, stream)
        if (found := await asyncio.to_thread(sha256_of, archive)) != demo.archive.sha256:
            raise _refuse(demo, f"the fetched archive has sha256 {found}: it was changed or corrupted")
        try:
            await asyncio.to_thread(_unpack, archive, unpacked)
        except (tarfile.TarError, OSError) as exc:
            raise _refuse(demo, f"the archive does not unpack ({type(exc).__name__}: {exc})") from None
        prepared = await asyncio.to_thread(_prepared, demo, job, unpacked, Path(scratch) / "prepared", runner, limits)
        prepared.rename(home)
    found = await asyncio.to_thread(content_hash, home / "data", home / "labels")
    (home / READY).write_text(json.dumps({"content_hash": found, "cases": demo.cases}))
    return DemoFolder(home, found)


def _unpack(archive: Path, into: Path) -> None:
    """Regular files and folders only, each inside `into` (the `data` filter refuses links out, devices, setuid)."""
    into.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    for path in (into, *into.rglob("*")):  # readable by the sandbox's user, whatever the worker's umask: it is the
        path.chmod(0o755 if path.is_dir() else 0o644)  # benchmark's public demo data, mounted read-only


def _prepared(demo: DemoData, job: JobSpec, unpacked: Path, out: Path, runner: ContainerRunner,
              limits: Limits) -> Path:
    """A folder holding data/ and labels/: the archive's own (prepared demo data) or the preparator's."""
    if demo.prepared:
        if not ((unpacked / "data").is_dir() and (unpacked / "labels").is_dir()):
            raise _refuse(demo, "it is registered as prepared but holds no data/ and labels/ folders")
        return unpacked
    assert job.preparator is not None
    try:
        ready = prepare_dataset(runner, job.preparator, unpacked, out, limits)
    except ContainerError as exc:  # its log stays here: nothing a container wrote leaves the site
        log_file = out.parent.parent / f"{demo.archive.sha256.removeprefix('sha256:')}.failure.log"
        log_file.write_text(exc.reason)
        raise RunFailed(f"the benchmark's preparator failed on its demo data (step {exc.task}); its log is kept at "
                        f"the site in jobs/.demo/{log_file.name}", recurs=True) from None
    if ready.case_count != demo.cases:
        raise RunFailed(f"the preparator counted {ready.case_count} cases in the demo data; the benchmark declares "
                        f"{demo.cases}", recurs=True)
    return out
