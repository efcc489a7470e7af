"""Runs one Assay process: `python -m assay.serve registry|approval|scheduling|leaderboard|site`."""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import sys
import threading
import time
from typing import Any

ENDING_S = 10.0  # how long a process may take to end once its app has shut down


def main(kind: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app = build(kind)
    except (ValueError, OSError) as exc:  # a setting missing or wrong (pydantic's errors are ValueErrors): say which
        logging.getLogger("assay.serve").error("%s cannot start: %s", kind, exc)
        raise SystemExit(2) from None
    collect_less()
    asyncio.run(serve(app))


# the young generation's threshold (Python's default is 700): a leaderboard taking a fetch of results built that
# many objects every few results, and its collections of the young and middle generations took about 1 s of CPU in
# one `just bench` (the scheduler's 0.7 s); at 5,000 with what start-up built frozen, 0.4 s and 0.2 s (BENCHMARKS.md)
YOUNG_THRESHOLD = 5_000


def collect_less() -> None:
    """Garbage-collect less often: what start-up built (modules, schemas, the app) is frozen, never scanned again by
    the cyclic collector, and the young generation is collected after YOUNG_THRESHOLD allocations (each collection of
    it still takes a couple of milliseconds). Reference counting frees everything else as before."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 50, 50)


async def serve(app: Any) -> None:
    """Run the app until it is told to stop; then end, even when faststream left a task behind. A subscriber it was
    still starting when the stop came can keep a pull loop that spins on the closed connection and swallows every
    cancel (seen with SIGTERM during start-up): the app has shut down gracefully by then, so its process exits."""
    await app.run()
    exit_unless_ended(ENDING_S)
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    if others and (await asyncio.wait(others, timeout=5))[1]:
        logging.getLogger("assay.serve").warning("a task did not stop after the app shut down; exiting without it")
        logging.shutdown()
        os._exit(0)


def exit_unless_ended(seconds: float) -> None:
    """End the process `seconds` from now if it has not ended by itself: after the app shut down, what is left
    (asyncio's executor threads at the end of `asyncio.run`, a library's thread) must not keep it alive, which a
    supervisor's SIGTERM would then wait on (seen once in the compose test: shut down gracefully, never exited)."""
    def watchdog() -> None:
        time.sleep(seconds)
        alive = sorted(t.name for t in threading.enumerate() if t not in (threading.current_thread(),
                                                                           threading.main_thread()))
        logging.getLogger("assay.serve").warning("still running %.0f s after the app shut down (threads: %s); "
                                                 "exiting", seconds, ", ".join(alive) or "none")
        logging.shutdown()
        os._exit(0)

    threading.Thread(target=watchdog, name="assay-exit-watchdog", daemon=True).start()


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
