"""Builds the demo's container images on the local Docker engine, and the Python base they stand on.

No registry is needed: when the base is missing it is made from Debian packages with debootstrap.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import docker
from docker.errors import BuildError, ImageNotFound

from assay.demo.data import MODEL_FEATURES, train_models

BASE_IMAGE = "assay/python-base:bookworm"
PREPARATOR_TAG = "assay-demo/preparator:1"
EVALUATOR_TAG = "assay-demo/evaluator:1"
MODEL_TAG = "assay-demo/model-{name}:1"
IMAGES_DIR = Path(__file__).parent / "images"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_DIR = Path("/etc/apt")
TRIMMED = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "var/lib/apt/lists", "var/cache/apt")

OnStep = Callable[[str], None]


@dataclass(frozen=True)
class DemoImages:
    preparator: str  # image ids, sha256:...
    evaluator: str
    models: Mapping[str, str]  # model name -> image id


class ImageBuildError(Exception):
    """An image could not be built; the message says which and why."""


def _silent(_: str) -> None:
    pass


def debian_mirror(apt_dir: Path = APT_DIR) -> str:
    """The first Debian mirror apt uses for bookworm, from one-line or deb822 sources files."""
    sources = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list")),
               *sorted((apt_dir / "sources.list.d").glob("*.sources"))]
    for path in sources:
        if not path.is_file():
            continue
        for stanza in path.read_text().split("\n\n"):
            lines = [line.strip() for line in stanza.splitlines() if not line.strip().startswith("#")]
            fields = dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("deb"))
            if "bookworm" in fields.get("Suites", "").split() and "URIs" in fields:
                return fields["URIs"].split()[0]
            for line in lines:
                words = [w for w in line.split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
                    return words[1]
    return DEFAULT_MIRROR


def ensure_base_image(client: docker.DockerClient, on_step: OnStep | None = None, name: str = BASE_IMAGE) -> str:
    """The id of the Python + numpy base image, importing it from Debian packages if absent.

    Processes that need it at the same time (two demos, parallel tests) make it once: the others wait for it.
    """
    step = on_step or _silent
    with open(Path(tempfile.gettempdir(), "assay-base-image.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            image_id = client.images.get(name).id
            step(f"base image {name} present")
            return image_id
        except ImageNotFound:
            return _make_base_image(client, step, name)


def _make_base_image(client: docker.DockerClient, step: OnStep, name: str) -> str:
    if os.geteuid() != 0:
        raise ImageBuildError(
            f"base image {name} is missing and making it needs root (debootstrap); as root run "
            "`debootstrap --variant=minbase --include=python3,python3-numpy bookworm DIR` and "
            f"`tar -C DIR -c . | docker import - {name}`"
        )
    if shutil.which("debootstrap") is None:
        step("installing debootstrap")
        _run(["apt-get", "update", "-qq"], "apt-get update")
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"], "installing debootstrap")
    mirror = debian_mirror()
    with tempfile.TemporaryDirectory(prefix="assay-base-") as tmp:
        root, tarball = Path(tmp, "rootfs"), Path(tmp, "rootfs.tar")
        step(f"making {name} from Debian bookworm packages ({mirror}), about a minute")
        _run(["debootstrap", "--variant=minbase", "--include=python3,python3-numpy", "bookworm", str(root), mirror],
             "debootstrap")
        for relative in TRIMMED:
            shutil.rmtree(root / relative, ignore_errors=True)
            (root / relative).mkdir(parents=True, exist_ok=True)
        _run(["tar", "-C", str(root), "-cf", str(tarball), "."], "packing the root file system")
        repository, _, tag = name.rpartition(":")
        step(f"importing {name}")
        client.api.import_image_from_file(
            str(tarball), repository=repository, tag=tag,
            changes=["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        )
    return client.images.get(name).id


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).splitlines()[-20:])
        raise ImageBuildError(f"{what} failed (exit {result.returncode}):\n{tail}")


def build_demo_images(
    client: docker.DockerClient,
    workdir: Path,
    on_step: OnStep | None = None,
    base_image: str = BASE_IMAGE,
) -> DemoImages:
    """Build the preparator, evaluator and the three model images; return their ids.

    Build contexts live under `workdir`; unchanged contexts hit Docker's cache.
    """
    step = on_step or _silent
    if base_image == BASE_IMAGE:
        ensure_base_image(client, step)
    step("training the demo models on the development split")
    weights = train_models(workdir / "weights")

    def build(kind: str, tag: str, extra: Mapping[str, Path] | None = None) -> str:
        context = _sync_context(IMAGES_DIR / kind, workdir / "contexts" / tag.replace("/", "_"), extra or {})
        step(f"building {tag}")
        image_id = _build(client, context, tag, base_image)
        step(f"built {tag} {image_id[:19]}")
        return image_id

    preparator = build("preparator", PREPARATOR_TAG)
    evaluator = build("evaluator", EVALUATOR_TAG)
    models = {
        name: build("model", MODEL_TAG.format(name=name), {"weights.json": weights[name]})
        for name in MODEL_FEATURES
    }
    return DemoImages(preparator=preparator, evaluator=evaluator, models=models)


def _sync_context(source: Path, context: Path, extra: Mapping[str, Path]) -> Path:
    """Copy the image's files (and extras) into `context`, rewriting only what changed."""
    files = {p.name: p for p in source.iterdir() if p.is_file()} | dict(extra)
    context.mkdir(parents=True, exist_ok=True)
    for stale in context.iterdir():
        if stale.name not in files:
            stale.unlink()
    for name, path in files.items():
        target, content = context / name, path.read_bytes()
        if not target.is_file() or target.read_bytes() != content:
            target.write_bytes(content)
        target.chmod(0o644)  # COPY keeps the mode: under a umask of 077 the image's user could not read its code
    return context


def _build(client: docker.DockerClient, context: Path, tag: str, base_image: str) -> str:
    try:
        image, _ = client.images.build(
            path=str(context), tag=tag, network_mode="none", rm=True, pull=False,
            buildargs={"BASE_IMAGE": base_image},
        )
    except BuildError as error:
        log = "".join(str(entry.get("stream") or entry.get("error") or "") for entry in error.build_log)
        raise ImageBuildError(f"building {tag} failed: {error.msg}\n{log[-2000:]}") from error
    return image.id
