"""`assay images build`: the platform's images (assay-central:dev, assay-site:dev) on this machine's Docker engine
with no image registry and no network in the build (assay.images_build); `just images` runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

images_app = typer.Typer(help="The platform's own images: build them here, from local parts only.",
                         no_args_is_help=True)
console = Console()


@images_app.command("build")
def build(image: Annotated[list[str] | None, typer.Option(
              "--image", help="central or site; repeat for both (default: both)")] = None,
          base: Annotated[str | None, typer.Option(
              help="a local image with python3 and its venv module to build FROM (default: "
                   "assay/python-venv:bookworm, made from Debian packages with debootstrap when absent)")] = None,
          source: Annotated[Path, typer.Option(help="the Assay source tree")] = Path("."),
          work_dir: Annotated[Path | None, typer.Option(
              help="where the wheelhouse and the build context are kept (default: SOURCE/build/images)")] = None,
          ) -> None:
    """Build the platform's images as the demo builds its own: a local Python base, a wheelhouse made here with
    this host's pip (its index, its proxy and CA), then `docker build --network none` of compose/Dockerfile."""
    import docker
    from docker.errors import DockerException

    from assay.base_image import ImageBuildError
    from assay.images_build import build_platform_images

    try:
        client = docker.from_env()
        client.ping()
    except DockerException as error:
        console.print(f"[red]error:[/red] no Docker engine answers here ({escape(str(error))})")
        raise typer.Exit(1) from None
    try:
        built = build_platform_images(client, source, work_dir or source / "build" / "images", base=base,
                                      names=image or (), on_step=lambda s: console.print(f"[dim]·[/dim] {escape(s)}"))
    except (ImageBuildError, DockerException) as error:
        console.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None
    for tag, image_id in built.items():
        size = client.images.get(image_id).attrs["Size"] / 1e6
        console.print(f"[green]ok[/green] {tag} {image_id[:19]} ({size:.0f} MB)")
    console.print("compose runs them as they are: `docker-compose -f compose/central.yml up -d` (no --build)")
