"""The container edge of the site worker: the sandbox every benchmark container runs in.

`ContainerRunner` is the port; `DockerRunner` runs on the local Docker engine, `FakeRunner` in tests.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import docker
import requests
from docker.errors import APIError, ImageNotFound, NotFound
from docker.types import DeviceRequest, LogConfig, Ulimit
from docker.types import Mount as DockerMount

from site_worker.watch import Watch, over_limits

IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
LOG_TAIL_LINES = 40
LOG_TAIL_BYTES = 64 << 10  # the engine splits a long line into 16 KiB entries: 40 of them would be 640 KiB
# What the engine keeps of a container's output on the host's disk: at most two files of 1 MiB (the one written and
# the one before, so the tail is never a freshly rotated, nearly empty file). Without this a model that floods its
# output fills the disk until the container is removed.
LOG_OPTIONS = {"max-size": "1m", "max-file": "2"}


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    writable: bool = False


@dataclass(frozen=True)
class Limits:
    memory: str = "2g"
    nano_cpus: int = 2_000_000_000
    pids: int = 256  # processes and threads
    timeout_s: float = 600.0
    output_bytes: int = 256 << 20  # in all writable mounts together
    output_files: int = 10_000  # entries (files, folders, links) in all writable mounts together


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


class Failure(StrEnum):
    """Why a run failed. All but EXIT_CODE are limits the container reached: it would reach them again."""

    TIMED_OUT = "timed_out"
    OUT_OF_MEMORY = "out_of_memory"
    TOO_MANY_PROCESSES = "too_many_processes"
    OUTPUT_TOO_LARGE = "output_too_large"
    TOO_MANY_FILES = "too_many_files"
    EXIT_CODE = "exit_code"

    @property
    def recurs(self) -> bool:
        return self is not Failure.EXIT_CODE


KILLED = 128 + 9  # the exit code of a container ended by SIGKILL (a timeout, the OOM killer, the output watch)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n:,} bytes"


def describe(failure: Failure, limits: Limits | None = None, exit_code: int = 1, where: str = "its output") -> str:
    """A failure in a person's words, with the limit it reached when `limits` is known."""
    if failure is Failure.EXIT_CODE:
        return f"exit code {exit_code}"
    if limits is None:
        return {
            Failure.TIMED_OUT: "timed out",
            Failure.OUT_OF_MEMORY: "killed for exceeding its memory limit",
            Failure.TOO_MANY_PROCESSES: "reached its limit of processes",
            Failure.OUTPUT_TOO_LARGE: f"wrote more than its limit of bytes to {where}",
            Failure.TOO_MANY_FILES: f"wrote more than its limit of files to {where}",
        }[failure]
    return {
        Failure.TIMED_OUT: f"timed out after {limits.timeout_s:g} s",
        Failure.OUT_OF_MEMORY: f"killed for exceeding its memory limit of {limits.memory}",
        Failure.TOO_MANY_PROCESSES: f"reached its limit of {limits.pids} processes",
        Failure.OUTPUT_TOO_LARGE: f"wrote more than {_size(limits.output_bytes)} to {where}",
        Failure.TOO_MANY_FILES: f"wrote more than {limits.output_files:,} files to {where}",
    }[failure]


