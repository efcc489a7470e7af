"""The compose deployment: its files agree with each other and with `assay up`, docker-compose accepts them, and the
NATS and PostgreSQL configuration they mount enforces DESIGN.md "Trust" on a real nats-server and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
import yaml

from assay.home import Home
from assay.roster import public_of
from assay.platform import SERVICES, Platform, nats_server_binary
from contracts import subjects
from contracts.catalog import EVENT_SUBJECTS, REQUEST_SUBJECTS
from contracts.envelope import Envelope
from contracts.messages import ApproveBenchmark, DeadLetter, GetBenchmark, ShowLeaderboard
from contracts.signing import KeyPair
from contracts.streams import ensure_streams

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
NATS_CONF = COMPOSE / "nats" / "nats.conf"
SITE = "hospital-a"  # the worked example of nats.conf and site.env.example
SITE_DURABLE = subjects.durable(f"site-{SITE}", subjects.jobs(SITE))  # as the site worker names its consumer
_REF = re.compile(r"\$\{(?P<name>\w+)(?P<op>:?[-?])?(?P<arg>[^}]*)\}")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / name).read_text())


def env_file(name: str) -> dict[str, str]:
    lines = (COMPOSE / name).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`; a required variable that is missing raises."""
    def one(ref: re.Match[str]) -> str:
        value, op = env.get(ref["name"]), ref["op"] or ""
        if value is None or (op.startswith(":") and not value):
            if op.endswith("?"):
                raise KeyError(f"{ref['name']} is required: {ref['arg']}")
            return ref["arg"] if op else ""
        return value
    return _REF.sub(one, text)


