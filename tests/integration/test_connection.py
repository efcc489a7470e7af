"""How a process holds its NATS connection: a server that goes away is said in the log (without the password); a
connection the process closes itself is not a loss."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path

import nats
import pytest

from assay.platform import nats_server_binary, read_ports_file
from service_kit.connection import connection_options

LOST = "probe lost its connection to NATS at nats://127.0.0.1:"


async def test_a_lost_server_is_said_and_a_close_is_not(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "service_kit.connection")
    conf = tmp_path / "nats.conf"
    conf.write_text('authorization { users: [{user: "probe", password: "s3cret-of-the-probe"}] }\n')
    server = subprocess.Popen([nats_server_binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", "-1",
                               "--ports_file_dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (listening := read_ports_file(tmp_path)):
            await asyncio.sleep(0.01)
        url = listening.replace("nats://", "nats://probe:s3cret-of-the-probe@")

        closed = await nats.connect(url, **connection_options("probe", url))
        await closed.close()
        await asyncio.sleep(0.1)
        assert LOST not in caplog.text  # closing is not losing

        held = await nats.connect(url, **connection_options("probe", url))
        server.terminate()
        server.wait(10)
        async with asyncio.timeout(20):
            while LOST not in caplog.text or "probe cannot reach NATS" not in caplog.text:
                await asyncio.sleep(0.05)
        await held.close()
    finally:
        server.kill()
    assert "s3cret" not in caplog.text
