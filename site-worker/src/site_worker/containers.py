"""The container edge of the site worker: the sandbox every benchmark container runs in.

`ContainerRunner` is the port; `DockerRunner` runs on the local Docker engine, `FakeRunner` in tests.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import docker
import requests
from docker.errors import APIError, ImageNotFound, NotFound
from docker.types import DeviceRequest
from docker.types import Mount as DockerMount

IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    writable: bool = False


@dataclass(frozen=True)
class Limits:
    memory: str = "2g"
    nano_cpus: int = 2_000_000_000
    pids: int = 256
    timeout_s: float = 600.0


@dataclass(frozen=True)
class RunSpec:
    image: str  # an image id "sha256:<64 hex>", never a tag
    task: str
    mounts: tuple[Mount, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = Limits()
    gpus: tuple[str, ...] = ()

    def source_of(self, target: str) -> Path:
        """The host directory mounted at `target`."""
        for mount in self.mounts:
            if mount.target == target:
                return mount.source
        raise KeyError(f"task {self.task!r} has no mount at {target}")


@dataclass(frozen=True)
class RunOutcome:
    exit_code: int
    log_tail: str
    timed_out: bool = False
    oom_killed: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.oom_killed

    @property
    def why(self) -> str:
        if self.timed_out:
            return "timed out"
        if self.oom_killed:
            return "killed for exceeding its memory limit"
        return f"exit code {self.exit_code}"


class ContainerError(Exception):
    """A container could not be run at all (bad image reference, absent image, engine refusal)."""

    def __init__(self, image: str, task: str, reason: str) -> None:
        super().__init__(f"image {image}, task {task!r}: {reason}")
        self.image, self.task, self.reason = image, task, reason


class ContainerRunner(Protocol):
    def image_id(self, ref: str) -> str | None:
        """The local image id (sha256:...) of a tag or id, None if absent."""
        ...

    def run(self, spec: RunSpec) -> RunOutcome: ...

    def remove_leftovers(self) -> list[str]:
        """Remove the containers a killed run of this worker left running; the ids removed."""
        ...


def require_image_id(spec: RunSpec) -> None:
    """Images run by digest only: a tag can be moved to other content between check and run."""
    if not IMAGE_ID.fullmatch(spec.image):
        reason = "not an image id of the form sha256:<64 hex>; run images by id, never by tag"
        raise ContainerError(spec.image, spec.task, reason)


def sandbox_kwargs(spec: RunSpec, user: str, worker: str = "") -> dict[str, Any]:
    """The docker SDK `containers.create` arguments for one sandboxed run."""
    require_image_id(spec)
    env = dict(spec.env)
    env["ASSAY_TASK"] = spec.task
    # "void" keeps an image that sets NVIDIA_VISIBLE_DEVICES=all (CUDA bases do) off the GPUs.
    env["NVIDIA_VISIBLE_DEVICES"] = ",".join(spec.gpus) if spec.gpus else "void"
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "command": [spec.task],
        "environment": env,
        "user": user,
        "network_mode": "none",
        "read_only": True,
        "tmpfs": {"/tmp": "rw,nosuid,nodev,size=256m"},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "mem_limit": spec.limits.memory,
        "memswap_limit": spec.limits.memory,  # no swap: over the limit is an OOM kill, not a crawl
        "nano_cpus": spec.limits.nano_cpus,
        "pids_limit": spec.limits.pids,
        "mounts": [
            DockerMount(target=m.target, source=str(m.source.absolute()), type="bind", read_only=not m.writable)
            for m in spec.mounts
        ],
        "labels": {"assay.task": spec.task, "assay.worker": worker},
    }
    if spec.gpus:
        kwargs["device_requests"] = [DeviceRequest(device_ids=list(spec.gpus), capabilities=[["gpu"]])]
    return kwargs


def sandbox_user() -> str:
    """Who a container runs as: the worker's own user, so what it reads and writes is the worker's alone; the
    unprivileged 65534 (nobody) when the worker is root, never root itself."""
    return "65534:65534" if os.geteuid() == 0 else f"{os.geteuid()}:{os.getegid()}"


def _tree(folder: Path) -> Iterable[tuple[str, bool]]:
    """Every path under `folder` (itself first), and whether it is a folder; links are not followed."""
    yield str(folder), True
    for top, dirs, files in os.walk(folder, followlinks=False):
        yield from ((os.path.join(top, name), name in dirs and not os.path.islink(os.path.join(top, name)))
                    for name in (*dirs, *files))


def seal(folder: Path) -> None:
    """Make what a container wrote in `folder` readable by its owner only: files 0600, folders 0700, whatever mode
    the container gave them. Symbolic links are neither followed nor changed."""
    for path, is_folder in _tree(folder):
        if not os.path.islink(path):
            os.chmod(path, 0o700 if is_folder else 0o600)


class OutputRefused(Exception):
    """What a container left where a file of its output should be cannot be read as that file."""


def read_output(path: Path, limit: int = 1 << 20) -> bytes:
    """A small file a container wrote, whole. A link is not followed and a pipe does not block: what a hostile
    container leaves makes the worker read nothing but its own output."""
    stream = open_output(path)
    if stream is None:
        raise OutputRefused("is not a regular file: it was not written, or it is a link or a pipe")
    with stream:
        content = stream.read(limit + 1)
    if len(content) > limit:
        raise OutputRefused(f"is over {limit} bytes")
    return content


def open_output(path: Path) -> BinaryIO | None:
    """A file a container wrote, open for reading; None unless it is a regular file (see `read_output`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def _parse_user(user: str) -> tuple[int, int]:
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or not (gid or uid).isdigit():
        raise ValueError(f"container user must be numeric 'uid:gid', got {user!r}")
    return int(uid), int(gid or uid)


class DockerRunner:
    """Runs a RunSpec on the local Docker engine, inside the sandbox, and always cleans up."""

    def __init__(self, client: docker.DockerClient, user: str | None = None, worker: str = "") -> None:
        """`user` is who containers run as (`sandbox_user()` unless given; another user than the worker's own needs a
        worker running as root, to hand the output folders over). `worker` labels its containers (`<site>/<worker
        id>`), so a restarted worker finds what it left running."""
        self._client = client
        self._user = user or sandbox_user()
        self._uid, self._gid = _parse_user(self._user)
        if os.geteuid() not in (0, self._uid):
            raise ValueError(f"containers can run as {self._user} only when the worker runs as root or as that user; "
                             f"this worker is uid {os.geteuid()}: leave the container user unset")
        self._worker = worker

    def remove_leftovers(self) -> list[str]:
        if not self._worker:
            return []
        leftovers = self._client.containers.list(all=True, filters={"label": f"assay.worker={self._worker}"})
        for container in leftovers:
            try:
                container.remove(force=True)
            except NotFound:
                pass
        return [container.id for container in leftovers]

    def image_id(self, ref: str) -> str | None:
        try:
            return self._client.images.get(ref).id
        except ImageNotFound:
            return None

    def run(self, spec: RunSpec) -> RunOutcome:
        require_image_id(spec)
        if self.image_id(spec.image) != spec.image:
            raise ContainerError(spec.image, spec.task, "image is not present in the local Docker engine")
        for mount in spec.mounts:
            if not mount.source.is_dir():
                raise ContainerError(spec.image, spec.task, f"mount source {mount.source} is not a directory")
        self._hand_writable_mounts_to_user(spec.mounts)
        container = None
        try:
            container = self._client.containers.create(**sandbox_kwargs(spec, self._user, self._worker))
            container.start()
            exit_code, timed_out = self._wait(container, spec.limits.timeout_s)
            container.reload()
            logs = container.logs(stdout=True, stderr=True, tail=LOG_TAIL_LINES)
            return RunOutcome(
                exit_code=exit_code,
                log_tail=logs.decode("utf-8", errors="replace"),
                timed_out=timed_out,
                oom_killed=bool(container.attrs["State"].get("OOMKilled", False)),
            )
        except APIError as error:
            raise ContainerError(spec.image, spec.task, f"the engine refused: {error.explanation or error}") from error
        finally:
            if container is not None:
                try:
                    container.remove(force=True)
                except NotFound:
                    pass
            for mount in spec.mounts:  # the container is gone: nothing it wrote stays readable by other users
                if mount.writable:
                    seal(mount.source)

    @staticmethod
    def _wait(container: Any, timeout_s: float) -> tuple[int, bool]:
        try:
            return int(container.wait(timeout=timeout_s)["StatusCode"]), False
        except requests.exceptions.RequestException:
            # The SDK reports a wait timeout as a read timeout; the engine says whether it still runs.
            container.reload()
            if container.status != "running":
                raise
            container.kill()
            return int(container.wait()["StatusCode"]), True

    def _hand_writable_mounts_to_user(self, mounts: Iterable[Mount]) -> None:
        """The container user must be able to write its output mounts, and no one else: a worker that is not root
        runs containers as itself; as root we hand them to the sandbox user."""
        for mount in mounts:
            if not mount.writable:
                continue
            if os.geteuid() == 0:
                for path, _ in _tree(mount.source):
                    os.chown(path, self._uid, self._gid, follow_symlinks=False)
            mount.source.chmod(0o700)


TaskAction = Callable[[RunSpec], None]


class FakeRunner:
    """A test double: records every spec, runs a python action per task, returns scripted outcomes.

    An action that raises is reported like a crashing container: exit code 1, the error as log.
    """

    def __init__(self, images: Iterable[str] = ()) -> None:
        self.specs: list[RunSpec] = []
        self._images: dict[str, str] = {}
        self._actions: dict[str, TaskAction] = {}
        self._outcomes: dict[str, list[RunOutcome]] = {}
        for ref in images:
            self.add_image(ref)

    def add_image(self, ref: str) -> str:
        """Make `ref` present; returns its (fake, stable) image id."""
        image_id = ref if IMAGE_ID.fullmatch(ref) else "sha256:" + hashlib.sha256(ref.encode()).hexdigest()
        self._images[ref] = self._images[image_id] = image_id
        return image_id

    def on(self, task: str, action: TaskAction) -> None:
        self._actions[task] = action

    def script(self, task: str, *outcomes: RunOutcome) -> None:
        """Return these outcomes, in order, for the next runs of `task` (then success)."""
        self._outcomes.setdefault(task, []).extend(outcomes)

    def image_id(self, ref: str) -> str | None:
        return self._images.get(ref)

    def remove_leftovers(self) -> list[str]:
        return []

    def run(self, spec: RunSpec) -> RunOutcome:
        require_image_id(spec)
        if spec.image not in self._images:
            raise ContainerError(spec.image, spec.task, "image is not present in the local Docker engine")
        self.specs.append(spec)
        action = self._actions.get(spec.task)
        if action is not None:
            try:
                action(spec)
            except Exception as error:  # a crash inside the "container" is the container's failure
                return RunOutcome(exit_code=1, log_tail=f"{type(error).__name__}: {error}")
        queued = self._outcomes.get(spec.task)
        return queued.pop(0) if queued else RunOutcome(exit_code=0, log_tail="")
