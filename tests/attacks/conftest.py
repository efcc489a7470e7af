"""The platform the attacks run against: the four real services on a real nats-server, on SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.federation import Federation


@pytest.fixture
async def federation(nats_url: str, tmp_path: Path) -> AsyncIterator[Federation]:
    fed = Federation(nats_url, tmp_path, lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db")
    await fed.start_services()
    yield fed
    await fed.stop()
