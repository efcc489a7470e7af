"""A service's health check against a real nats-server: well while the bus answers, unwell (and `assay alive`
says why) once it is gone."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

import nats

from contracts.streams import ensure_streams
from service_kit.alive import unwell
from tests.conftest import serving_nats
from tests.support.federation import Federation


async def until(condition, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.2)):
        if condition():
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the condition never held")


def alive(path: Path, within: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "assay", "alive", str(path), "--within", str(within)],
                          capture_output=True, text=True, timeout=60)


async def test_a_service_is_well_while_its_bus_answers_and_says_so_no_longer_once_it_is_gone(tmp_path: Path):
    path = tmp_path / "registry-alive"
    with serving_nats(tmp_path / "nats") as url:
        nc = await nats.connect(url)
        await ensure_streams(nc.jetstream())
        await nc.close()
        fed = Federation(url, tmp_path, lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db",
                         connection={"alive_file": path})
        await fed.start_services()
        await until(lambda: unwell(path, 6) is None)
        well = await asyncio.to_thread(alive, path, 30)
    try:
        await until(lambda: unwell(path, 2) is not None)  # the bus is gone: nothing writes it any more
        gone = await asyncio.to_thread(alive, path, 2)
    finally:
        with contextlib.suppress(Exception):  # the bus is gone on purpose: the apps cannot unsubscribe from it
            await fed.stop()

    assert well.returncode == 0 and "written within 30 s" in well.stdout
    assert gone.returncode == 1 and "was last written" in " ".join(gone.stderr.split())
