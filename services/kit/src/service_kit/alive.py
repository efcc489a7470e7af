"""A process's word that it is well, for a container's health check: while the bus answers a ping (and what else
the process needs answers too: its database, its Docker engine), a file is written again every few seconds; the
health check (`assay alive FILE`) says how long ago, and fails once it is too long."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)
Check = Callable[[], Awaitable[bool]]


async def keep_alive(path: Path, checks: list[Check], every_s: float = 5.0) -> None:
    """Write `path` again each round in which every check passes; a failing check is logged, once per change."""
    was_well = True
    while True:
        well = True
        for check in checks:
            try:
                well = well and bool(await check())
            except Exception as exc:  # what fails is the point of the check: it is said, and nothing is written
                well = False
                if was_well:
                    log.warning("health: %s failed: %s", getattr(check, "__name__", "a check"), exc)
        if well:
            partial = path.with_name(path.name + ".partial")
            partial.write_text(f"{time.time():.3f}\n")
            os.replace(partial, path)
        elif was_well:
            log.warning("health: not well; %s is not written again until it is", path)
        was_well = well
        await asyncio.sleep(every_s)


def unwell(path: Path, within_s: float, now: float | None = None) -> str | None:
    """Why the process that writes `path` is not well, or None: it never wrote it, or not within `within_s`."""
    try:
        written = float(path.read_text().strip())
    except (OSError, ValueError):
        return f"{path} was never written: the process has not been well since it started"
    age = (time.time() if now is None else now) - written
    return None if age <= within_s else f"{path} was last written {age:.0f} s ago (more than {within_s:.0f} s)"
