"""What the site can give its jobs at once: the GPUs it has, a ledger of CPUs, memory and whole devices shared by the
jobs that run, and a fair queue for the jobs that wait; `Capacity` gives a worker's jobs their turn. No Docker, no bus.

Ledger and FairQueue are not thread-safe: use them from the worker's one asyncio loop (no method awaits).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import astuple, dataclass

from contracts.messages import JobSpec
from site_worker.containers import ContainerRunner
from site_worker.execution import JobRefused

log = logging.getLogger("site_worker.capacity")

NVIDIA_SMI = ("nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader")


def detect_gpus(run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
                which: Callable[[str], str | None] = shutil.which,
                nvml: Callable[[], tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """The UUIDs of this host's GPUs in index order, from nvidia-smi, else from NVML; () when neither tells. UUIDs,
    not indexes: they name the same device whatever CUDA_VISIBLE_DEVICES or a reboot does to the numbering."""
    if which(NVIDIA_SMI[0]) is not None:
        try:
            done = run(list(NVIDIA_SMI), capture_output=True, text=True, timeout=10, check=False)
            if done.returncode == 0:
                return parse_nvidia_smi(done.stdout)
            log.warning("nvidia-smi failed (exit %s): %s", done.returncode, done.stderr.strip()[:200])
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.warning("nvidia-smi failed: %s", exc)
    return (nvml or nvml_gpus)()


def parse_nvidia_smi(csv: str) -> tuple[str, ...]:
    """`0, GPU-1f3c...` lines, one a device, into UUIDs ordered by index."""
    rows = [line.split(",") for line in csv.splitlines() if line.strip()]
    return tuple(uuid.strip() for _, uuid in sorted(rows, key=lambda row: int(row[0])))


def nvml_gpus() -> tuple[str, ...]:
    """The UUIDs NVML gives, when pynvml is installed (it is optional) and a driver answers."""
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
        try:
            uuids = [pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
                     for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        log.warning("NVML found no GPUs: %s", exc)
        return ()
    return tuple(u.decode() if isinstance(u, bytes) else u for u in uuids)


def site_gpus(declared: str, detect: Callable[[], tuple[str, ...]] = detect_gpus) -> tuple[str, ...]:
    """The devices the site gives its jobs: "auto" detects them, "" is none, "0,1" (or UUIDs) names them in order."""
    if declared.strip().lower() == "auto":
        return detect()
    ids = tuple(part.strip() for part in declared.split(",") if part.strip())
    if twice := sorted({i for i in ids if ids.count(i) > 1}):
        raise ValueError(f"gpus names {', '.join(twice)} more than once")
    return ids


@dataclass(frozen=True)
class Budget:
    cpus: float
    memory_mb: int
    gpus: tuple[str, ...] = ()


RESERVE = Budget(cpus=0.5, memory_mb=256)  # the worker's own: it still heartbeats while a container misbehaves


def usable(host: Budget, reserve: Budget = RESERVE) -> Budget:
    """What the host has for jobs once the worker's reserve is kept back (a reserved GPU is never given)."""
    left = Budget(host.cpus - reserve.cpus, host.memory_mb - reserve.memory_mb,
                  tuple(g for g in host.gpus if g not in reserve.gpus))
    if left.cpus <= 0 or left.memory_mb <= 0:
        raise ValueError(f"the host ({host.cpus} CPUs, {host.memory_mb} MB) has nothing left after the worker's "
                         f"reserve ({reserve.cpus} CPUs, {reserve.memory_mb} MB)")
    return left


@dataclass(frozen=True)
class Request:
    """What one job holds while it runs: the most any one of its containers (they run one after another) asks."""

    cpus: float
    memory_mb: int
    gpus: int = 0


@dataclass(frozen=True)
class Grant:
    job_id: str
    cpus: float
    memory_mb: int
    gpus: tuple[str, ...]  # whole devices, by id, for this job alone


def _milli(cpus: float) -> int:
    return round(cpus * 1000)  # CPUs are counted in thousandths: sums of 0.1s never drift past the budget


class Ledger:
    """The grants of the jobs that run, out of `budget` (the host less the reserve: see `usable`). Devices are given
    in the budget's order (index order when detected), first free first."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._grants: dict[str, Grant] = {}

    @property
    def running(self) -> int:
        """How many jobs hold a grant."""
        return len(self._grants)

    def free(self) -> Budget:
        held = {g for grant in self._grants.values() for g in grant.gpus}
        cpus = _milli(self.budget.cpus) - sum(_milli(g.cpus) for g in self._grants.values())
        return Budget(cpus / 1000, self.budget.memory_mb - sum(g.memory_mb for g in self._grants.values()),
                      tuple(g for g in self.budget.gpus if g not in held))

    def fits_ever(self, cpus: float, memory_mb: int, gpus: int) -> str | None:
        """Why the request cannot run here even on an idle worker, or None when it only has to wait its turn."""
        have, reasons = self.budget, []
        if gpus > len(have.gpus):
            reasons.append(f"asks {gpus} GPUs; this worker has {len(have.gpus)}")
        if _milli(cpus) > _milli(have.cpus):
            reasons.append(f"asks {cpus:g} CPUs; this worker has {have.cpus:g} for its jobs")
        if memory_mb > have.memory_mb:
            reasons.append(f"asks {memory_mb} MB of memory; this worker has {have.memory_mb} MB for its jobs")
        return "; ".join(reasons) or None

    def fits_now(self, cpus: float, memory_mb: int, gpus: int) -> bool:
        free = self.free()
        return _milli(cpus) <= _milli(free.cpus) and memory_mb <= free.memory_mb and gpus <= len(free.gpus)

    def try_take(self, job_id: str, cpus: float, memory_mb: int, gpus: int) -> Grant | None:
        """The job's grant, or None when it does not fit what is free now (ask `fits_ever` whether it ever will)."""
        if cpus <= 0 or memory_mb < 0 or gpus < 0:
            raise ValueError(f"job {job_id} asks for {cpus} CPUs, {memory_mb} MB and {gpus} GPUs")
        if job_id in self._grants:
            raise ValueError(f"job {job_id} already holds {self._grants[job_id]}")
        if not self.fits_now(cpus, memory_mb, gpus):
            return None
        grant = Grant(job_id, cpus, memory_mb, self.free().gpus[:gpus])
        self._grants[job_id] = grant
        return grant

    def give_back(self, job_id: str) -> Grant | None:
        """Free the job's grant; once is enough, and again does nothing."""
        return self._grants.pop(job_id, None)


