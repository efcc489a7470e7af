"""Each app as `create_app(test_settings(...))` under faststream's TestNatsBroker, on a SQLite file of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from site_worker.containers import FakeRunner
from tests.support.federation import fake_containers
from tests.support.service import Actors, Harness, running

SITE_METRICS = {"auc": 0.91, "sensitivity": 0.8}


def database(tmp_path: Path, name: str) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / name}.db"


@pytest.fixture
def actors() -> Actors:
    return Actors()


@pytest.fixture
async def registry(tmp_path: Path, actors: Actors) -> AsyncIterator[Harness]:
    from registry.config import Settings
    from registry.main import create_app

    settings = Settings(database_url=database(tmp_path, "registry"), operator_public_key=actors.key("operator").public_key)
    async with running(create_app(settings)) as harness:
        yield harness


@pytest.fixture
async def approval(tmp_path: Path) -> AsyncIterator[Harness]:
    from approval.config import Settings
    from approval.main import create_app

    async with running(create_app(Settings(database_url=database(tmp_path, "approval")))) as harness:
        yield harness


@pytest.fixture
async def scheduling(tmp_path: Path, actors: Actors) -> AsyncIterator[Harness]:
    from scheduling.config import Settings
    from scheduling.main import create_app

    actors.key("scheduling").save(tmp_path / "scheduling.key")
    settings = Settings(database_url=database(tmp_path, "scheduling"), key_file=tmp_path / "scheduling.key")
    async with running(create_app(settings)) as harness:
        yield harness


@pytest.fixture
async def leaderboard(tmp_path: Path) -> AsyncIterator[Harness]:
    from leaderboard.config import Settings
    from leaderboard.main import create_app

    async with running(create_app(Settings(database_url=database(tmp_path, "leaderboard")))) as harness:
        yield harness


@pytest.fixture
def runner() -> FakeRunner:
    return fake_containers(SITE_METRICS)


@pytest.fixture
async def site(tmp_path: Path, actors: Actors, runner: FakeRunner) -> AsyncIterator[Harness]:
    from site_worker.config import Settings
    from site_worker.main import create_app

    actors.key("site-a").save(tmp_path / "site-a.key")
    settings = Settings(site_id="site-a", key_file=tmp_path / "site-a.key",
                        scheduler_public_key=actors.key("scheduling").public_key,
                        datasets_file=tmp_path / "datasets.json", work_dir=tmp_path / "jobs")
    async with running(create_app(settings, runner)) as harness:
        yield harness
