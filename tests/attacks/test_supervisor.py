"""`assay up` as a careless operator meets it: a second one on the same folder, a service killed under it, the
supervisor itself killed with SIGKILL, then started again; SIGTERM and SIGHUP. Nothing is lost, nothing counted
twice, no process is left behind, and each is said."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats

from contracts import subjects
from contracts.signing import KeyPair


def assay(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "assay", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


class Up:
    """One `assay up`, its output read as it comes."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "assay", "--home", str(home), "up"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "COLUMNS": "200"})
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
