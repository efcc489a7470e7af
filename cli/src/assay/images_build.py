"""The platform's own images (`assay images build`, `just images`), built the way the demo builds its images: FROM a
local Python base made from Debian packages, with a wheelhouse made on this host by `pip wheel` (through whatever
index and proxy this host's pip uses), then `docker build --network none` of compose/Dockerfile. No registry, no
network in the build."""

from __future__ import annotations

import fcntl
import hashlib
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import docker
from docker.errors import APIError, ImageNotFound

from assay.base_image import PLATFORM_BASE_IMAGE, PLATFORM_BASE_PACKAGES, ImageBuildError, OnStep, ensure_base_image

DOCKERFILE = "compose/Dockerfile"
INPUTS = "compose/build-inputs"  # copied to /build-inputs in the build stage only
WHEELS_IN_BUILD = "/build-inputs/wheels"
SKIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")


@dataclass(frozen=True)
class PlatformImage:
    name: str
    tag: str  # the tag compose/central.yml and compose/site.yml run
    extras: str  # the deployable's install extras (pyproject.toml)
    modules: str | None = None  # ASSAY_MODULES where not the Dockerfile's default (the four services)


IMAGES = (PlatformImage("central", "assay-central:dev", "central"),
          PlatformImage("site", "assay-site:dev", "site", "site_worker.main"))


def _silent(_: str) -> None:
    pass


def build_platform_images(client: docker.DockerClient, source: Path, work_dir: Path, *, base: str | None = None,
                          names: Sequence[str] = (), on_step: OnStep | None = None) -> dict[str, str]:
    """Build the images `names` (default: all of IMAGES) from the Assay sources in `source`; their ids by tag.

    The wheelhouse and the build context are kept in `work_dir`, which one build at a time uses; the wheelhouse is
    made again only when pyproject.toml changes, and Docker's layer cache does the rest."""
    step = on_step or _silent
    chosen = _chosen(names)
    _check_source(source)
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if base is None:
            base = PLATFORM_BASE_IMAGE
            ensure_base_image(client, step, PLATFORM_BASE_IMAGE, PLATFORM_BASE_PACKAGES)
        check_base(client, base)
        wheels = ensure_wheelhouse(source, work_dir, step)
        context = stage_context(source, work_dir / "context", wheels)
        built = {}
        for image in chosen:
            built[image.tag] = build_image(client, context, image, base, step)
            step(f"built {image.tag} {built[image.tag][:19]}")
        return built


def _chosen(names: Sequence[str]) -> list[PlatformImage]:
    known = {image.name: image for image in IMAGES}
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ImageBuildError(f"no platform image named {', '.join(unknown)}; there are {', '.join(known)}")
    return [image for image in IMAGES if not names or image.name in names]


def _check_source(source: Path) -> None:
    pyproject = source / "pyproject.toml"
    if not (source / DOCKERFILE).is_file() or not pyproject.is_file():
        raise ImageBuildError(f"{source.resolve()} is not the Assay source tree (no {DOCKERFILE} or pyproject.toml): "
                              "run from the repository root or give --source")
    if tomllib.loads(pyproject.read_text()).get("project", {}).get("name") != "assay":
        raise ImageBuildError(f"{pyproject.resolve()} is not Assay's pyproject.toml")


def check_base(client: docker.DockerClient, base: str) -> None:
    """`base` is a local image whose python3 makes a venv, of this host's Python version (the wheelhouse's)."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    probe = "import ensurepip, sys, venv; print('%d.%d' % sys.version_info[:2])"
    try:
        container = client.containers.create(base, ["python3", "-c", probe], network_mode="none",
                                             entrypoint=[])
    except ImageNotFound:
        raise ImageBuildError(f"base image {base} is not in the local Docker engine (nothing is pulled): build or "
                              "load it first, or leave --base out for the one made from Debian packages") from None
    try:
        try:
            container.start()
            code = int(container.wait(timeout=60)["StatusCode"])
        except APIError as error:  # no python3 at all: the start itself fails
            raise ImageBuildError(f"base image {base} cannot run python3: {error.explanation}") from None
        said = container.logs().decode(errors="replace").strip()
    finally:
        container.remove(force=True)
    if code != 0:
        raise ImageBuildError(f"base image {base} has no python3 with its venv module (Debian: python3-venv): "
                              f"{said.splitlines()[-1] if said else f'exit {code}'}")
    if said != here:
        raise ImageBuildError(f"base image {base} has Python {said}, but the wheelhouse is made for this host's "
                              f"Python {here}: give a base with Python {here}")


def wheelhouse_key(source: Path) -> str:
    """What the wheelhouse depends on: the project's requirements and the Python and machine it is made for."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}-{platform.machine()}"
    return f"{tag}-{hashlib.sha256((source / 'pyproject.toml').read_bytes()).hexdigest()[:16]}"


