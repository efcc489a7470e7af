"""`assay up` as a careless operator meets it: a second one on the same folder, a service killed under it, the
supervisor itself killed with SIGKILL, then started again; SIGTERM and SIGHUP. Nothing is lost, nothing counted
twice, no process is left behind, and each is said."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from contracts import subjects
from contracts.signing import KeyPair


def assay(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "assay", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


class Up:
    """One `assay up`, its output read as it comes."""

    def __init__(self, home: Path, **env: str) -> None:
        self.home = home
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "assay", "--home", str(home), "up"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "COLUMNS": "200", **env})
        self.lines: list[str] = []

    def until(self, text: str, timeout_s: float = 90) -> None:
        """Read its output until a line holds `text` (the supervisor says what it does)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"`assay up` never said {text!r}:\n{''.join(self.lines)}")

    def pids(self) -> dict[str, int]:
        return dict(json.loads((self.home / "platform.json").read_text())["pids"])


def alive(pid: int) -> bool:
    try:
        return b"zombie" not in Path(f"/proc/{pid}/status").read_bytes().lower()
    except OSError:
        return False


def gone(pids: dict[str, int], timeout_s: float = 20) -> list[str]:
    """The names of `pids` still running after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(pid) for pid in pids.values()):
        time.sleep(0.1)
    return [name for name, pid in pids.items() if alive(pid)]


def events_of(home: Path, subject: str) -> list[dict[str, object]]:
    async def read() -> list[dict[str, object]]:
        nc = await nats.connect(json.loads((home / "platform.json").read_text())["admin_url"])
        js = nc.jetstream()
        info = await js.stream_info(subjects.EVENTS_STREAM)
        found = []
        for seq in range(max(info.state.first_seq, 1), info.state.last_seq + 1) if info.state.messages else ():
            msg = await js.get_msg(subjects.EVENTS_STREAM, seq)
            if msg.subject == subject:
                found.append(json.loads(msg.data or b"{}"))
        await nc.close()
        return found

    return asyncio.run(read())


def test_a_platform_survives_its_operator(tmp_path: Path) -> None:
    for name in ("operator", "vendor", "owner"):
        KeyPair.generate().save(tmp_path / "keys" / f"{name}.key")
    first = Up(tmp_path)
    try:
        first.until("Assay is up")
        assert assay(tmp_path, "actor", "register", "vendor", "--role", "model_owner", "--as", "operator").returncode == 0

        second = assay(tmp_path, "up")
        assert second.returncode == 1 and "a platform already runs on" in second.stderr, second.stderr

        registry = first.pids()["registry"]
        os.kill(registry, signal.SIGKILL)
        first.until("registry exited with code -9; restarting it")
        first.until("registry restarted")
        registered = assay(tmp_path, "actor", "register", "owner", "--role", "benchmark_owner", "--as", "operator")
        assert registered.returncode == 0, registered.stderr

        children = first.pids()
        first.proc.kill()  # SIGKILL: no handler runs, no cleanup
        first.proc.wait()
        assert gone(children) == [], "no process outlives the supervisor"
    finally:
        first.proc.kill()

    again = Up(tmp_path)
    try:
        again.until("Assay is up")
        known = assay(tmp_path, "actor", "register", "vendor", "--role", "model_owner", "--as", "operator")
        assert known.returncode == 0 and "already registered" in known.stdout  # nothing lost
        enrolled = [e["data"]["actor_id"] for e in events_of(tmp_path, subjects.evt("actor", "registered"))]
        assert sorted(enrolled) == ["operator", "owner", "vendor"]  # each once: nothing counted twice
        children = again.pids()
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(60) == 0
        assert gone(children) == []
    finally:
        again.proc.kill()


def wait_for(what: Callable[[], int], at_least: int, timeout_s: float = 300) -> int:
    deadline = time.monotonic() + timeout_s
    while (found := what()) < at_least:
        assert time.monotonic() < deadline, f"only {found} of {at_least} after {timeout_s:.0f} s"
        time.sleep(0.05)
    return found


@pytest.mark.docker
def test_a_whole_benchmark_run_survives_a_killed_service_and_a_killed_supervisor(tmp_path: Path,
                                                                                 docker_client: Any) -> None:
    """The demo's benchmark (3 models x 3 hospitals, real containers) through `assay up`: the scheduler is killed
    while the hospitals join, and the supervisor with SIGKILL once the first result is in; started again, every
    job is run and counted exactly once, the results a hospital held for review when it was killed too."""
    from rich.console import Console

    from assay.demo.build import build_demo_images
    from assay.demo.run import MODEL_OWNERS, REVIEWING, SITES, STEPS, make_keys
    from assay.home import Home

    home, quiet = Home(tmp_path), Console(file=io.StringIO(), width=200)
    build_demo_images(docker_client, tmp_path / "build")
    make_keys(quiet, home)
    expected = len(MODEL_OWNERS) * len(SITES)
    fast = {"ASSAY_SITE_ACK_WAIT_S": "5", "ASSAY_SITE_HEARTBEAT_S": "1"}  # a job the crash cut short comes back soon

    def accepted() -> list[dict[str, Any]]:
        return events_of(tmp_path, subjects.evt("result", "accepted"))

    first = Up(tmp_path, **fast)
    try:
        first.until("Assay is up")
        *setup, (_, join_datasets) = STEPS
        for _, step in setup:
            step(quiet, home)
        os.kill(first.pids()["scheduling"], signal.SIGKILL)
        first.until("scheduling restarted")
        join_datasets(quiet, home)  # the restarted scheduler plans every job from here
        before = wait_for(lambda: len(accepted()), 1)  # at least this many were in when it was killed
        children = first.pids()
        first.proc.kill()
        first.proc.wait()
        assert gone(children) == []
    finally:
        first.proc.kill()

    def approved_and_accepted() -> int:
        """What REVIEWING's data owner approves as it comes (held results survived the kill), and what is in."""
        assert assay(tmp_path, "results", "approve", "--all", "--yes", "--site", REVIEWING).returncode == 0
        return len(accepted())

    again = Up(tmp_path, **fast)
    try:
        again.until("Assay is up")
        wait_for(approved_and_accepted, expected)
        board = assay(tmp_path, "leaderboard", "show", "breast-cancer-dx", "--as", "committee")
        time.sleep(2)  # anything that would be counted twice has had its chance
        results = accepted()
        jobs = events_of(tmp_path, subjects.job_evt("scheduled", subjects.EVALUATION))  # not the checks' jobs
    finally:
        again.proc.send_signal(signal.SIGINT)
        again.proc.wait(60)

    print(f"\n{before} of {expected} results were in when the supervisor was killed")
    assert before < expected, "the supervisor was killed after the run, not during it"
    assert sorted(r["data"]["job_id"] for r in results) == sorted(j["data"]["job"]["job_id"] for j in jobs)
    assert len(results) == len(jobs) == expected  # every job planned once, run, and counted once
    assert board.returncode == 0 and all(site in board.stdout for site in SITES), board.stdout + board.stderr


def test_sighup_stops_the_platform_as_ctrl_c_does(tmp_path: Path) -> None:
    KeyPair.generate().save(tmp_path / "keys" / "operator.key")
    up = Up(tmp_path)
    try:
        up.until("Assay is up")
        children = up.pids()
        up.proc.send_signal(signal.SIGHUP)
        assert up.proc.wait(60) == 0
        assert gone(children) == [] and not (tmp_path / "platform.json").exists()
    finally:
        up.proc.kill()
    for name in ("registry", "approval", "scheduling", "leaderboard"):
        assert "shut down gracefully" in (tmp_path / "logs" / f"{name}.log").read_text(), name
