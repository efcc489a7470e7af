"""The platform's images as `just images` builds them: FROM the local Debian base, with a wheelhouse made on this host
and no network in the build. Then they run as compose runs them: PostgreSQL with compose's init script (a database and
a role per service), a nats-server with compose's own nats.conf and the roster `assay bus init` and `assay bus enrol`
make, `assay provision` from the image declaring the streams as the provisioner's nkey, the four services and a site
worker as containers (host networking: no image can be pulled here for nats or postgres), each as its own nkey; and a
benchmark run through the CLI, every actor as its own NATS user, with the demo's real model and evaluator
containers, reaches the board."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from docker.types import LogConfig, Mount

from assay.base_image import BASE_IMAGE, ImageBuildError, ensure_base_image
from assay.demo.build import build_demo_images
from assay.demo.data import site_cases, write_site_raw
from assay.demo.run import benchmark_spec
from assay.home import Home
from assay.images_build import DOCKERFILE, IMAGES, build_platform_images, check_base, dockerfile_sources, stage_context
from assay.platform import Platform, read_ports_file
from contracts.catalog import SERVICES
from contracts.signing import KeyPair
from tests.conftest import nats_binary, require
from tests.integration.test_compose_config import NATS_CONF, bus, compose_databases, dotenv  # noqa: F401 (fixtures)
from tests.integration.test_checks_cli import until
from tests.integration.test_consent_cli import cli
from tests.support.federation import Federation

ROOT = Path(__file__).resolve().parents[2]
# one per machine, shared by every run and checkout: the wheelhouse in it is keyed by pyproject.toml and the Python
# it is for, and Docker's layer cache finds what did not change
CACHE = Path(tempfile.gettempdir(), "assay-platform-images")
IMAGE_UID = int(re.search(r"^ARG ASSAY_UID=(\d+)$", (ROOT / DOCKERFILE).read_text(), re.M)[1])  # type: ignore[index]
ALIVE = "/tmp/assay-alive"  # on the containers' tmpfs, as in compose
SITE = "hospital-a"
CENTRAL, SITE_IMAGE = (next(i for i in IMAGES if i.name == name) for name in ("central", "site"))


# --- what is built, without Docker ---------------------------------------------------------------------------------


def test_the_images_built_are_the_ones_compose_runs_with_the_same_extras() -> None:
    central = yaml.safe_load((ROOT / "compose" / "central.yml").read_text())["services"]
    site = yaml.safe_load((ROOT / "compose" / "site.yml").read_text())["services"]
    runs = {name: (central[name], CENTRAL) for name in (*SERVICES, "provision")}
    runs["site"] = (site["worker"], SITE_IMAGE)
    for name, (spec, image) in runs.items():
        assert spec["image"] == "${ASSAY_IMAGE:-" + image.tag + "}", name
        args = spec["build"]["args"]
        assert (args["ASSAY_EXTRAS"], args.get("ASSAY_MODULES")) == (image.extras, image.modules), name


def test_the_build_context_holds_what_the_dockerfile_copies_with_the_wheelhouse_and_nothing_else(
        tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "probe-1-py3-none-any.whl").write_bytes(b"a wheel")
    context = stage_context(ROOT, tmp_path / "context", wheels)
    copied = dockerfile_sources(ROOT / DOCKERFILE)
    assert "compose/build-inputs" in copied and "pyproject.toml" in copied
    for name in copied:
        assert (context / name).exists(), name
    assert (context / "compose/build-inputs/wheels/probe-1-py3-none-any.whl").read_bytes() == b"a wheel"
    assert {p.name for p in context.iterdir()} == {name.split("/")[0] for name in copied} | {"compose"}
    assert {p.name for p in (context / "compose").iterdir()} == {"Dockerfile", "build-inputs"}
    assert not [p for p in context.rglob("*") if p.name == "__pycache__" or p.suffix in (".pyc", ".key")]


# --- built, and run -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform_images(docker_client: Any) -> dict[str, str]:
    return build_platform_images(docker_client, ROOT, CACHE, on_step=print)


@pytest.mark.docker
def test_a_base_without_python3_or_its_venv_module_or_absent_is_refused_with_what_to_do(docker_client: Any) -> None:
    ensure_base_image(docker_client)  # the demo's: python3 and numpy only
    with pytest.raises(ImageBuildError, match="python3-venv"):
        check_base(docker_client, BASE_IMAGE)
    with pytest.raises(ImageBuildError, match="not in the local Docker engine"):
        check_base(docker_client, f"assay-test/no-such-base:{uuid.uuid4().hex[:8]}")
    empty, archive = f"assay-test/empty-base:{uuid.uuid4().hex[:8]}", io.BytesIO()
    tarfile.open(fileobj=archive, mode="w").close()
    repository, tag = empty.split(":")
    docker_client.api.import_image_from_data(archive.getvalue(), repository=repository, tag=tag)
    try:
        with pytest.raises(ImageBuildError, match="cannot run python3"):
            check_base(docker_client, empty)
    finally:
        docker_client.images.remove(empty)


PROBE = """import getpass, importlib.util, json, os
print(json.dumps({"user": getpass.getuser(), "inputs": os.path.exists("/build-inputs"),
                  "docker": bool(importlib.util.find_spec("docker")),
                  "sqlalchemy": bool(importlib.util.find_spec("sqlalchemy"))}))"""


@pytest.mark.docker
def test_each_image_runs_as_assay_with_its_extras_only_and_keeps_nothing_of_the_build_inputs(
        platform_images: dict[str, str], docker_client: Any) -> None:
    for image, wanted in ((CENTRAL, {"docker": False, "sqlalchemy": True}),
                          (SITE_IMAGE, {"docker": True, "sqlalchemy": False})):
        built = platform_images[image.tag]
        config = docker_client.images.get(built).attrs["Config"]
        assert config["User"] == "assay" and config["Entrypoint"] == ["python", "-m", "assay.serve"]
        history = " ".join(str(layer.get("CreatedBy")) for layer in docker_client.api.history(built))
        assert "build-inputs" not in history and "PIP_" not in history, "the build stage's arguments stayed"
        said = docker_client.containers.run(built, ["-c", PROBE], entrypoint=["python"], network_mode="none",
                                            remove=True)
        assert json.loads(said) == {"user": "assay", "inputs": False, **wanted}, image.tag


def give_to_image_user(root: Path) -> None:
    """The containers run as the image's user: what they read and write here must be its (the CLI, as root,
    reads it all the same)."""
    for path in (root, *root.rglob("*")):
        os.chown(path, IMAGE_UID, IMAGE_UID, follow_symlinks=False)


class Containers:
    """The platform's processes as containers of the built images, run as compose runs them (read-only, no
    capabilities, a tmpfs /tmp), with host networking and the state folder at the same path inside."""

    def __init__(self, client: Any, root: Path) -> None:
        self.client, self.root, self.prefix, self.running = client, root, f"assay-it-{uuid.uuid4().hex[:8]}", []

    def run(self, tag: str, command: list[str], env: dict[str, str], *, entrypoint: list[str] | None = None,
            socket: bool = False, detach: bool = True) -> Any:
        mounts = [Mount(target=str(self.root), source=str(self.root), type="bind")]
        extra: dict[str, Any] = {}
        if socket:  # the site worker starts the model and evaluator containers on this host's engine
            mounts.append(Mount(target="/var/run/docker.sock", source="/var/run/docker.sock", type="bind"))
            extra["group_add"] = [str(os.stat("/var/run/docker.sock").st_gid)]
        container = self.client.containers.run(
            tag, command, entrypoint=entrypoint, environment=env, detach=True, network_mode="host", mounts=mounts,
            read_only=True, tmpfs={"/tmp": ""}, cap_drop=["ALL"], security_opt=["no-new-privileges"],
            name=f"{self.prefix}-{command[0] if entrypoint is None else entrypoint[-1]}",
            log_config=LogConfig(type=LogConfig.types.JSON, config={"max-size": "10m"}), **extra)
        self.running.append(container)
        return container

    async def healthy(self, container: Any, timeout_s: float = 120) -> None:
        """Until compose's health check passes in `container`: its process wrote ALIVE while its bus and its
        database (a worker: its Docker engine) answered."""
        async with asyncio.timeout(timeout_s):
            while True:
                container.reload()
                assert container.status == "running", f"{container.name} exited:\n{self.logs(container)}"
                if container.exec_run(["assay", "alive", ALIVE, "--within", "30"]).exit_code == 0:
                    return
                await asyncio.sleep(0.5)

    @staticmethod
    def logs(container: Any) -> str:
        return str(container.logs(tail=60).decode(errors="replace"))

    def stop(self) -> None:
        for container in reversed(self.running):
            try:
                container.stop(timeout=10)
                print(f"--- {container.name}\n{self.logs(container)}")  # shown when the test failed
            finally:
                container.remove(force=True)


async def durables_exist(nats_url: str, durables: dict[str, dict[str, str]], seed: Path,
                         timeout_s: float = 60) -> None:
    """Until every process's durable consumers exist: it answers once they do (asked as the user `seed` is)."""
    from service_kit.connection import inbox_of

    nc = await nats.connect(nats_url, nkeys_seed=str(seed), inbox_prefix=inbox_of(nats_url, seed))
    try:
        js = nc.jetstream()
        async with asyncio.timeout(timeout_s):
            for durable, stream in ((d, s) for each in durables.values() for d, s in each.items()):
                while True:
                    try:
                        await js.consumer_info(stream, durable)
                        break
                    except nats.js.errors.NotFoundError:
                        await asyncio.sleep(0.2)
    finally:
        await nc.close()


