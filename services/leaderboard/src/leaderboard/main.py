"""Wires the leaderboard; run it with `faststream run leaderboard.main:create_app --factory`."""

from __future__ import annotations

from leaderboard.config import Settings
from leaderboard.handlers import WIRING
from leaderboard.models import TABLES
from service_kit.app import ServiceApp, service_app


def create_app(settings: Settings | None = None) -> ServiceApp:
    return service_app(WIRING, settings or Settings(), TABLES)
