"""What several integration tests share: the four real services on a real nats-server, with the `assay` command's
state folder pointing at that bus (a module that needs another federation defines its own `federation`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.federation import Federation


@pytest.fixture
async def federation(nats_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    fed = Federation(nats_url, tmp_path, lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db")
    await fed.start_services()
    (tmp_path / "platform.json").write_text(json.dumps({"nats_url": nats_url}))
    yield fed
    await fed.stop()
