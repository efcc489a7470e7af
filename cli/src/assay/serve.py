"""Runs one Assay process: `python -m assay.serve registry|approval|scheduling|leaderboard|site`."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from typing import Any


def main(kind: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app = build(kind)
    except (ValueError, OSError) as exc:  # a setting missing or wrong (pydantic's errors are ValueErrors): say which
        logging.getLogger("assay.serve").error("%s cannot start: %s", kind, exc)
        raise SystemExit(2) from None
    asyncio.run(app.run())


def build(kind: str) -> Any:
    if kind == "site":
        import docker

        from site_worker.config import Settings
        from site_worker.containers import DockerRunner
        from site_worker.main import create_app

        settings = Settings()  # type: ignore[call-arg]
        os.umask(0o077)  # what the worker writes (job records, failure logs with patient data) is its own alone
        return create_app(settings, DockerRunner(docker.from_env(), worker=f"{settings.site_id}/{settings.worker_id}"))
    return importlib.import_module(f"{kind}.main").create_app()


if __name__ == "__main__":
    main(sys.argv[1])