def classify(exit_code: int, timed_out: bool, oom_killed: bool, refused_forks: int, over: str | None) -> Failure | None:
    """What failed a run, the cause before its consequence: output over its limits fails even a clean exit (and the
    watch's kill is why it exited); the OOM killer and refused forks explain a crash or a hang. Refused forks fail
    only a run that failed: a thread pool may meet the pids limit and carry on."""
    if over is not None:
        return Failure.OUTPUT_TOO_LARGE if over == "bytes" else Failure.TOO_MANY_FILES
    if oom_killed:
        return Failure.OUT_OF_MEMORY
    if refused_forks and (exit_code != 0 or timed_out):
        return Failure.TOO_MANY_PROCESSES
    if timed_out:
        return Failure.TIMED_OUT
    return Failure.EXIT_CODE if exit_code != 0 else None


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended. `failure` is derived from the other fields when not given (out of memory, then timed out,
    then a non-zero exit code), and `reason` from `failure`."""

    exit_code: int
    log_tail: str
    timed_out: bool = False
    oom_killed: bool = False
    failure: Failure | None = None
    reason: str = ""  # the failure in a person's words, with the limit it reached; see `why`

    def __post_init__(self) -> None:
        failure = self.failure or classify(self.exit_code, self.timed_out, self.oom_killed, 0, None)
        object.__setattr__(self, "failure", failure)
        object.__setattr__(self, "timed_out", self.timed_out or failure is Failure.TIMED_OUT)
        object.__setattr__(self, "oom_killed", self.oom_killed or failure is Failure.OUT_OF_MEMORY)
        if failure is not None and not self.reason:
            object.__setattr__(self, "reason", describe(failure, exit_code=self.exit_code))

    @classmethod
    def failed(cls, failure: Failure, limits: Limits | None = None, log_tail: str = "", where: str = "/assay/out",
               exit_code: int | None = None) -> RunOutcome:
        """The outcome a run that failed this way has, in the words DockerRunner uses (a test's scripted failure)."""
        code = exit_code if exit_code is not None else 1 if failure is Failure.EXIT_CODE else KILLED
        return cls(exit_code=code, log_tail=log_tail, failure=failure,
                   reason=describe(failure, limits, code, where))

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def recurs(self) -> bool:
        """The run reached one of its limits: running it again would fail the same way, so it is not retried."""
        return self.failure is not None and self.failure.recurs

    @property
    def why(self) -> str:
        return self.reason if self.failure is not None else f"exit code {self.exit_code}"


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

    def load(self, archive: Path) -> list[str]:
        """Load a `docker save` tarball into the engine; the image ids it held."""
        ...

    def host(self) -> tuple[float, int]:
        """The CPUs and the memory (MB) of the host the containers run on."""
        ...


class TracedRunner:
    """`runner` whose every container run is a span of its own, a child of the job's: its task, image, exit code and
    outcome (a failure sets the span's error status with the cause, never what the container wrote); and whose run
    time is measured by task and outcome (`error`: the engine raised, the container may not have run)."""

    def __init__(self, runner: ContainerRunner, tracer: Any, job: Any, meters: Any) -> None:
        self._runner, self._tracer, self._job, self._meters = runner, tracer, job, meters

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def run(self, spec: RunSpec) -> RunOutcome:
        from opentelemetry.trace import Status, StatusCode

        from assay_telemetry.metrics import BENCHMARK, CONTAINER_RUNS, OUTCOME, SITE, TASK

        bound = self._job.binding
        started, result = time.monotonic(), "error"
        try:
            with self._tracer.start_as_current_span(f"container {spec.task}", attributes={
                    "assay.task": spec.task, "assay.image": spec.image, "assay.job_id": self._job.job_id,
                    "assay.benchmark_id": bound.benchmark_id, "assay.model_id": bound.model_id,
                    "assay.dataset_id": bound.dataset_id, "assay.site_id": self._job.site_id}) as span:
                outcome = self._runner.run(spec)
                result = outcome.failure.value if outcome.failure else "ok"
                span.set_attribute("assay.exit_code", outcome.exit_code)
                span.set_attribute("assay.outcome", result)
                if not outcome.ok:
                    span.set_status(Status(StatusCode.ERROR, outcome.why))
                return outcome
        finally:
            self._meters.record(CONTAINER_RUNS, time.monotonic() - started, {
                TASK: spec.task, OUTCOME: result, BENCHMARK: bound.benchmark_id, SITE: self._job.site_id})


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
        # No file (in /tmp too) may grow past the output limit: the kernel refuses the write, a hard stop the output
        # watch, which polls, is not. One byte more, so that a file stopped there is over the limit and reported so.
        "ulimits": [Ulimit(name="fsize", soft=spec.limits.output_bytes + 1, hard=spec.limits.output_bytes + 1)],
        "mounts": [
            DockerMount(target=m.target, source=str(m.source.absolute()), type="bind", read_only=not m.writable)
            for m in spec.mounts
        ],
        "labels": {"assay.task": spec.task, "assay.worker": worker},
        "log_config": LogConfig(type=LogConfig.types.JSON, config=dict(LOG_OPTIONS)),
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


def tail_of(logs: bytes) -> str:
    """The end of a container's log, at most LOG_TAIL_BYTES: a single huge line does not make a huge tail."""
    return logs[-LOG_TAIL_BYTES:].decode("utf-8", errors="replace")


def _written_to(spec: RunSpec) -> str:
    return " and ".join(m.target for m in spec.mounts if m.writable) or "its output"


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

    def host(self) -> tuple[float, int]:
        info = self._client.info()
        return float(info["NCPU"]), int(info["MemTotal"]) >> 20

    def load(self, archive: Path) -> list[str]:
        try:
            with archive.open("rb") as stream:
                return [str(image.id) for image in self._client.images.load(stream)]
        except APIError as error:
            raise ContainerError(str(archive), "load", f"the engine refused: {error.explanation or error}") from error

    def run(self, spec: RunSpec) -> RunOutcome:
        require_image_id(spec)
        if self.image_id(spec.image) != spec.image:
            raise ContainerError(spec.image, spec.task, "image is not present in the local Docker engine")
        for mount in spec.mounts:
            if not mount.source.is_dir():
                raise ContainerError(spec.image, spec.task, f"mount source {mount.source} is not a directory")
        self._hand_writable_mounts_to_user(spec.mounts)
        limits, outputs = spec.limits, [m.source for m in spec.mounts if m.writable]
        container = None
        try:
            container = self._client.containers.create(**sandbox_kwargs(spec, self._user, self._worker))
            container.start()
            container.reload()
            with Watch(container, outputs, limits.output_bytes, limits.output_files) as watch:
                exit_code, timed_out = self._wait(container, limits.timeout_s)
            container.reload()
            oom_killed = bool(container.attrs["State"].get("OOMKilled", False))
            log_tail = tail_of(container.logs(stdout=True, stderr=True, tail=LOG_TAIL_LINES))
        except APIError as error:
            raise ContainerError(spec.image, spec.task, f"the engine refused: {error.explanation or error}") from error
        finally:
            if container is not None:
                try:
                    container.remove(force=True)
                except NotFound:
                    pass
            for folder in outputs:  # the container is gone: nothing it wrote stays readable by other users
                seal(folder)
        # What it left is measured again now that nothing writes: a run that exits between two walks is not spared.
        over = watch.over or over_limits(outputs, limits.output_bytes, limits.output_files)
        failure = classify(exit_code, timed_out, oom_killed, watch.refused_forks, over)
        reason = ""
        if failure is not None:
            reason = describe(failure, limits, exit_code, _written_to(spec))
            if timed_out and failure is not Failure.TIMED_OUT:
                reason += f", and timed out after {limits.timeout_s:g} s"
        return RunOutcome(exit_code=exit_code, log_tail=log_tail, timed_out=timed_out, oom_killed=oom_killed,
                          failure=failure, reason=reason)

    @staticmethod
    def _wait(container: Any, timeout_s: float) -> tuple[int, bool]:
        """The exit code, and whether the container was killed (SIGKILL: a SIGTERM can be ignored) for running past
        `timeout_s`."""
        try:
            return int(container.wait(timeout=timeout_s)["StatusCode"]), False
        except requests.exceptions.RequestException:
            # The SDK reports a wait timeout as a read timeout; the engine says whether it still runs.
            container.reload()
            if container.status == "running":
                container.kill()
                return int(container.wait()["StatusCode"]), True
            return int(container.wait()["StatusCode"]), False  # it ended just as the time ran out

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

    An action that raises is reported like a crashing container: exit code 1, the error as log. A scripted `Failure`
    becomes the outcome DockerRunner reports for it, in its words, with the limits of the spec that ran.
    """

    def __init__(self, images: Iterable[str] = ()) -> None:
        self.specs: list[RunSpec] = []
        self._images: dict[str, str] = {}
        self._actions: dict[str, TaskAction] = {}
        self._outcomes: dict[str, list[RunOutcome | Failure]] = {}
        for ref in images:
            self.add_image(ref)

    def add_image(self, ref: str) -> str:
        """Make `ref` present; returns its (fake, stable) image id."""
        image_id = ref if IMAGE_ID.fullmatch(ref) else "sha256:" + hashlib.sha256(ref.encode()).hexdigest()
        self._images[ref] = self._images[image_id] = image_id
        return image_id

    def on(self, task: str, action: TaskAction) -> None:
        self._actions[task] = action

    def script(self, task: str, *outcomes: RunOutcome | Failure) -> None:
        """Return these outcomes, in order, for the next runs of `task` (then success); a `Failure` stands for
        `RunOutcome.failed(failure, spec.limits)`."""
        self._outcomes.setdefault(task, []).extend(outcomes)

    def image_id(self, ref: str) -> str | None:
        return self._images.get(ref)

    def host(self) -> tuple[float, int]:
        return 8.0, 16384

    def load(self, archive: Path) -> list[str]:
        """The images a `docker save` tarball's manifest names, made present."""
        import json
        import tarfile

        with tarfile.open(archive) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        return [self.add_image("sha256:" + entry["Config"].removeprefix("blobs/sha256/").removesuffix(".json"))
                for entry in manifest]

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
        outcome = queued.pop(0) if queued else RunOutcome(exit_code=0, log_tail="")
        if isinstance(outcome, Failure):
            return RunOutcome.failed(outcome, spec.limits, where=_written_to(spec))
        return outcome
