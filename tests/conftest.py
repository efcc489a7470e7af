"""Shared fixtures: a real nats-server per test, Docker and PostgreSQL presence (required in CI, never skipped there)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import nats
import pytest

from assay.platform import read_ports_file
from contracts.streams import ensure_streams

IN_CI = os.environ.get("CI") == "true"


def require(condition: bool, what: str) -> None:
    """Skip on a developer machine that lacks `what`; fail in CI, where .ci/run must have provided it."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI and missing: .ci/run must install and start it")
    pytest.skip(f"{what} is not available on this machine")


def docker_available() -> bool:
    try:
        import docker

        docker.from_env().ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def docker_client():  # type: ignore[no-untyped-def]
    require(docker_available(), "a running Docker engine")
    import docker

    return docker.from_env()


def nats_binary() -> str:
    return shutil.which("nats-server") or str(Path(sys.prefix, "bin", "nats-server"))


@contextmanager
def serving_nats(store: Path, config: str | None = None) -> Iterator[str]:
    """A JetStream server on a random loopback port, storing in `store` (made here); with `config` (users,
    permissions) as its configuration file. Its client URL; it is stopped when the block ends."""
    store.mkdir()
    args = ["-js", "-sd", str(store)]
    if config is not None:
        (store / "nats.conf").write_text(f'jetstream {{\n  store_dir: "{store}"\n}}\n' + config)
        args = ["-c", str(store / "nats.conf")]
    proc = subprocess.Popen([nats_binary(), *args, "-a", "127.0.0.1", "-p", "-1", "--ports_file_dir", str(store)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = ""
        for _ in range(1000):
            url = read_ports_file(store)
            if url:
                break
            time.sleep(0.01)
        assert url, "nats-server did not start"
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """A fresh JetStream server on a random loopback port, with the Assay streams declared."""
    with serving_nats(tmp_path / "nats") as url:

        async def provision() -> None:
            nc = await nats.connect(url)
            await ensure_streams(nc.jetstream())
            await nc.close()

        asyncio.run(provision())
        yield url


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(nats_url)
    yield nc.jetstream()
    await nc.close()


# --- PostgreSQL: a private cluster on a random port, as the `postgres` user (initdb refuses root) -----------------


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """Base URL (no database) of a throwaway PostgreSQL cluster with trust auth on loopback."""
    from _pytest.mark.expression import Expression

    from tests.support.postgres import private_postgres, server_binaries

    selected = request.config.option.markexpr
    if selected and not Expression.compile(selected).evaluate(lambda name: name == "postgres"):
        pytest.fail(f"a test without the postgres marker started PostgreSQL under -m {selected!r}: mark it")
    bindir = server_binaries()
    require(bindir is not None, "PostgreSQL server binaries (apt-get install postgresql)")
    assert bindir is not None
    with private_postgres(bindir) as url:
        yield url


async def new_database(server: str) -> str:
    """A fresh database on the private cluster; returns its SQLAlchemy URL."""
    import uuid

    import asyncpg

    name = "t_" + uuid.uuid4().hex[:12]
    conn = await asyncpg.connect(server.replace("postgresql+asyncpg", "postgresql") + "/postgres")
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    return f"{server}/{name}"