def ensure_wheelhouse(source: Path, work_dir: Path, step: OnStep) -> Path:
    """A folder of wheels for every image's extras and for the build backend, made with this host's pip."""
    folder = work_dir / "wheelhouse" / wheelhouse_key(source)
    if (folder / ".complete").exists():
        step(f"wheelhouse {folder} present ({len(list(folder.glob('*.whl')))} wheels)")
        return folder
    pyproject = tomllib.loads((source / "pyproject.toml").read_text())
    backend = pyproject.get("build-system", {}).get("requires", [])
    extras = ",".join(sorted({image.extras for image in IMAGES}))
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    step(f"pip wheel of assay[{extras}] and {', '.join(backend)} into {folder} (this host's index), "
         "a minute or two the first time")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(partial),
                             f"{source.resolve()}[{extras}]", *backend], capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).splitlines()[-20:])
        raise ImageBuildError(f"pip wheel failed (exit {result.returncode}); this host's pip must reach a package "
                              f"index (pip config list):\n{tail}")
    for own in partial.glob("assay-*.whl"):  # the image builds the project from its sources, not from this wheel
        own.unlink()
    for stale in folder.parent.iterdir():  # one wheelhouse per work folder: the others are of an older pyproject
        if stale != partial:
            shutil.rmtree(stale, ignore_errors=True)
    (partial / ".complete").touch()
    partial.rename(folder)
    step(f"wheelhouse {folder} made ({len(list(folder.glob('*.whl')))} wheels)")
    return folder


def dockerfile_sources(dockerfile: Path) -> list[str]:
    """What compose/Dockerfile copies from the build context, in its order."""
    found = []
    for line in dockerfile.read_text().splitlines():
        if (words := line.split()) and words[0] == "COPY" and not words[1].startswith("--"):
            found += words[1:-1]
    return found


def stage_context(source: Path, context: Path, wheels: Path) -> Path:
    """A build context of only what the Dockerfile copies (never .assay/ keys, .venv or tests), with the wheelhouse
    in its build inputs. Made anew each time: Docker's cache compares the files' contents, not their times."""
    shutil.rmtree(context, ignore_errors=True)
    (context / DOCKERFILE).parent.mkdir(parents=True)
    shutil.copy2(source / DOCKERFILE, context / DOCKERFILE)
    for name in dockerfile_sources(source / DOCKERFILE):
        if name == INPUTS:
            continue
        if not (source / name).exists():
            raise ImageBuildError(f"{DOCKERFILE} copies {name}, which is not in {source.resolve()}")
        target = context / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (source / name).is_dir():
            shutil.copytree(source / name, target, ignore=SKIPPED)
        else:
            shutil.copy2(source / name, target)
    _link_all((context / INPUTS / "wheels"), (p for p in wheels.iterdir() if p.suffix == ".whl"))
    return context


def _link_all(into: Path, files: Iterable[Path]) -> None:
    into.mkdir(parents=True)
    for path in files:
        try:
            (into / path.name).hardlink_to(path)  # wheels are large and never changed in place
        except OSError:
            shutil.copy2(path, into / path.name)


def build_args(image: PlatformImage, base: str) -> Mapping[str, str]:
    """compose/Dockerfile's build arguments for `image` from `base` and the wheelhouse alone."""
    args = {"BASE_IMAGE": base, "ASSAY_EXTRAS": image.extras, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELS_IN_BUILD}
    if image.modules is not None:
        args["ASSAY_MODULES"] = image.modules
    return args


def build_image(client: docker.DockerClient, context: Path, image: PlatformImage, base: str, step: OnStep) -> str:
    """`docker build --network none` of compose/Dockerfile in `context`; each step is said as it starts."""
    step(f"building {image.tag} (extras {image.extras}) from {base}, with no network")
    log: list[str] = []
    chunks = client.api.build(path=str(context), dockerfile=DOCKERFILE, tag=image.tag, network_mode="none",
                              buildargs=dict(build_args(image, base)), rm=True, forcerm=True, pull=False, decode=True)
    for chunk in chunks:
        if "error" in chunk:
            tail = "".join(log)[-3000:]
            raise ImageBuildError(f"building {image.tag} failed: {chunk['error'].strip()}\n{tail}")
        text = str(chunk.get("stream") or "")
        log.append(text)
        # the steps that take time or change files; the ARG, ENV and USER ones would only drown them
        if (match := re.match(r"Step (\d+/\d+) : ((FROM|COPY|RUN) .*)", text)) is not None:
            step(f"{image.tag} step {match[1]}: {match[2].strip()[:72]}")
    return str(client.images.get(image.tag).id)
