"""Watches a running container for what its limits do not stop or do not report: output filling the host's disk
(its writable mounts are host folders) and forks refused at its pids limit (the kernel refuses them silently).
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from docker.errors import APIError

POLL_S = 0.1  # how often the pids counter is read and, at most, the output walked
# The output is walked again after ten times the last walk took, so the watch costs at most a tenth of a core: every
# 0.1 s for a few files, every 0.4 s for 10,000 (a walk of those takes about 40 ms here).
WALK_COST = 10
PROC = Path("/proc")
CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Written:
    """What a container left in its writable mounts, counted up to just past the limits."""

    bytes: int
    files: int  # every entry: files, folders, links, pipes

    def over(self, max_bytes: int, max_files: int) -> str | None:
        """"bytes" or "files" when over that limit (bytes first), else None."""
        return "bytes" if self.bytes > max_bytes else "files" if self.files > max_files else None


def measure(folders: Sequence[Path], max_bytes: int, max_files: int) -> Written:
    """Size and entry count of everything under `folders`, following no link; it stops once over a limit, so a
    folder of a million files costs no more than `max_files` entries. A file counts its apparent size or the disk it
    uses, whichever is larger (a sparse file is refused like a full one)."""
    total, count = 0, 0
    pending = list(folders)
    while pending and total <= max_bytes and count <= max_files:
        for entry in _entries(pending.pop()):
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:  # removed while we looked
                continue
            count += 1
            used = info.st_blocks * 512
            total += max(info.st_size, used) if stat.S_ISREG(info.st_mode) else used
            if stat.S_ISDIR(info.st_mode):
                pending.append(Path(entry.path))
    return Written(total, count)


def over_limits(folders: Sequence[Path], max_bytes: int, max_files: int) -> str | None:
    """"bytes" or "files" when what is under `folders` is over that limit, else None."""
    return measure(folders, max_bytes, max_files).over(max_bytes, max_files)


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except PermissionError:
        pass
    except OSError:
        return []
    try:  # a folder its owner (the container, running as this worker) made unreadable: we own it too
        folder.chmod(0o700)
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []


def pids_events_file(pid: int, proc: Path = PROC, cgroup: Path = CGROUP) -> Path | None:
    """The cgroup file (v1 or v2) whose `max` line counts the forks refused at the pids limit of process `pid`;
    None when this worker cannot see it (another pid or cgroup namespace, no pids controller)."""
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            candidate = cgroup / "pids" / path.lstrip("/") / "pids.events"  # v1: one hierarchy per controller
        elif controllers == "":
            candidate = cgroup / path.lstrip("/") / "pids.events"  # v2: the unified hierarchy
        else:
            continue
        if candidate.is_file():
            return candidate
    return None


def forks_refused(events: Path) -> int | None:
    """The `max` counter of a pids.events file; None once the cgroup is gone (the container exited)."""
    try:
        for line in events.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "max":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


class Watch:
    """A thread that polls one started container until stopped: it counts refused forks and kills the container
    (SIGKILL) as soon as its writable mounts hold more than `max_bytes` or `max_files`.

    Use as a context manager around the wait for the container's exit. Known limits: output can overshoot by what is
    written between two walks (0.1 to 0.5 s: at page-cache speed, hundreds of MiB; no single file passes the limit,
    though, the kernel stops it: see `sandbox_kwargs`); forks refused within 0.1 s of the container's exit may go
    unseen (its cgroup is removed when it exits); where the cgroup file is out of sight (the worker in another pid
    or cgroup namespace) the engine's stats stand in, at about a second a call, and see only "at the limit"."""

    def __init__(self, container: Any, folders: Sequence[Path], max_bytes: int, max_files: int) -> None:
        self._container = container
        self._folders, self._max_bytes, self._max_files = tuple(folders), max_bytes, max_files
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name=f"watch-{container.id[:12]}", daemon=True)
        self._events: Path | None = None
        self._pids_from_stats = False
        self.refused_forks = 0
        self.over: str | None = None  # "bytes" or "files" once the container was killed for its output

    def __enter__(self) -> Watch:
        pid = int(self._container.attrs.get("State", {}).get("Pid") or 0)  # 0: it has exited already
        self._events = pids_events_file(pid) if pid else None
        self._pids_from_stats = bool(pid) and self._events is None
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        next_walk = 0.0
        while True:
            self._count_forks()
            if self._folders and time.monotonic() >= next_walk:
                started = time.monotonic()
                self.over = over_limits(self._folders, self._max_bytes, self._max_files)
                if self.over:
                    self._kill()
                    return
                next_walk = started + WALK_COST * (time.monotonic() - started)
            if self._stop.wait(POLL_S):
                return

    def _count_forks(self) -> None:
        if self._events is not None:
            refused = forks_refused(self._events)
            if refused is not None:
                self.refused_forks = max(self.refused_forks, refused)
        elif self._pids_from_stats:  # no cgroup file in sight: the engine's stats, slower, tell only "at the limit"
            try:
                pids = self._container.stats(stream=False, one_shot=True).get("pids_stats") or {}
            except (APIError, requests.exceptions.RequestException, ValueError):
                return
            if pids.get("limit") and pids.get("current", 0) >= pids["limit"]:
                self.refused_forks = max(self.refused_forks, 1)

    def _kill(self) -> None:
        try:
            self._container.kill()
        except APIError:  # it has exited already
            pass
