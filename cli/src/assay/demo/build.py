"""Builds the demo's container images on the local Docker engine, and the Python base they stand on.

No registry is needed: when the base is missing it is made from Debian packages with debootstrap (assay.base_image).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import docker
from docker.errors import BuildError

from assay.base_image import BASE_IMAGE, ImageBuildError, OnStep, ensure_base_image
from assay.demo.data import MODEL_FEATURES, train_models

__all__ = ["BASE_IMAGE", "DemoImages", "ImageBuildError", "build_demo_images", "ensure_base_image"]

PREPARATOR_TAG = "assay-demo/preparator:1"
EVALUATOR_TAG = "assay-demo/evaluator:1"
MODEL_TAG = "assay-demo/model-{name}:1"
IMAGES_DIR = Path(__file__).parent / "images"


@dataclass(frozen=True)
class DemoImages:
    preparator: str  # image ids, sha256:...
    evaluator: str
    models: Mapping[str, str]  # model name -> image id


def _silent(_: str) -> None:
    pass


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
