"""A site worker process whose model container never finishes: the test kills it mid-job (`kill -9`)."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from site_worker.config import Settings
from site_worker.containers import RunOutcome, RunSpec
from site_worker.main import create_app
from tests.support.federation import fake_containers


def main() -> None:
    marker = Path(os.environ["HANGING_WORKER_MARKER"])
    runner = fake_containers({})

    def hang(spec: RunSpec) -> RunOutcome:
        marker.write_text(spec.task)
        threading.Event().wait()
        raise AssertionError("unreachable")

    runner.run = hang  # type: ignore[method-assign]
    asyncio.run(create_app(Settings(), runner).run())  # type: ignore[call-arg]


if __name__ == "__main__":
    main()
