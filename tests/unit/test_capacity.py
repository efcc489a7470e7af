"""The site's capacity core: GPUs found and named, budgets shared by concurrent jobs, and a fair turn for each model."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from site_worker.capacity import (
    Budget,
    FairQueue,
    Ledger,
    NeverFits,
    Request,
    Waiting,
    acquire,
    detect_gpus,
    parse_nvidia_smi,
    release,
    site_gpus,
    usable,
)

SMI_OUTPUT = "1, GPU-bbbb\n0, GPU-aaaa\n"
HOST = Budget(cpus=8.0, memory_mb=16384, gpus=("0", "1"))


class FakeRun:
    """Stands in for subprocess.run: answers with `stdout` and `returncode`, or raises `error`."""

    def __init__(self, stdout: str = "", returncode: int = 0, error: Exception | None = None) -> None:
        self.stdout, self.returncode, self.error = stdout, returncode, error
        self.calls: list[list[str]] = []

    def __call__(self, args: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        if self.error is not None:
            raise self.error
        return subprocess.CompletedProcess(args, self.returncode, self.stdout, "driver says no")


def found(path: str | None):
    return lambda name: path


def no_nvml() -> tuple[str, ...]:
    return ()


def job(job_id: str, model: str = "A", benchmark: str = "b", cpus: float = 1.0, memory_mb: int = 512,
        gpus: int = 0) -> Waiting:
    return Waiting(job_id, benchmark, model, Request(cpus, memory_mb, gpus))


def test_gpus_are_the_uuids_nvidia_smi_lists_in_index_order() -> None:
    run = FakeRun(SMI_OUTPUT)
    assert detect_gpus(run, found("/usr/bin/nvidia-smi"), no_nvml) == ("GPU-aaaa", "GPU-bbbb")
    assert run.calls == [["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"]]


@pytest.mark.parametrize("run", [FakeRun(returncode=9), FakeRun(error=subprocess.TimeoutExpired("nvidia-smi", 10)),
                                 FakeRun(error=PermissionError("denied")), FakeRun("garbage without a comma\n")])
def test_a_failing_nvidia_smi_means_no_gpus_and_never_raises(run: FakeRun) -> None:
    assert detect_gpus(run, found("/usr/bin/nvidia-smi"), no_nvml) == ()


def test_without_nvidia_smi_nothing_is_run_and_nvml_is_asked() -> None:
    run = FakeRun(SMI_OUTPUT)
    assert detect_gpus(run, found(None), no_nvml) == ()
    assert detect_gpus(run, found(None), lambda: ("GPU-cccc",)) == ("GPU-cccc",)
    assert run.calls == []


def test_nvml_is_asked_when_nvidia_smi_fails() -> None:
    assert detect_gpus(FakeRun(returncode=6), found("/usr/bin/nvidia-smi"), lambda: ("GPU-cccc",)) == ("GPU-cccc",)


def test_parsing_ignores_blank_lines() -> None:
    assert parse_nvidia_smi("\n0, GPU-aaaa\n\n") == ("GPU-aaaa",)


def test_declared_gpus_are_named_auto_detects_and_empty_is_none() -> None:
    assert site_gpus("0, 1", detect=lambda: ("x",)) == ("0", "1")
    assert site_gpus("auto", detect=lambda: ("GPU-aaaa",)) == ("GPU-aaaa",)
    assert site_gpus("", detect=lambda: ("x",)) == ()
    with pytest.raises(ValueError, match="names 0 more than once"):
        site_gpus("0,1,0")


def test_the_worker_keeps_a_reserve_for_itself() -> None:
    assert usable(HOST) == Budget(7.5, 16128, ("0", "1"))
    assert usable(HOST, Budget(1, 1024, ("1",))) == Budget(7.0, 15360, ("0",))
    with pytest.raises(ValueError, match="nothing left"):
        usable(Budget(0.5, 4096))


def test_gpu_grants_are_whole_free_devices_by_id_one_job_per_device() -> None:
    ledger = Ledger(Budget(8, 8192, ("0", "1", "2")))
    first = ledger.try_take("j1", 1, 512, 1)
    second = ledger.try_take("j2", 1, 512, 2)
    assert first is not None and first.gpus == ("0",)
    assert second is not None and second.gpus == ("1", "2")
    assert ledger.free().gpus == ()
    ledger.give_back("j1")
    third = ledger.try_take("j3", 1, 512, 1)
    assert third is not None and third.gpus == ("0",)


def test_a_job_waits_while_no_device_is_free_and_gets_one_given_back() -> None:
    ledger = Ledger(Budget(8, 8192, ("0", "1")))
    assert ledger.try_take("j1", 1, 512, 2) is not None
    assert ledger.try_take("j2", 1, 512, 1) is None
    assert ledger.fits_ever(1, 512, 1) is None  # it waits; it is not refused
    assert ledger.give_back("j1") is not None
    assert ledger.give_back("j1") is None  # twice does nothing
    grant = ledger.try_take("j2", 1, 512, 1)
    assert grant is not None and grant.gpus == ("0",)


def test_a_request_bigger_than_the_host_is_refused_with_its_reason() -> None:
    ledger = Ledger(usable(HOST))
    assert ledger.fits_ever(1, 512, 4) == "asks 4 GPUs; this worker has 2"
    assert ledger.fits_ever(8, 512, 0) == "asks 8 CPUs; this worker has 7.5 for its jobs"
    assert "asks 20000 MB of memory; this worker has 16128 MB" in (ledger.fits_ever(1, 20000, 0) or "")
    assert ledger.fits_ever(7.5, 16128, 2) is None  # the whole budget fits an idle worker


async def test_a_job_that_never_fits_is_refused_at_once_not_queued() -> None:
    ledger, queue = Ledger(usable(HOST)), FairQueue()
    with pytest.raises(NeverFits, match="asks 4 GPUs; this worker has 2"):
        await acquire(ledger, queue, job("big", gpus=4), asyncio.Condition())
    assert len(queue) == 0


def test_a_job_cannot_hold_two_grants() -> None:
    ledger = Ledger(HOST)
    ledger.try_take("j1", 1, 512, 0)
    with pytest.raises(ValueError, match="already holds"):
        ledger.try_take("j1", 1, 512, 0)


takes = st.tuples(st.sampled_from(["take", "give"]), st.integers(0, 7), st.floats(0.1, 4.0), st.integers(1, 6000),
                  st.integers(0, 3))


@settings(max_examples=300, deadline=None)
@given(st.lists(takes, max_size=60))
def test_budgets_are_never_oversubscribed_whatever_jobs_take_and_give_back(steps) -> None:
    budget = usable(HOST)
    ledger, held = Ledger(budget), {}
    for action, n, cpus, memory_mb, gpus in steps:
        job_id = f"j{n}"
        if action == "give":
            ledger.give_back(job_id)
            held.pop(job_id, None)
        elif job_id not in held and (grant := ledger.try_take(job_id, cpus, memory_mb, gpus)) is not None:
            assert len(grant.gpus) == gpus
            held[job_id] = grant
        devices = [g for grant in held.values() for g in grant.gpus]
        assert sum(g.cpus for g in held.values()) <= budget.cpus + 1e-9
        assert sum(g.memory_mb for g in held.values()) <= budget.memory_mb
        assert len(devices) == len(set(devices)) and set(devices) <= set(budget.gpus)
        free = ledger.free()
        assert free.memory_mb + sum(g.memory_mb for g in held.values()) == budget.memory_mb
        assert sorted(free.gpus + tuple(devices)) == sorted(budget.gpus)


def start_next(ledger: Ledger, queue: FairQueue) -> Waiting | None:
    chosen = queue.next_fitting(ledger)
    if chosen is not None:
        assert ledger.try_take(chosen.job_id, *vars(chosen.request).values()) is not None
        queue.started(chosen)
    return chosen


def test_one_late_job_of_model_b_starts_second_after_ten_of_model_a() -> None:
    ledger, queue = Ledger(Budget(1, 1024)), FairQueue()  # room for one job at a time
    for i in range(10):
        queue.add(job(f"a{i}", "A"))
    queue.add(job("b0", "B"))
    order = []
    while (started := start_next(ledger, queue)) is not None:
        order.append(started.job_id)
        ledger.give_back(started.job_id)
        queue.finished(started)
    assert order[:2] == ["a0", "b0"] and order[2:] == [f"a{i}" for i in range(1, 10)]
    assert len(queue) == 0


def test_a_model_that_runs_jobs_gives_way_to_one_that_runs_none() -> None:
    ledger, queue = Ledger(Budget(4, 4096)), FairQueue()
    for i in range(4):
        queue.add(job(f"a{i}", "A"))
    start_next(ledger, queue)
    start_next(ledger, queue)  # A runs two: nobody else waits
    queue.add(job("c0", "C", benchmark="other"))
    assert start_next(ledger, queue).job_id == "c0"
    assert start_next(ledger, queue).job_id == "a2"


def test_a_job_that_does_not_fit_now_lets_a_smaller_one_by() -> None:
    ledger, queue = Ledger(Budget(4, 4096, ("0",))), FairQueue()
    ledger.try_take("running", 1, 512, 1)
    queue.add(job("gpu", "A", gpus=1))
    queue.add(job("cpu", "B"))
    assert queue.next_fitting(ledger).job_id == "cpu"
    assert queue.remove("gpu").job_id == "gpu" and queue.remove("gpu") is None


async def test_waiting_jobs_start_in_fair_order_as_grants_are_given_back() -> None:
    ledger, queue, wake = Ledger(Budget(1, 1024, ("0",))), FairQueue(), asyncio.Condition()
    jobs = [job("a0", "A", gpus=1), job("a1", "A", gpus=1), job("b0", "B", gpus=1)]
    order: list[str] = []

    async def run(one: Waiting) -> None:
        grant = await acquire(ledger, queue, one, wake)
        order.append(f"{one.job_id}:{','.join(grant.gpus)}")
        await asyncio.sleep(0)
        await release(ledger, queue, one, wake)

    await asyncio.wait_for(asyncio.gather(*(run(one) for one in jobs)), timeout=5)
    assert order == ["a0:0", "b0:0", "a1:0"]
    assert ledger.free() == Budget(1, 1024, ("0",)) and len(queue) == 0


async def test_a_cancelled_wait_leaves_the_queue_and_lets_the_next_job_in() -> None:
    ledger, queue, wake = Ledger(Budget(1, 1024)), FairQueue(), asyncio.Condition()
    holder = job("a0", "A")
    await acquire(ledger, queue, holder, wake)
    blocked = asyncio.create_task(acquire(ledger, queue, job("b0", "B"), wake))
    later = asyncio.create_task(acquire(ledger, queue, job("c0", "C"), wake))
    while len(queue) < 2:
        await asyncio.sleep(0)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert len(queue) == 1
    await release(ledger, queue, holder, wake)
    assert (await asyncio.wait_for(later, timeout=5)).job_id == "c0"


def test_a_job_that_takes_exactly_what_is_left_fits_and_one_more_does_not() -> None:
    ledger = Ledger(Budget(1.3, 1024))
    for i in range(10):
        assert ledger.try_take(f"j{i}", 0.1, 100, 0) is not None  # ten tenths add up to one CPU, not more
    assert ledger.try_take("cpus", 0.301, 24, 0) is None
    assert ledger.try_take("memory", 0.3, 25, 0) is None
    assert ledger.try_take("exact", 0.3, 24, 0) is not None
    assert ledger.free() == Budget(0.0, 0)


async def test_a_waiting_job_that_fits_what_another_start_left_is_not_left_waiting() -> None:
    ledger, queue, wake = Ledger(Budget(3, 3072)), FairQueue(), asyncio.Condition()
    big, c1 = job("big", "X", cpus=2), job("c1", "C")
    await acquire(ledger, queue, big, wake)
    await acquire(ledger, queue, c1, wake)
    c2 = asyncio.create_task(acquire(ledger, queue, job("c2", "C"), wake))  # waits first, but C already runs a job
    b0 = asyncio.create_task(acquire(ledger, queue, job("b0", "B"), wake))
    while len(queue) < 2:
        await asyncio.sleep(0)
    await release(ledger, queue, big, wake)
    assert [grant.job_id for grant in await asyncio.wait_for(asyncio.gather(b0, c2), timeout=5)] == ["b0", "c2"]
