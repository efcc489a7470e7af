"""Python base images made from Debian packages with debootstrap, imported into the local Docker engine: no image
registry is needed. The demo's images stand on one (python3, numpy), the platform's on another (python3, venv)."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import docker
from docker.errors import ImageNotFound

BASE_IMAGE = "assay/python-base:bookworm"  # the demo's preparator, evaluator and models
BASE_PACKAGES = ("python3", "python3-numpy")
# compose/Dockerfile makes a venv (python3-venv: Debian's python3 has no ensurepip); ca-certificates and netbase are
# what python:3.11-slim has too, so a site's TLS connection to the centre is checked against the system's CAs
PLATFORM_BASE_IMAGE = "assay/python-venv:bookworm"
PLATFORM_BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "netbase")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_DIR = Path("/etc/apt")
TRIMMED = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "var/lib/apt/lists", "var/cache/apt")

OnStep = Callable[[str], None]


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


def ensure_base_image(client: docker.DockerClient, on_step: OnStep | None = None, name: str = BASE_IMAGE,
                      packages: Sequence[str] = BASE_PACKAGES) -> str:
    """The id of the base image `name`, importing it from Debian's `packages` (with their dependencies) if absent.

    Processes that need the same base at the same time (two demos, parallel tests) make it once: the others wait.
    """
    step = on_step or _silent
    slug = re.sub(r"\W", "_", name)
    lock_name = "assay-base-image.lock" if name == BASE_IMAGE else f"assay-base-image-{slug}.lock"  # one per base
    with open(Path(tempfile.gettempdir(), lock_name), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            image_id = client.images.get(name).id
            step(f"base image {name} present")
            return image_id
        except ImageNotFound:
            return _make_base_image(client, step, name, packages)


def _make_base_image(client: docker.DockerClient, step: OnStep, name: str, packages: Sequence[str]) -> str:
    include = "--include=" + ",".join(packages)
    if os.geteuid() != 0:
        raise ImageBuildError(
            f"base image {name} is missing and making it needs root (debootstrap); as root run "
            f"`debootstrap --variant=minbase {include} bookworm DIR` and `tar -C DIR -c . | docker import - {name}`"
        )
    if shutil.which("debootstrap") is None:
        step("installing debootstrap")
        _run(["apt-get", "update", "-qq"], "apt-get update")
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"], "installing debootstrap")
    mirror = debian_mirror()
    with tempfile.TemporaryDirectory(prefix="assay-base-") as tmp:
        root, tarball = Path(tmp, "rootfs"), Path(tmp, "rootfs.tar")
        step(f"making {name} from Debian bookworm packages ({', '.join(packages)}; {mirror}), about a minute")
        _run(["debootstrap", "--variant=minbase", include, "bookworm", str(root), mirror], "debootstrap")
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