def environment(service: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    return {key: interpolate(str(value), env) for key, value in service.get("environment", {}).items()}


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    else:
        yield str(node)


def required_variables(name: str) -> set[str]:
    """The variables a compose file reads without a default."""
    return {ref["name"] for text in strings(load(name)) for ref in _REF.finditer(text)
            if not (ref["op"] or "").endswith("-")}


def platform_environment(tmp_path: Path) -> Platform:
    """`assay up`'s Platform, with the keys it reads: the source of truth for what each process needs."""
    home = Home(tmp_path / "home")
    for name in ("operator", *SERVICES, SITE):
        KeyPair.generate().save(home.key_file(name))
    return Platform(home, nats_url="nats://127.0.0.1:4222")


CENTRAL, SITE_FILE = load("central.yml"), load("site.yml")


# --- the files, statically ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["central.yml", "site.yml"])
def test_every_service_named_in_depends_on_exists_in_the_same_file(name: str) -> None:
    services = load(name)["services"]
    for service, spec in services.items():
        needs = spec.get("depends_on", [])
        assert set(needs) <= set(services), f"{service} depends on {set(needs) - set(services)}, not in {name}"


def test_every_service_gets_the_environment_assay_up_gives_it_plus_a_collector(tmp_path: Path) -> None:
    platform = platform_environment(tmp_path)
    env = env_file(".env.example")
    for name in SERVICES:
        service = CENTRAL["services"][name]
        assert service["command"] == [name]
        given = environment(service, env)
        prefix = f"ASSAY_{name.upper()}_"
        assert set(platform.service_env(name)) | {prefix + "OTLP_ENDPOINT"} <= set(given), name
        assert given[prefix + "DATABASE_URL"].startswith("postgresql+asyncpg://")
        database = urlsplit(given[prefix + "DATABASE_URL"])
        assert (database.username, database.path) == (name, f"/{name}"), "each service its own role and database"
        assert given[prefix + "NATS_CREDS"] == f"/run/secrets/{name}_nats", "each service its own NATS key"
        assert CENTRAL["secrets"][f"{name}_nats"]["file"] == f"./secrets/nats-{name}.nk", "`assay bus init` puts it"
        assert urlsplit(given[prefix + "NATS_URL"]).password is None, "no NATS password"
        assert given[prefix + "OTLP_ENDPOINT"] == "http://otel-collector:4318"


def test_the_site_worker_gets_the_environment_assay_up_gives_it(tmp_path: Path) -> None:
    worker = SITE_FILE["services"]["worker"]
    assert worker["command"] == ["site"]
    given = environment(worker, env_file("site.env.example"))
    assert set(platform_environment(tmp_path).site_env(SITE)) <= set(given)
    assert urlsplit(given["ASSAY_SITE_NATS_URL"]).username is None, "no NATS password: its own nkey"
    assert given["ASSAY_SITE_NATS_CREDS"] == "/run/secrets/site_nats"
    mounts = {volume.split(":")[1]: volume for volume in (interpolate(v, env_file("site.env.example"))
                                                         for v in worker["volumes"])}
    assert mounts[str(Path(given["ASSAY_SITE_DATASETS_FILE"]).parent)].endswith(":ro"), "datasets are read-only"
    assert given["ASSAY_SITE_WORK_DIR"] in mounts and "/var/run/docker.sock" in mounts
    assert worker["secrets"] == ["site_key", "site_nats"]
    assert given["ASSAY_SITE_KEY_FILE"] == "/run/secrets/site_key"


def test_every_assay_container_runs_an_image_of_the_one_dockerfile_with_its_extras_as_a_non_root_user() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", dockerfile, re.M)
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    assert re.findall(r"^USER (\S+)", dockerfile, re.M)[-1] not in ("root", "0")
    assert json.loads(re.findall(r"^ENTRYPOINT (.+)$", dockerfile, re.M)[-1]) == ["python", "-m", "assay.serve"]
    for source in re.findall(r"^COPY (?!--from)(\S+) ", dockerfile, re.M):
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"
    assay = {**{n: CENTRAL["services"][n] for n in [*SERVICES, "provision"]}, "site": SITE_FILE["services"]["worker"]}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, spec in assay.items():
        build = spec["build"]
        assert (build["context"], build["dockerfile"]) == ("..", "compose/Dockerfile"), name
        wanted = "site" if name == "site" else "central"
        assert build["args"]["ASSAY_EXTRAS"] == wanted and wanted in extras, name
        assert spec.get("user") is None, f"{name} must keep the image's non-root user"
    assert SITE_FILE["services"]["worker"]["build"]["args"]["ASSAY_MODULES"] == "site_worker.main"
    assert re.search(r"^ARG ASSAY_EXTRAS=central$", dockerfile, re.M) and 'pip install ".[${ASSAY_EXTRAS}]"' in dockerfile
    assert assay["provision"]["entrypoint"] == ["assay", "provision"]
    assert assay["provision"]["environment"]["ASSAY_NATS_CREDS"] == "/run/secrets/provision_nats"
    for name in SERVICES:
        assert CENTRAL["services"][name]["depends_on"]["provision"] == {"condition": "service_completed_successfully"}


@pytest.mark.parametrize("name", ["central.yml", "site.yml"])
def test_every_file_a_container_mounts_from_the_repository_exists(name: str) -> None:
    for service, spec in load(name)["services"].items():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{service} mounts {source}, which does not exist"


def test_every_variable_the_compose_files_require_is_in_their_example_env_file() -> None:
    assert required_variables("central.yml") <= set(env_file(".env.example"))
    assert required_variables("site.yml") <= set(env_file("site.env.example"))
    assert "password" not in NATS_CONF.read_text().lower().replace("no password", ""), "nkeys only"
    assert "environment" not in CENTRAL["services"]["nats"], "the server needs no secret: it knows public keys only"


def test_every_image_is_pinned_and_each_site_is_a_compose_project_of_its_own() -> None:
    for name in ("central.yml", "site.yml"):
        for service, spec in load(name)["services"].items():
            image = re.sub(r"\$\{\w+:-([^}]+)\}", r"\1", spec["image"])  # the default the file names
            assert ":" in image and not image.endswith((":latest", ":dev")) or image.startswith("assay-"), (
                f"{name}: {service} runs {image}, not a pinned version")
    central, site = env_file(".env.example")["COMPOSE_PROJECT_NAME"], env_file("site.env.example")
    assert central == "assay-central" and site["COMPOSE_PROJECT_NAME"] == f"assay-site-{site['ASSAY_SITE_ID']}"
    published = CENTRAL["services"]["nats"]["ports"]
    assert published == ["${NATS_BIND:-127.0.0.1}:${NATS_PORT:-4222}:4222"], "NATS on this host only by default"


def test_every_long_running_service_and_the_site_worker_have_a_health_check_on_the_file_they_write() -> None:
    running = {name: spec for name, spec in CENTRAL["services"].items() if name in SERVICES}
    running["site worker"] = load("site.yml")["services"]["worker"]
    for name, spec in running.items():
        [alive_file] = [v for k, v in spec["environment"].items() if k.endswith("_ALIVE_FILE")]
        assert spec["healthcheck"]["test"][:3] == ["CMD", "assay", "alive"], name
        assert spec["healthcheck"]["test"][3] == alive_file and alive_file.startswith("/tmp/"), name  # tmpfs


def test_no_password_is_written_into_the_compose_files() -> None:
    for name in ("central.yml", "site.yml"):
        for service, spec in load(name)["services"].items():
            for key, value in spec.get("environment", {}).items():
                if "PASSWORD" in key:
                    assert str(value).startswith("${"), f"{service}.{key} must come from the env file"
                password = urlsplit(str(value)).password if "://" in str(value) else None
                assert password is None or password.startswith("${"), f"{service}.{key} embeds a password"
    for name in (".env.example", "site.env.example"):
        for key, value in env_file(name).items():
            if "PASSWORD" in key:
                assert value.startswith("local-dev-"), f"{name}: {key} must be a named local-dev placeholder"
    assert {".env", "site.env", "secrets/"} <= set((COMPOSE / ".gitignore").read_text().split())


def test_the_observability_configuration_agrees_with_the_compose_file() -> None:
    obs = ROOT / "observability"
    collector = yaml.safe_load((obs / "otel-collector.yaml").read_text())
    tempo = yaml.safe_load((obs / "tempo.yaml").read_text())
    datasource = yaml.safe_load((obs / "grafana/provisioning/datasources/tempo.yaml").read_text())["datasources"][0]
    provider = yaml.safe_load((obs / "grafana/provisioning/dashboards/assay.yaml").read_text())["providers"][0]
    dashboard = json.loads((obs / "grafana/dashboards/assay.json").read_text())

    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    exporter = collector["exporters"][collector["service"]["pipelines"]["traces"]["exporters"][0]]
    host, port = exporter["endpoint"].split(":")
    assert host in CENTRAL["services"]
    assert tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(f":{port}")
    assert datasource["url"] == f"http://tempo:{tempo['server']['http_listen_port']}"
    grafana_mounts = dict(v.split(":")[:2] for v in CENTRAL["services"]["grafana"]["volumes"])
    assert grafana_mounts["../observability/grafana/dashboards"] == provider["options"]["path"]
    panels = dashboard["panels"]
    assert {p["datasource"]["uid"] for p in panels} == {datasource["uid"]}
    assert any(p["targets"][0]["query"] == "$traceql" for p in panels), "a TraceQL search panel"
    assert any(p.get("repeat") == "service" for p in panels), "traces per service"
    services = next(v for v in dashboard["templating"]["list"] if v["name"] == "service")["query"].split(",")
    assert set(SERVICES) | {f"site-worker-{SITE}"} <= set(services)
    # every span attribute a query names is one the code sets (service_kit.spans, site_worker.containers)
    from service_kit.spans import DOMAIN

    emitted = {f"assay.{name}" for name in (*DOMAIN, "message_id", "message_type", "outcome", "task", "image",
                                            "exit_code")}
    queried = set(re.findall(r"span\.(assay\.\w+)", json.dumps(dashboard)))
    assert queried and queried <= emitted, queried - emitted
    assert any("span.assay.job_id" in p["targets"][0]["query"] for p in panels), "a job's spans, by its id"
    # the metrics: OTLP in, served on the collector's prometheus exporter, scraped by the Prometheus Grafana reads
    prometheus = yaml.safe_load((obs / "prometheus.yaml").read_text())
    metrics_source = yaml.safe_load((obs / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert collector["service"]["pipelines"]["metrics"]["exporters"] == ["prometheus"]
    served = collector["exporters"]["prometheus"]["endpoint"].split(":")[-1]
    [target] = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target == f"otel-collector:{served}"
    mounts = dict(v.split(":")[:2] for v in CENTRAL["services"]["prometheus"]["volumes"])
    assert mounts["../observability/prometheus.yaml"] == "/etc/prometheus/prometheus.yaml"
    host = urlsplit(metrics_source["datasources"][0]["url"]).hostname
    assert host in CENTRAL["services"] and "prometheus" in CENTRAL["services"]["grafana"]["depends_on"]
    metrics_dashboard = json.loads((obs / "grafana/dashboards/assay-metrics.json").read_text())
    uids = {p["datasource"]["uid"] for p in metrics_dashboard["panels"] if "datasource" in p}
    assert uids == {metrics_source["datasources"][0]["uid"]}


@pytest.mark.parametrize(("name", "env"), [("central.yml", ".env.example"), ("site.yml", "site.env.example")])
def test_docker_compose_accepts_the_file(name: str, env: str) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    done = subprocess.run([binary, "--env-file", str(COMPOSE / env), "-f", str(COMPOSE / name), "config", "-q"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("files", "env"), [(["central.yml", "telemetry-from-sites.yml"], ".env.example"),
                                            (["site.yml", "site-telemetry.yml"], "site.env.example")])
def test_docker_compose_accepts_the_telemetry_overrides(files: list[str], env: str) -> None:
    binary = shutil.which("docker-compose")
    assert binary is not None, "docker-compose is not installed (apt-get install docker-compose)"
    chosen = [arg for name in files for arg in ("-f", str(COMPOSE / name))]
    done = subprocess.run([binary, "--env-file", str(COMPOSE / env), *chosen, "config", "-q"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "ASSAY_TELEMETRY_TLS_DIR": "/tmp",
                                                    "ASSAY_SITE_OTLP_ENDPOINT": "https://central:4319"})
    assert done.returncode == 0, done.stderr


def test_the_sites_telemetry_endpoint_takes_only_senders_with_a_certificate_from_the_sites_ca() -> None:
    obs = ROOT / "observability"
    sites = yaml.safe_load((obs / "otel-collector-sites.yaml").read_text())
    http = sites["receivers"]["otlp/sites"]["protocols"]["http"]
    assert set(http["tls"]) == {"cert_file", "key_file", "client_ca_file"}, "mutual TLS, nothing weaker"
    override = load("telemetry-from-sites.yml")["services"]["otel-collector"]
    mounted = {target: source for source, target, _mode in (v.rsplit(":", 2) for v in override["volumes"])}
    assert mounted["/etc/otelcol/sites.yaml"] == "../observability/otel-collector-sites.yaml"
    assert {str(Path(f).parent) for f in http["tls"].values()} == {"/etc/otelcol/tls"} <= set(mounted)
    assert override["command"][-1] == "--config=/etc/otelcol/sites.yaml"
    assert any(p.endswith(f":{http['endpoint'].split(':')[1]}:4319") for p in override["ports"])
    for pipeline in ("traces", "metrics"):
        assert "otlp/sites" in sites["service"]["pipelines"][pipeline]["receivers"]
    worker = load("site-telemetry.yml")["services"]["worker"]["environment"]
    from site_worker.config import Settings as SiteSettings

    fields = {f"ASSAY_SITE_{name.upper()}" for name in SiteSettings.model_fields}
    assert set(worker) <= fields and {"ASSAY_SITE_OTLP_CERT", "ASSAY_SITE_OTLP_KEY", "ASSAY_SITE_OTLP_CA"} <= set(worker)
    assert "ASSAY_SITE_OTLP_CERT" not in SITE_FILE["services"]["worker"]["environment"], "the default sends nothing"


def test_jetstream_fsyncs_every_write_to_the_volume() -> None:
    block = re.search(r"^jetstream \{(.*?)^\}", NATS_CONF.read_text(), re.M | re.S)
    assert block is not None
    assert re.search(r"^\s*sync_interval: always\s*$", block[1], re.M)
    store = re.search(r'store_dir: "([^"]+)"', block[1])
    volumes = dict(v.split(":")[:2] for v in CENTRAL["services"]["nats"]["volumes"])
    assert store is not None and store[1].startswith(volumes["nats-data"] + "/")


# --- the NATS permissions, on a real server ----------------------------------------------------------------------


MEMBERS = {SITE: "site", "operator": "operator", "integration": "integration", "vendor": "model_owner"}


@dataclass
class CentralNats:
    hostport: str
    seeds: dict[str, Path]   # every user's nkey seed, by roster name
    proc: subprocess.Popen[str]
    log: list[str]
    reader: threading.Thread

    def stop(self) -> str:
        """Stop the server; its whole log, permission violations included."""
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.reader.ident is not None:  # started: it ends when the server closes its log
            self.reader.join(10)
        return "".join(self.log)

    def options(self, user: str) -> dict[str, Any]:
        """nats-py's options to connect as `user`: its seed, and the inbox only it may read."""
        return {"nkeys_seed": str(self.seeds[user]), "inbox_prefix": f"_INBOX.{public_of(self.seeds[user])}"}

    async def plain(self, user: str) -> nats.NATS:
        return await nats.connect(f"nats://{self.hostport}", **self.options(user))

    async def connect(self, user: str) -> tuple[nats.NATS, asyncio.Queue[str]]:
        """A connection, and the permission violations the server reports on it."""
        violations: asyncio.Queue[str] = asyncio.Queue()

        async def on_error(exc: Exception) -> None:
            violations.put_nowait(str(exc))

        nc = await nats.connect(f"nats://{self.hostport}", error_cb=on_error, allow_reconnect=False,
                                **self.options(user))
        return nc, violations


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    """compose/.env as an operator would write it: the example, with a fresh random value for every password."""
    env = env_file(".env.example")
    return {**env, **{key: secrets.token_hex(12) for key in env if "PASSWORD" in key}}


def bus(home: Path, *args: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ASSAY_")}
    done = subprocess.run([sys.executable, "-m", "assay", "--home", str(home), "bus", *args], capture_output=True,
                          text=True, timeout=60, env={**clean, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def roster(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The roster compose/README.md has the operator make, with the commands it names: `assay bus init` (the
    provisioner and the services), then each member's `assay bus key` and the operator's `assay bus enrol`."""
    root = tmp_path_factory.mktemp("deployment")
    operator, secret_dir = root / "operator-home", root / "secrets"
    bus(operator, "init", str(root / "nats" / "roster"), "--secrets", str(secret_dir), "--central", "tls://central:4222")
    seeds = {name: secret_dir / f"nats-{name}.nk" for name in ("provision", *SERVICES)}
    KeyPair.generate().save(root / "scheduling.key")
    for name, role in MEMBERS.items():
        member = root / f"{name}-home"
        public = bus(member, "key", name).strip().splitlines()[-1]
        said = bus(operator, "enrol", name, "--role", role, "--nkey", public, "--config", str(root / "nats" / "roster"),
                   "--scheduler-key", str(root / "scheduling.pub"))
        assert "the server takes it when it starts" in said, said
        seeds[name] = member / "keys" / f"{name}.nk"
    return root / "nats" / "roster", seeds


@pytest.fixture
def central_nats(tmp_path: Path, roster: tuple[Path, dict[str, Path]]) -> Iterator[CentralNats]:
    """nats-server with compose/nats/nats.conf and the roster beside it, as central.yml mounts them."""
    store = tmp_path / "jetstream"
    conf = tmp_path / "nats.conf"
    text, count = re.subn(r'store_dir: "[^"]+"', f'store_dir: "{store}"', NATS_CONF.read_text())
    assert count == 1
    conf.write_text(text)
    shutil.copytree(roster[0], tmp_path / "roster")
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", "-1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    hostport = ""
    assert proc.stderr is not None
    for line in proc.stderr:  # the server's own log says when it listens: no polling
        log.append(line)
        if listening := re.search(r"Listening for client connections on (\S+)", line):
            hostport = listening[1]
        if "Server is ready" in line:
            break
    reader = threading.Thread(target=lambda: log.extend(proc.stderr or ()), daemon=True)
    central = CentralNats(hostport, roster[1], proc, log, reader)
    try:
        assert hostport, f"nats-server refused compose/nats/nats.conf:\n{''.join(log)}"
        reader.start()
        yield central
    finally:
        central.stop()


async def refused(nc: nats.NATS, violations: asyncio.Queue[str], subject: str) -> None:
    """Publishing on `subject` draws a permissions violation from the server."""
    await nc.publish(subject, b"{}")
    await nc.flush()
    violation = await asyncio.wait_for(violations.get(), 10)
    assert f'permissions violation for publish to "{subject}"'.lower() in violation.lower()


async def provision(bus: CentralNats) -> None:
    nc = await bus.plain("provision")
    await ensure_streams(nc.jetstream())
    await nc.close()


async def test_a_site_may_publish_only_its_own_results_and_dead_letters(central_nats: CentralNats) -> None:
    await provision(central_nats)
    site, violations = await central_nats.connect(SITE)
    js = site.jetstream()
    assert (await js.publish(subjects.results(SITE), b"{}", timeout=10)).stream == subjects.RESULTS_STREAM
    assert (await js.publish(subjects.dead_letter(SITE_DURABLE), b"{}", timeout=10)).stream == "DEAD_LETTERS"
    for subject in (subjects.evt("benchmark", "approved"), subjects.results("hospital-b"), subjects.jobs(SITE),
                    subjects.dead_letter("scheduling"), REQUEST_SUBJECTS[GetBenchmark]):
        await refused(site, violations, subject)
    await site.close()


async def test_only_the_scheduler_cancels_and_a_site_reads_only_its_own_cancellations(
        central_nats: CentralNats) -> None:
    await provision(central_nats)
    scheduler, _ = await central_nats.connect("scheduling")
    for site_id in (SITE, "hospital-b"):
        await scheduler.jetstream().publish(subjects.cancelled(site_id, "job-1"), site_id.encode(), timeout=10)
    site, violations = await central_nats.connect(SITE)
    bucket = await site.jetstream().key_value(subjects.CANCELLED_BUCKET)
    assert (await bucket.get(f"{SITE}.job-1")).value == SITE.encode()
    for subject in (subjects.cancelled(SITE, "job-2"),  # a site cannot cancel, nor un-cancel, a job
                    "$JS.API.DIRECT.GET.KV_assay-cancelled.$KV.assay-cancelled.hospital-b.job-1",
                    "$JS.API.STREAM.MSG.GET.KV_assay-cancelled"):  # the get that names no subject is refused too
        await refused(site, violations, subject)
    for nc in (scheduler, site):
        await nc.close()


async def test_an_integration_pulls_the_events_through_its_durable_and_may_do_nothing_else(
        central_nats: CentralNats) -> None:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    await provision(central_nats)
    registry, _ = await central_nats.connect("registry")
    for n in (1, 2):
        await registry.jetstream().publish(subjects.evt("actor", "registered"), f"event {n}".encode(), timeout=10)
    integration, violations = await central_nats.connect("integration")
    queue = await integration.jetstream().pull_subscribe(
        subjects.EVENTS_ALL, durable="integration", stream=subjects.EVENTS_STREAM,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT))
    [first] = await queue.fetch(1, timeout=10)
    await first.ack_sync(timeout=10)
    [second] = await queue.fetch(1, timeout=10)
    assert (first.data, second.data) == (b"event 1", b"event 2")
    for subject in (subjects.evt("actor", "registered"), subjects.cmd("registry", "register_actor"),
                    "$JS.API.CONSUMER.CREATE.EVENTS.registry-actor-registered", "$JS.API.STREAM.INFO.JOBS",
                    "$JS.API.CONSUMER.MSG.NEXT.RESULTS.leaderboard-results"):
        await refused(integration, violations, subject)
    for nc in (registry, integration):
        await nc.close()


async def test_a_site_may_pull_and_ack_only_its_own_queue(central_nats: CentralNats) -> None:
    await provision(central_nats)
    scheduler, _ = await central_nats.connect("scheduling")
    for site_id in (SITE, "hospital-b"):
        await scheduler.jetstream().publish(subjects.jobs(site_id), site_id.encode(), timeout=10)
    site, violations = await central_nats.connect(SITE)
    queue = await site.jetstream().pull_subscribe(subjects.jobs(SITE), durable=SITE_DURABLE,
                                                  stream=subjects.JOBS_STREAM)
    [job] = await queue.fetch(1, timeout=10)
    assert job.data == SITE.encode()
    await job.ack_sync(timeout=10)
    for subject in ("$JS.API.CONSUMER.MSG.NEXT.JOBS.site-hospital-b-jobs",
                    f"$JS.API.CONSUMER.CREATE.JOBS.{SITE_DURABLE}.assay.v1.jobs.hospital-b",  # its name, another filter
                    f"$JS.API.CONSUMER.CREATE.JOBS.{SITE_DURABLE}", f"$JS.API.CONSUMER.DURABLE.CREATE.JOBS.{SITE_DURABLE}",
                    f"$JS.API.CONSUMER.DELETE.JOBS.{SITE_DURABLE}", "$JS.API.STREAM.INFO.JOBS",
                    "$JS.API.STREAM.PURGE.JOBS"):
        await refused(site, violations, subject)
    await site.subscribe("assay.v1.>")
    await site.flush()
    violation = await asyncio.wait_for(violations.get(), 10)
    assert 'permissions violation for subscription to "assay.v1.>"' in violation.lower()
    admin = await central_nats.plain("provision")
    assert (await admin.jetstream().stream_info(subjects.JOBS_STREAM)).state.messages == 1, "hospital-b's job waits"
    for nc in (scheduler, site, admin):
        await nc.close()


async def test_only_the_provisioner_may_change_streams_and_only_the_scheduler_may_send_jobs(
        central_nats: CentralNats) -> None:
    await provision(central_nats)
    for user in (*SERVICES, "operator"):
        nc, violations = await central_nats.connect(user)
        for subject in ("$JS.API.STREAM.DELETE.EVENTS", "$JS.API.STREAM.PURGE.RESULTS", subjects.results(SITE),
                        *([] if user == "scheduling" else [subjects.jobs(SITE)])):
            await refused(nc, violations, subject)
        await nc.close()
    cli, violations = await central_nats.connect("operator")
    await refused(cli, violations, subjects.evt("benchmark", "approved"))
    await cli.close()


async def test_a_model_owner_reads_the_events_but_never_a_sites_dataset_statistics(central_nats: CentralNats) -> None:
    await provision(central_nats)
    registry, _ = await central_nats.connect("registry")
    seen: dict[str, list[str]] = {"vendor": [], "operator": []}
    readers = []
    for name in seen:
        nc, _ = await central_nats.connect(name)

        async def note(msg: Any, name: str = name) -> None:
            seen[name].append(msg.subject)

        await nc.subscribe(subjects.EVENTS_ALL, cb=note)
        await nc.flush()
        readers.append(nc)
    for subject in (subjects.evt("dataset", "registered"), subjects.evt("model", "registered")):
        await registry.jetstream().publish(subject, b"{}", timeout=10)
    for _ in range(100):
        if len(seen["operator"]) == 2:
            break
        await asyncio.sleep(0.05)
    for nc in readers:
        await nc.flush()
    assert seen == {"operator": [subjects.evt("dataset", "registered"), subjects.evt("model", "registered")],
                    "vendor": [subjects.evt("model", "registered")]}
    for nc in (registry, *readers):
        await nc.close()


async def answer(nc: nats.NATS, subject: str) -> dict[str, Any]:
    """The reply to a malformed command, once a service subscribes (the server says at once when none has yet)."""
    for delay in (0.05 * 2**n for n in range(10)):  # the CLI's client backs off the same way
        try:
            return dict(json.loads((await nc.request(subject, b"{}", timeout=10)).data))
        except nats.errors.NoRespondersError:
            await asyncio.sleep(delay)
    raise AssertionError(f"no service answers on {subject}")


# --- PostgreSQL, and the whole central platform -------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_databases(postgres_server: str, dotenv: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
    """compose/postgres/init-databases.sh run once on a private cluster, as the postgres image runs it."""
    server = urlsplit(postgres_server)
    hostport = f"{server.hostname}:{server.port}"
    pg_env = environment(CENTRAL["services"]["postgres"], dotenv)
    done = subprocess.run(["bash", str(COMPOSE / "postgres" / "init-databases.sh")], capture_output=True, text=True,
                          env={**os.environ, **pg_env, "PGHOST": str(server.hostname), "PGPORT": str(server.port)})
    try:
        assert done.returncode == 0, done.stderr
        yield hostport, pg_env
    finally:
        # one -c each: DROP DATABASE cannot run in the one transaction a multi-statement string is
        drops = [arg for n in SERVICES for arg in ("-c", f"DROP DATABASE IF EXISTS {n} WITH (FORCE)",
                                                    "-c", f"DROP ROLE IF EXISTS {n}")]
        dropped = subprocess.run(["psql", "-h", str(server.hostname), "-p", str(server.port), "-U", "postgres", "-d",
                                  "postgres", "-v", "ON_ERROR_STOP=1", *drops], capture_output=True, text=True)
        assert dropped.returncode == 0, dropped.stderr


@pytest.mark.postgres
async def test_the_postgres_init_script_gives_each_service_a_database_only_it_may_open(
        compose_databases: tuple[str, dict[str, str]]) -> None:
    import asyncpg

    hostport, pg_env = compose_databases
    for name in SERVICES:
        password = pg_env[f"POSTGRES_{name.upper()}_PASSWORD"]
        conn = await asyncpg.connect(f"postgresql://{name}:{password}@{hostport}/{name}")
        owner = await conn.fetchval("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1", name)
        await conn.execute("CREATE TABLE probe (id int)")  # the role may create its own tables
        await conn.execute("DROP TABLE probe")
        await conn.close()
        assert owner == name
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await asyncpg.connect(f"postgresql://registry:{pg_env['POSTGRES_REGISTRY_PASSWORD']}@{hostport}/approval")


@pytest.mark.docker
@pytest.mark.postgres
async def test_the_services_and_a_site_worker_run_with_exactly_the_compose_users_databases_and_keys(
        central_nats: CentralNats, compose_databases: tuple[str, dict[str, str]], dotenv: dict[str, str],
        docker_client: Any, tmp_path: Path) -> None:
    pg_hostport, _ = compose_databases
    keys = tmp_path / "keys"
    for name in ("operator", *SERVICES, SITE):
        KeyPair.generate().save(keys / f"{name}.key")
    public = {name: (keys / f"{name}.pub").read_text().strip() for name in ("operator", *SERVICES)}
    central_env = {**dotenv, "ASSAY_OPERATOR_PUBLIC_KEY": public["operator"],
                   "ASSAY_SERVICE_KEYS": json.dumps({name: public[name] for name in SERVICES})}
    site_env = {**env_file("site.env.example"), "ASSAY_CENTRAL_NATS": central_nats.hostport,
                "ASSAY_SITE_NATS_KEY_FILE": str(central_nats.seeds[SITE]),
                "ASSAY_SCHEDULER_PUBLIC_KEY": public["scheduling"], "ASSAY_SITE_KEY_FILE": str(keys / f"{SITE}.key"),
                "ASSAY_SITE_DIR": str(tmp_path / "site"), "ASSAY_SITE_WORK_DIR": str(tmp_path / "work")}
    secret_files = {**{f"/run/secrets/{name}_key": str(keys / f"{name}.key") for name in SERVICES},
                    **{f"/run/secrets/{name}_nats": str(central_nats.seeds[name]) for name in ("provision", *SERVICES)},
                    "/run/secrets/site_key": str(keys / f"{SITE}.key"),
                    "/run/secrets/site_nats": str(central_nats.seeds[SITE])}

    def here(spec: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
        """The container's environment, with compose's host names and secret paths pointing at this machine."""
        given = environment(spec, env)
        for key, value in given.items():
            value = value.replace("://nats:4222", f"://{central_nats.hostport}")
            value = value.replace("@postgres:5432", f"@{pg_hostport}")
            given[key] = "" if key.endswith("_OTLP_ENDPOINT") else secret_files.get(value, value)
        return {**os.environ, **given}

    services = CENTRAL["services"]
    program, *arguments = services["provision"]["entrypoint"]  # the image's venv is this test's
    provisioned = subprocess.run([str(Path(sys.executable).with_name(program)), *arguments],
                                 env=here(services["provision"], central_env), capture_output=True, text=True,
                                 timeout=60)
    assert provisioned.returncode == 0, provisioned.stdout + provisioned.stderr
    processes = {name: (services[name], central_env) for name in SERVICES}
    processes["site"] = (SITE_FILE["services"]["worker"], site_env)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for name, (spec, env) in processes.items():
        with (tmp_path / f"{name}.log").open("wb") as log:
            procs[name] = subprocess.Popen([sys.executable, "-m", "assay.serve", *spec["command"]],
                                           env=here(spec, env), stdout=log, stderr=subprocess.STDOUT)

    def logs() -> str:
        return "".join(f"\n--- {n}\n{(tmp_path / f'{n}.log').read_text()[-3000:]}" for n in procs)

    try:
        watcher = await central_nats.plain("provision")
        dead_letters = await watcher.jetstream().subscribe(subjects.DEAD_LETTERS_ALL, stream="DEAD_LETTERS",
                                                           ordered_consumer=True)
        # a malformed message for every process to refuse, each on a subject only its own user may read
        registry, scheduler, site = [await central_nats.plain(user) for user in ("registry", "scheduling", SITE)]
        for subject in EVENT_SUBJECTS.values():
            subject = subject.replace("*", subjects.CHECK)  # a job's event: a check's, which the approval service reads
            await registry.jetstream().publish(subject, b"{}", timeout=10)
        await scheduler.jetstream().publish(subjects.jobs(SITE), b"{}", timeout=10, headers={"Nats-Msg-Id": "bad-job"})
        await site.jetstream().publish(subjects.results(SITE), b"{}", timeout=10)

        waiting = {*SERVICES, "site"}
        while waiting:  # each refusal is a dead letter: the process connected, pulled, acked and published as itself
            try:
                msg = await dead_letters.next_msg(timeout=90)
            except nats.errors.TimeoutError:
                pytest.fail(f"no dead letter from {sorted(waiting)}{logs()}")
            consumer = Envelope[DeadLetter].model_validate_json(msg.data).data.consumer
            waiting.discard("site" if consumer == SITE_DURABLE else consumer.split("-")[0])

        cli = await central_nats.plain("operator")
        for command in (GetBenchmark, ApproveBenchmark, ShowLeaderboard):  # request/reply across the accounts
            reply = await answer(cli, REQUEST_SUBJECTS[command])
            assert reply["ok"] is False and reply["message"].startswith(f"invalid {command.__name__}")
        assert {n: p.poll() for n, p in procs.items() if p.poll() is not None} == {}, logs()
        for nc in (watcher, registry, scheduler, site, cli):
            await nc.close()
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)
    violations = [line for line in central_nats.stop().splitlines() if "violation" in line.lower()]
    assert violations == [], "every process must do its work within its own permissions"
