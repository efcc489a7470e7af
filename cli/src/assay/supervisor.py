"""The processes of `assay up`: each restarted with backoff when it crashes (and it says so), stopped in order,
and none outliving the supervisor, however it ends (a SIGKILL included, on Linux)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RESTARTS_ALLOWED = 5        # in RESTART_WINDOW_S; a process that crashes more often stops the platform
RESTART_WINDOW_S = 120.0
PR_SET_PDEATHSIG = 1


def private(path: str, flags: int) -> int:
    """Open a log readable by this user only: a site's log may name its cases' files and its datasets."""
    return os.open(path, flags, 0o600)


def die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """Ask the kernel to SIGTERM this child when the supervisor dies, so none is orphaned."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    restartable: bool
    proc: subprocess.Popen[bytes] | None = None
    crashes: list[float] = field(default_factory=list)
    due: float | None = None  # when a crashed child starts again

    def backoff_s(self) -> float:
        return min(2.0 ** (len(self.crashes) - 1), 30.0)


@dataclass
class Supervisor:
    logs: Path
    on_step: Callable[[str], None]
    children: dict[str, Child] = field(default_factory=dict)

    def spawn(self, name: str, argv: list[str], env: dict[str, str], *, restartable: bool = True) -> None:
        child = self.children.setdefault(name, Child(name, argv, env, restartable))
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab", opener=private) as log:  # the child keeps its own descriptor
            child.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                          start_new_session=True, preexec_fn=die_with_parent)
        child.due = None

    def pids(self) -> dict[str, int]:
        return {name: c.proc.pid for name, c in self.children.items() if c.proc is not None and c.proc.poll() is None}

    def watch(self) -> None:
        """Restart what crashed, once its backoff has passed; RuntimeError when something cannot go on."""
        now = time.monotonic()
        for child in self.children.values():
            if child.due is not None:
                if now >= child.due:
                    self.spawn(child.name, child.argv, child.env, restartable=child.restartable)
                    self.on_step(f"{child.name} restarted")
                continue
            code = child.proc.poll() if child.proc is not None else None
            if code is None:
                continue
            if not child.restartable:
                raise RuntimeError(f"{child.name} stopped (exit code {code}); see {self.logs / child.name}.log")
            child.crashes = [t for t in child.crashes if now - t < RESTART_WINDOW_S] + [now]
            if len(child.crashes) > RESTARTS_ALLOWED:
                raise RuntimeError(f"{child.name} crashed {len(child.crashes)} times in {RESTART_WINDOW_S:.0f} s "
                                   f"(last exit code {code}); see {self.logs / child.name}.log")
            child.due = now + child.backoff_s()
            self.on_step(f"{child.name} exited with code {code}; restarting it in {child.backoff_s():.0f} s "
                         f"(see {self.logs / child.name}.log)")

    def stop(self, names: list[str], timeout_s: float) -> None:
        """SIGTERM `names` together (they drain and close), then SIGKILL what still runs after `timeout_s`."""
        running = [c.proc for n in names if (c := self.children.get(n)) and c.proc and c.proc.poll() is None]
        for name in names:
            if name in self.children:
                self.children[name].due = None
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        for proc in running:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def reap(pids: dict[str, int], timeout_s: float = 10.0) -> list[str]:
    """Stop the processes a killed supervisor left running (by the pids it recorded); the names it stopped."""
    stopped = []
    for name, pid in pids.items():
        if not _is_assay_process(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        stopped.append(name)
    deadline = time.monotonic() + timeout_s
    for name in stopped:
        while _is_assay_process(pids[name]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _is_assay_process(pids[name]):
            os.kill(pids[name], signal.SIGKILL)
    return stopped


def _is_assay_process(pid: int) -> bool:
    """Whether `pid` still runs a process of ours (a recycled pid is left alone)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"assay.serve" in cmdline or b"nats-server" in cmdline