@dataclass(frozen=True)
class Waiting:
    job_id: str
    benchmark_id: str
    model_id: str
    request: Request

    @property
    def share(self) -> tuple[str, str]:
        return self.benchmark_id, self.model_id


class FairQueue:
    """The jobs waiting for capacity. The next is, among those that fit what is free now, the one whose (benchmark,
    model) runs fewest jobs, then the one whose pair started a job longest ago (never counts as longest), then the
    one that came first: one model's many jobs take turns with the others', however long or short they run."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[int, Waiting]] = {}
        self._arrivals = itertools.count()
        self._starts = itertools.count()
        self._running: Counter[tuple[str, str]] = Counter()
        self._last_start: dict[tuple[str, str], int] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, job: Waiting) -> None:
        if job.job_id in self._waiting:
            raise ValueError(f"job {job.job_id} is already waiting")
        self._waiting[job.job_id] = (next(self._arrivals), job)

    def remove(self, job_id: str) -> Waiting | None:
        arrived_job = self._waiting.pop(job_id, None)
        return arrived_job[1] if arrived_job else None

    def next_fitting(self, ledger: Ledger) -> Waiting | None:
        fitting = [(self._running[job.share], self._last_start.get(job.share, -1), arrived, job)
                   for arrived, job in self._waiting.values() if ledger.fits_now(*astuple(job.request))]
        return min(fitting, key=lambda row: row[:3])[3] if fitting else None

    def started(self, job: Waiting) -> None:
        """The job leaves the queue and counts as running for its pair."""
        self.remove(job.job_id)
        self._running[job.share] += 1
        self._last_start[job.share] = next(self._starts)

    def finished(self, job: Waiting) -> None:
        self._running[job.share] -= 1
        if self._running[job.share] <= 0:
            del self._running[job.share]


class NeverFits(ValueError):
    """The job asks more than this worker has: refuse it, do not queue it."""


async def acquire(ledger: Ledger, queue: FairQueue, job: Waiting, wake: asyncio.Condition) -> Grant:
    """Wait until `job` is the queue's next that fits, then take its grant. Cancelled, it leaves the queue."""
    r = job.request
    if reason := ledger.fits_ever(r.cpus, r.memory_mb, r.gpus):
        raise NeverFits(f"job {job.job_id} {reason}")
    async with wake:
        queue.add(job)
        try:
            while (chosen := queue.next_fitting(ledger)) is None or chosen.job_id != job.job_id:
                await wake.wait()
            grant = ledger.try_take(job.job_id, r.cpus, r.memory_mb, r.gpus)
            assert grant is not None  # next_fitting only chooses a job that fits
            queue.started(job)
            return grant
        finally:
            queue.remove(job.job_id)
            wake.notify_all()  # what is left may fit the next job (or this one was chosen and is gone)


async def release(ledger: Ledger, queue: FairQueue, job: Waiting, wake: asyncio.Condition) -> None:
    async with wake:
        if ledger.give_back(job.job_id) is not None:
            queue.finished(job)
        wake.notify_all()


@dataclass(frozen=True)
class Capacity:
    """What the worker's host gives its jobs at once, shared fairly across the models and benchmarks that wait."""

    ledger: Ledger
    queue: FairQueue
    wake: asyncio.Condition

    @classmethod
    def of(cls, runner: ContainerRunner, gpus: str) -> Capacity:
        cpus, memory_mb = runner.host()
        return cls(Ledger(usable(Budget(cpus, memory_mb, site_gpus(gpus)))), FairQueue(), asyncio.Condition())

    @asynccontextmanager
    async def granted(self, job: JobSpec) -> AsyncIterator[tuple[str, ...]]:
        """Wait for the job's share of the host; the GPUs it is given. A CPU cap is a cap, not a reservation: a job
        asking more CPUs than the host has takes all of them, and runs more slowly."""
        asked = job.limits
        cpus = min(asked.cpus, self.ledger.budget.cpus)
        waiting = Waiting(job.job_id, job.binding.benchmark_id, job.binding.model_id,
                          Request(cpus, asked.memory_mb, asked.gpus))
        try:
            grant = await acquire(self.ledger, self.queue, waiting, self.wake)
        except NeverFits as exc:
            raise JobRefused(f"{exc}; nothing was run") from None
        try:
            yield grant.gpus
        finally:
            await release(self.ledger, self.queue, waiting, self.wake)
