"""Runs one Assay process: `python -m assay.serve registry|approval|scheduling|leaderboard|site`."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys


def main(kind: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if kind == "site":
        import docker

        from site_worker.config import Settings
        from site_worker.containers import DockerRunner
        from site_worker.main import create_app

        settings = Settings()  # type: ignore[call-arg]
        app = create_app(settings, DockerRunner(docker.from_env(), worker=f"{settings.site_id}/{settings.worker_id}"))
    else:
        app = importlib.import_module(f"{kind}.main").create_app()
    asyncio.run(app.run())


if __name__ == "__main__":
    main(sys.argv[1])