@contextmanager
def central_nats(folder: Path) -> Iterator[str]:
    """nats-server with compose/nats/nats.conf and the roster in `folder`/roster, as central.yml mounts them."""
    text, count = re.subn(r'store_dir: "[^"]+"', f'store_dir: "{folder / "jetstream"}"', NATS_CONF.read_text())
    assert count == 1
    (folder / "nats.conf").write_text(text)
    proc = subprocess.Popen([nats_binary(), "-c", str(folder / "nats.conf"), "-a", "127.0.0.1", "-p", "-1",
                             "--ports_file_dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (url := read_ports_file(folder)):
            assert proc.poll() is None and time.monotonic() < deadline, "nats-server refused compose's nats.conf"
            time.sleep(0.02)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def steps(fed: Federation, *commands: tuple[str, ...]) -> None:
    """Each `assay` command in turn, as a person types them; each must succeed."""
    for command in commands:
        code, said = await cli(fed, *command)
        assert code == 0, f"assay {' '.join(command)}: {said}"


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """The state folder the CLI and the containers share: not under pytest's folders, which only root may enter."""
    root = Path(tempfile.mkdtemp(prefix="assay-images-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.docker
@pytest.mark.postgres
async def test_the_built_images_run_the_platform_and_a_benchmark_through_the_cli_reaches_the_board(
        platform_images: dict[str, str], docker_client: Any, shared_root: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, compose_databases: tuple[str, dict[str, str]]) -> None:  # noqa: F811
    require(os.geteuid() == 0, "root (the test gives its state folder to the images' user)")
    build_demo_images(docker_client, tmp_path / "demo-build")  # the preparator, models and evaluator the site runs
    central, site_image = platform_images[CENTRAL.tag], platform_images[SITE_IMAGE.tag]  # by id: what was built
    root = shared_root
    seeds, members = root / "secrets", {"operator": "operator", "owner": "benchmark_owner", "vendor": "model_owner",
                                        SITE: "data_owner", f"{SITE}-worker": "site"}
    operator_home = tmp_path / "operator"  # the operator's own state folder: its system key stays there
    KeyPair.generate().save(tmp_path / "bundle-scheduling.key")
    scheduler_pub = tmp_path / "bundle-scheduling.pub"  # what a site's bundle names (not read here)
    bus(operator_home, "init", str(tmp_path / "nats" / "roster"), "--secrets", str(seeds), "--central", "nats://x")
    for name, role in members.items():  # each member makes its key in the shared folder, the operator enrols it
        public = bus(root, "key", name).strip().splitlines()[-1]
        bus(operator_home, "enrol", name, "--role", role, "--nkey", public, "--config",
            str(tmp_path / "nats" / "roster"),
            *(["--scheduler-key", str(scheduler_pub), "--site", SITE] if role == "site" else []))
    with central_nats(tmp_path / "nats") as nats_url:
        containers = Containers(docker_client, root)
        try:
            give_to_image_user(root)
            provision = containers.run(central, ["provision"], {"ASSAY_NATS_URL": nats_url,
                                                                "ASSAY_NATS_CREDS": str(seeds / "nats-provision.nk")},
                                       entrypoint=["assay"])
            assert provision.wait(timeout=120)["StatusCode"] == 0, containers.logs(provision)
            assert "ok streams EVENTS" in containers.logs(provision)

            fed = Federation(nats_url, root, lambda _: "")  # for its keys; every step below is the CLI's
            for name in ("operator", "owner", "vendor", SITE, *SERVICES):
                fed.key(name)
            (root / "platform.json").write_text(json.dumps({"nats_url": nats_url}))
            (root / "policy.toml").write_text('[release]\nrule = "auto"\n')
            await steps(fed, ("site", "add", SITE, "--policy", str(root / "policy.toml")))
            (root / "services").mkdir()
            platform = Platform(Home(root), nats_url=nats_url)  # `assay up`'s settings for each process
            give_to_image_user(root)
            pg_hostport, pg_env = compose_databases  # compose's init script: a database and a role per service

            def database(name: str) -> str:
                return (f"postgresql+asyncpg://{name}:{pg_env[f'POSTGRES_{name.upper()}_PASSWORD']}@{pg_hostport}"
                        f"/{name}")

            services = [containers.run(central, [name], {
                            **platform.service_env(name), f"ASSAY_{name.upper()}_ALIVE_FILE": ALIVE,
                            f"ASSAY_{name.upper()}_DATABASE_URL": database(name),
                            f"ASSAY_{name.upper()}_NATS_CREDS": str(seeds / f"nats-{name}.nk")}) for name in SERVICES]
            for container in services:
                await containers.healthy(container)
            await durables_exist(nats_url, {name: d for name, d in platform.durables().items() if name in SERVICES},
                                 seeds / "nats-provision.nk")
            as_operator = ("--nats", nats_url, "--creds", str(root / "keys" / "operator.nk"))  # a command no one signs

            spec = benchmark_spec("assay-demo/model-reference:1") | {"benchmark_id": "bench"}
            del spec["check_site"]  # no committee site here: the dataset's own check runs at the hospital
            (root / "benchmark.json").write_text(json.dumps(spec))
            await steps(fed, *(("actor", "register", actor, "--role", role, "--as", "operator")
                               for actor, role in (("owner", "benchmark_owner"), ("vendor", "model_owner"),
                                                   (SITE, "site"))))
            await steps(fed, ("benchmark", "register", str(root / "benchmark.json"), "--as", "owner"),
                        ("benchmark", "approve", "bench", "--as", "operator"),
                        ("model", "register", "compact", "--image", "assay-demo/model-compact:1", "--as", "vendor"),
                        ("association", "request", "bench", "--model", "compact", "--as", "vendor"),
                        ("association", "approve", "bench", "--model", "compact", "--as", "owner"))
            write_site_raw(0, root / "raw")
            code, said = await cli(fed, *as_operator, "dataset", "prepare", "ds-a", "--benchmark", "bench",
                                   "--site", SITE, "--raw", str(root / "raw"))
            cases = len(site_cases(0).case_ids)
            assert code == 0 and f"prepared {cases} cases" in said, said

            give_to_image_user(root)  # what the CLI prepared, the worker reads
            worker = containers.run(site_image, ["site"], {
                **platform.site_env(SITE), "ASSAY_SITE_ALIVE_FILE": ALIVE,
                "ASSAY_SITE_NATS_CREDS": str(root / "keys" / f"{SITE}-worker.nk")}, socket=True)
            await containers.healthy(worker)
            await durables_exist(nats_url, {f"site-{SITE}": platform.durables()[f"site-{SITE}"]},
                                 seeds / "nats-provision.nk")
            await steps(fed, ("dataset", "register", "ds-a", "--as", SITE),
                        ("association", "request", "bench", "--dataset", "ds-a", "--as", SITE),
                        ("association", "approve", "bench", "--dataset", "ds-a", "--as", "owner"))

            shown = await until(fed, "compact", "leaderboard", "show", "bench", "--as", "owner", timeout_s=300)
            with monkeypatch.context() as env:  # the test's own look, as the committee's NATS user
                env.setenv("ASSAY_NATS_CREDS", str(root / "keys" / "owner.nk"))
                [row] = (await fed.board()).rows
            assert (row.model_id, row.sites, row.case_count) == ("compact", 1, cases), shown
            assert len(row.site_values) == 1 and 0.9 < row.pooled["auc"] <= 1.0, shown
            # the reference model's check of the dataset ran at the site too, and passed
            await until(fed, "PASSED", "association", "show", "bench", "--dataset", "ds-a", "--as", "owner")
        finally:
            containers.stop()
