"""Each app as `create_app(test_settings(...))` under faststream's TestNatsBroker, on a SQLite file of its own.

A test names the app it needs (`registry`, ..., `site`), or parametrizes `app` indirectly with one of those names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from faststream import FastStream
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from site_worker.containers import FakeRunner
from tests.support.federation import fake_containers
from tests.support.service import Actors, Harness, running

SITE_METRICS = {"auc": 0.91, "sensitivity": 0.8}
APPS = ("registry", "approval", "scheduling", "leaderboard", "site")


def database(tmp_path: Path, name: str) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / name}.db"


def create(name: str, tmp_path: Path, actors: Actors, runner: FakeRunner,
           reader: InMemoryMetricReader | None = None) -> FastStream:
    """The app `name`, with test settings: a SQLite file, and keys the test's actors hold; its metrics in `reader`."""
    if name == "registry":
        from registry.config import Settings as RegistrySettings
        from registry.main import create_app as registry

        return registry(RegistrySettings(database_url=database(tmp_path, name), **actors.service_settings(name, tmp_path),
                                         operator_public_key=actors.key("operator").public_key), metric_reader=reader)
    if name == "approval":
        from approval.config import Settings as ApprovalSettings
        from approval.main import create_app as approval

        return approval(ApprovalSettings(database_url=database(tmp_path, name),
                                         **actors.service_settings(name, tmp_path)), metric_reader=reader)
    if name == "scheduling":
        from scheduling.config import Settings as SchedulingSettings
        from scheduling.main import create_app as scheduling

        return scheduling(SchedulingSettings(database_url=database(tmp_path, name),
                                             **actors.service_settings(name, tmp_path)), metric_reader=reader)
    if name == "leaderboard":
        from leaderboard.config import Settings as LeaderboardSettings
        from leaderboard.main import create_app as leaderboard

        return leaderboard(LeaderboardSettings(database_url=database(tmp_path, name),
                                               **actors.service_settings(name, tmp_path)), metric_reader=reader)
    assert name == "site", name
    from site_worker.config import Settings as SiteSettings
    from site_worker.images import FakeImageStore
    from site_worker.main import create_app as site

    policy = tmp_path / "policy.toml"
    if not policy.exists():  # these tests' site releases what passes its checks; test_site_review holds
        policy.write_text('[release]\nrule = "auto"\n')
    return site(SiteSettings(site_id="site-a", key_file=actors.save("site-a", tmp_path),
                             scheduler_public_key=actors.key("scheduling").public_key,
                             datasets_file=tmp_path / "datasets.json", work_dir=tmp_path / "jobs",
                             state_dir=tmp_path / "state", policy_file=policy), runner, images=FakeImageStore(),
                metric_reader=reader)


@asynccontextmanager
async def started(name: str, tmp_path: Path, actors: Actors, runner: FakeRunner,
                  reader: InMemoryMetricReader | None = None) -> AsyncIterator[Harness]:
    async with running(create(name, tmp_path, actors, runner, reader), actors) as harness:
        yield harness


@pytest.fixture
def actors() -> Actors:
    return Actors()


@pytest.fixture
def runner() -> FakeRunner:
    return fake_containers(SITE_METRICS)


@pytest.fixture
def metrics() -> InMemoryMetricReader:
    """What the test's app measured (each app reads its metrics into the test's reader)."""
    return InMemoryMetricReader()


@pytest.fixture
async def app(request: pytest.FixtureRequest, tmp_path: Path, actors: Actors, runner: FakeRunner,
              metrics: InMemoryMetricReader) -> AsyncIterator[Harness]:
    async with started(request.param, tmp_path, actors, runner, metrics) as harness:
        yield harness


def started_as(name: str):  # type: ignore[no-untyped-def]
    """A fixture that starts the app `name` for a test."""

    @pytest.fixture(name=name)
    async def fixture(tmp_path: Path, actors: Actors, runner: FakeRunner,
                      metrics: InMemoryMetricReader) -> AsyncIterator[Harness]:
        async with started(name, tmp_path, actors, runner, metrics) as harness:
            yield harness

    return fixture


registry, approval, scheduling, leaderboard, site = map(started_as, APPS)
