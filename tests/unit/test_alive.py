"""The health check's rule: a process is well while it wrote its file lately, and writes it only while every check
passes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from service_kit.alive import keep_alive, unwell


def test_a_file_written_lately_is_well_an_old_or_missing_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "alive"
    assert unwell(path, 30) == f"{path} was never written: the process has not been well since it started"
    path.write_text(f"{time.time() - 5:.3f}\n")
    assert unwell(path, 30) is None
    assert unwell(path, 30, now=time.time() + 60) == f"{path} was last written 65 s ago (more than 30 s)"


async def test_the_file_is_written_only_while_every_check_passes(tmp_path: Path) -> None:
    path, answers = tmp_path / "alive", {"bus": True, "database": False}

    async def bus() -> bool:
        return answers["bus"]

    async def database() -> bool:
        if not answers["database"]:
            raise ConnectionError("the database is away")
        return True

    task = asyncio.create_task(keep_alive(path, [bus, database], every_s=0.01))
    await asyncio.sleep(0.05)
    never = path.exists()
    answers["database"] = True
    await asyncio.sleep(0.05)
    well = unwell(path, 1)
    task.cancel()
    assert not never and well is None
