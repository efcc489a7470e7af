"""Models that attack the sandbox on purpose, run through DockerRunner on a real engine.

Each must be contained, reported with the failure it is and words a person understands, and leave nothing behind:
no container, an unchanged dataset, a bounded log. The limits are small so that the whole file runs in seconds.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from site_worker.containers import LOG_TAIL_BYTES, DockerRunner, Failure, Limits, Mount, RunOutcome, RunSpec
from site_worker.datasets import content_hash
from site_worker.watch import forks_refused, measure, pids_events_file
from tests.support.hostile import build_hostile_images

pytestmark = pytest.mark.docker

LIMITS = Limits(memory="128m", nano_cpus=1_000_000_000, pids=32, timeout_s=3, output_bytes=10 << 20,
                output_files=1000)
LOG_ON_DISK = 2 * (1 << 20) + (64 << 10)  # two json-file logs of 1 MiB, each may pass it by one 16 KiB entry
FEATURES = "case_id,age,size\nc1,61,2.5\nc2,47,1.0\nc3,70,3.25\n"


@dataclass(frozen=True)
class Site:
    data: Path
    labels: Path
    out: Path
    hash: str

    def spec(self, image: str, limits: Limits = LIMITS, **env: str) -> RunSpec:
        mounts = (Mount(self.data, "/assay/data"), Mount(self.out, "/assay/out", writable=True))
        return RunSpec(image, "infer", mounts, env=env, limits=limits)


@pytest.fixture(scope="module")
def images(docker_client: docker.DockerClient) -> dict[str, str]:
    return build_hostile_images(docker_client)


@pytest.fixture
def worker() -> str:
    return f"hostile-test/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def runner(docker_client: docker.DockerClient, worker: str) -> DockerRunner:
    return DockerRunner(docker_client, worker=worker)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """A dataset whose files anyone may write: only the read-only mount keeps a model from changing them."""
    data, labels, out = tmp_path / "data", tmp_path / "labels", tmp_path / "out"
    for folder in (data, labels, out):
        folder.mkdir()
    (data / "features.csv").write_text(FEATURES)
    (labels / "labels.csv").write_text("case_id,label\nc1,1\nc2,0\nc3,1\n")
    for path in (tmp_path, data, labels):
        path.chmod(0o777)
    for path in (data / "features.csv", labels / "labels.csv"):
        path.chmod(0o666)
    yield Site(data, labels, out, content_hash(data, labels))
    shutil.rmtree(out, ignore_errors=True)  # what the output attacks left may be hundreds of MiB


def containers_of(client: docker.DockerClient, worker: str) -> list:
    # ignore_removed: a container listed and gone before it is inspected (the runner removes its own) is not an error
    return client.containers.list(all=True, filters={"label": f"assay.worker={worker}"}, ignore_removed=True)


def assert_left_nothing(client: docker.DockerClient, worker: str, site: Site) -> None:
    assert containers_of(client, worker) == []
    assert content_hash(site.data, site.labels) == site.hash
    assert sorted(p.name for p in site.data.iterdir()) == ["features.csv"]


def in_background(run: Callable[[], RunOutcome]) -> tuple[threading.Thread, list[RunOutcome]]:
    outcomes: list[RunOutcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(run()), daemon=True)
    thread.start()
    return thread, outcomes


def wait_for(condition: Callable[[], object], what: str, within_s: float = 60) -> object:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    pytest.fail(f"{what} did not happen within {within_s} s")


def running(client: docker.DockerClient, worker: str):
    found = [c for c in containers_of(client, worker) if c.status == "running"]
    return found[0] if found else None


def host_ipv4() -> list[str]:
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
    except OSError:
        return []
    return sorted({info[4][0] for info in infos} - {"127.0.0.1"})


def test_a_model_reaches_no_network_not_even_the_hosts_nats(docker_client, runner, worker, images, site, nats_url):
    nats_port = int(nats_url.rpartition(":")[2])
    socket.create_connection(("127.0.0.1", nats_port), timeout=5).close()  # it is there, for the host
    with socket.create_server(("0.0.0.0", 0)) as listener:
        port = listener.getsockname()[1]
        targets = [f"127.0.0.1:{nats_port}", *(f"{ip}:{port}" for ip in host_ipv4())]

        outcome = runner.run(site.spec(images["network"], PROBE_TARGETS=",".join(targets)))

    assert outcome.ok, outcome.log_tail
    assert "0 escaped" in outcome.log_tail and "ESCAPED" not in outcome.log_tail
    assert f"contained tcp 127.0.0.1:{nats_port}" in outcome.log_tail
    assert "contained dns example.org" in outcome.log_tail
    assert_left_nothing(docker_client, worker, site)


def test_a_model_cannot_change_its_input_nor_its_image(docker_client, runner, worker, images, site):
    outcome = runner.run(site.spec(images["write_input"]))

    assert outcome.ok, outcome.log_tail
    assert "0 escaped" in outcome.log_tail and "ESCAPED" not in outcome.log_tail
    assert "contained append to an input file: OSError: [Errno 30] Read-only file system" in outcome.log_tail
    assert_left_nothing(docker_client, worker, site)
    assert not (site.out / "linked").exists()


def test_every_escape_a_model_tries_is_shut(docker_client, runner, worker, images, site):
    outcome = runner.run(site.spec(images["escape_probe"]))

    print(outcome.log_tail)
    assert outcome.ok, outcome.log_tail
    assert "0 escaped" in outcome.log_tail and "ESCAPED" not in outcome.log_tail
    for door in ("docker socket", "unshare a user namespace", "setns into pid 1's mount namespace",
                 "write cgroup limits", "write /proc/sys/kernel/core_pattern", "write /sys/kernel/uevent_helper",
                 "capabilities and privileges", "writable host-backed mounts"):
        assert f"contained {door}:" in outcome.log_tail
    assert_left_nothing(docker_client, worker, site)


class HostLoad:
    """Samples the host while a container misbehaves: load average, processes, CPU busy (of all cores)."""

    def __init__(self) -> None:
        self.load_before, self.procs_before = os.getloadavg()[0], self._procs()
        self.load_peak, self.procs_peak = self.load_before, self.procs_before
        self._busy_before = self._cpu()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> str:
        self._stop.set()
        self._thread.join()
        busy, total = (a - b for a, b in zip(self._cpu(), self._busy_before))
        return (f"load average {self.load_before:.2f} -> peak {self.load_peak:.2f}, host processes "
                f"{self.procs_before} -> peak {self.procs_peak}, CPU busy {100 * busy / max(total, 1):.0f}% of "
                f"{os.cpu_count()} cores")

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.load_peak = max(self.load_peak, os.getloadavg()[0])
            self.procs_peak = max(self.procs_peak, self._procs())

    @staticmethod
    def _procs() -> int:
        return sum(1 for name in os.listdir("/proc") if name.isdigit())

    @staticmethod
    def _cpu() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)


def test_a_fork_bomb_is_reported_as_such_and_the_host_keeps_working(docker_client, runner, worker, images, site,
                                                                    tmp_path):
    host = HostLoad()
    bomb, outcomes = in_background(lambda: runner.run(site.spec(images["fork_bomb"], Limits(
        memory="256m", nano_cpus=1_000_000_000, pids=32, timeout_s=5))))
    container = wait_for(lambda: running(docker_client, worker), "the fork bomb's start")
    events = pids_events_file(container.attrs["State"]["Pid"])
    if events is not None:
        wait_for(lambda: (forks_refused(events) or 0) > 0, "a fork refused at the pids limit")
    benign_out = tmp_path / "benign-out"
    benign_out.mkdir()
    benign = runner.run(RunSpec(images["benign"], "infer", (
        Mount(site.data, "/assay/data"), Mount(benign_out, "/assay/out", writable=True)), limits=Limits(timeout_s=60)))
    bombing_still = bomb.is_alive()
    refused = forks_refused(events) if events is not None else None
    bomb.join()
    print(f"fork bomb: {host.stop()}; forks refused {refused}; benign job done while it bombed: {bombing_still}")

    outcome = outcomes[0]
    assert outcome.failure is Failure.TOO_MANY_PROCESSES and outcome.recurs and not outcome.ok
    assert outcome.why.startswith("reached its limit of 32 processes"), outcome.why
    assert benign.ok, benign.log_tail
    assert (benign_out / "predictions.csv").read_text().splitlines()[0] == "case_id,score"
    assert_left_nothing(docker_client, worker, site)


def test_a_model_over_its_memory_is_reported_out_of_memory(docker_client, runner, worker, images, site):
    outcome = runner.run(site.spec(images["memory_hog"]))

    assert outcome.failure is Failure.OUT_OF_MEMORY and outcome.oom_killed and outcome.recurs
    assert outcome.why == "killed for exceeding its memory limit of 128m"
    assert_left_nothing(docker_client, worker, site)


def test_a_model_that_ignores_sigterm_and_hangs_is_killed_at_its_timeout(docker_client, runner, worker, images, site):
    outcome = runner.run(site.spec(images["ignore_sigterm_hang"], Limits(timeout_s=2)))

    assert outcome.failure is Failure.TIMED_OUT and outcome.timed_out and outcome.recurs
    assert outcome.why == "timed out after 2 s"
    assert outcome.exit_code == 137  # SIGKILL: the one signal it cannot ignore
    assert "ignoring SIGTERM" in outcome.log_tail
    assert_left_nothing(docker_client, worker, site)


def test_a_log_flood_stays_capped_on_disk_and_in_the_tail(docker_client, runner, worker, images, site):
    flood, outcomes = in_background(lambda: runner.run(site.spec(images["log_flood"], Limits(timeout_s=4))))
    container = wait_for(lambda: running(docker_client, worker), "the flood's start")
    log_path, peak = Path(container.attrs["LogPath"]), 0
    while flood.is_alive():  # the log the engine writes, and the one it rotated away
        peak = max(peak, sum(_size(path) for path in (log_path, log_path.with_name(log_path.name + ".1"))))
        time.sleep(0.02)
    flooded_mib = int((site.out / "flooded").read_text())
    print(f"log flood: printed at least {flooded_mib} MiB; the engine's log files peaked at {peak} bytes")

    outcome = outcomes[0]
    assert outcome.failure is Failure.TIMED_OUT
    assert len(outcome.log_tail.encode()) <= LOG_TAIL_BYTES
    assert flooded_mib >= 16 and 0 < peak <= LOG_ON_DISK
    assert_left_nothing(docker_client, worker, site)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def test_junk_within_the_output_limits_is_kept_and_sealed(docker_client, runner, worker, images, site):
    limits = Limits(timeout_s=30, output_bytes=64 << 20, output_files=5000)

    outcome = runner.run(site.spec(images["junk_files"], limits, JUNK_MIB="50", JUNK_FILES="1000"))

    assert outcome.ok, outcome.log_tail
    written = measure([site.out], limits.output_bytes, limits.output_files)
    assert 50 << 20 <= written.bytes <= limits.output_bytes and 1000 < written.files <= limits.output_files
    modes = {p.lstat().st_mode & 0o777 for p in site.out.rglob("*") if not p.is_symlink()}
    assert modes <= {0o600, 0o700}
    assert (site.out / "passwd").is_symlink() and Path("/etc/passwd").stat().st_mode & 0o777 == 0o644
    assert_left_nothing(docker_client, worker, site)


def test_one_file_past_the_output_limit_is_refused_by_the_kernel(docker_client, runner, worker, images, site):
    outcome = runner.run(site.spec(images["huge_output"], Limits(timeout_s=10, output_bytes=10 << 20)))

    assert outcome.failure is Failure.OUTPUT_TOO_LARGE and outcome.recurs and not outcome.timed_out
    assert outcome.why == "wrote more than 10 MiB to /assay/out"
    assert "File too large" in outcome.log_tail
    assert (site.out / "huge-0.bin").stat().st_size == (10 << 20) + 1  # the file size limit, one byte over
    assert_left_nothing(docker_client, worker, site)


def test_output_spread_over_many_files_is_stopped_while_the_model_runs(docker_client, runner, worker, images, site):
    limits = Limits(timeout_s=20, output_bytes=10 << 20)

    outcome = runner.run(site.spec(images["huge_output"], limits, HUGE_FILES="64", HUGE_MIB="512"))

    written = measure([site.out], 1 << 40, 1 << 40)
    print(f"spread output: killed with {written.bytes / (1 << 20):.0f} MiB in {written.files} files written "
          f"(limit {limits.output_bytes >> 20} MiB)")
    assert outcome.failure is Failure.OUTPUT_TOO_LARGE and not outcome.timed_out  # the watch killed it, not the clock
    assert outcome.exit_code == 137
    assert outcome.why == "wrote more than 10 MiB to /assay/out"
    assert_left_nothing(docker_client, worker, site)


def test_too_many_files_are_stopped_while_the_model_runs(docker_client, runner, worker, images, site):
    outcome = runner.run(site.spec(images["too_many_files"], Limits(timeout_s=20, output_files=1000)))

    written = measure([site.out], 1 << 40, 1 << 40)
    print(f"too many files: killed with {written.files} entries written (limit 1,000)")
    assert outcome.failure is Failure.TOO_MANY_FILES and outcome.recurs and not outcome.timed_out
    assert outcome.why == "wrote more than 1,000 files to /assay/out"
    assert_left_nothing(docker_client, worker, site)


@pytest.mark.parametrize(("behaviour", "expected_header"), [
    ("leaky_columns", "case_id,score,age,size"),
    ("not_numbers", "case_id,score"),
])
def test_predictions_that_leak_or_are_no_numbers_run_cleanly_for_the_evaluator_to_refuse(
        docker_client, runner, worker, images, site, behaviour, expected_header):
    outcome = runner.run(site.spec(images[behaviour]))

    assert outcome.ok, outcome.log_tail
    lines = (site.out / "predictions.csv").read_text().splitlines()
    assert lines[0] == expected_header and len(lines) == 4
    assert_left_nothing(docker_client, worker, site)
