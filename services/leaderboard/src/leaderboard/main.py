"""Wires the leaderboard; run it with `faststream run leaderboard.main:create_app --factory`."""

from __future__ import annotations

from datetime import timedelta

from leaderboard.config import Settings
from leaderboard.current import Boards
from leaderboard.handlers import WIRING, ParkingTerms
from leaderboard.models import TABLES
from service_kit.app import ServiceApp, service_app


def create_app(settings: Settings | None = None) -> ServiceApp:
    settings = settings or Settings()
    parking = ParkingTerms(wait=timedelta(minutes=settings.park_minutes))
    return service_app(WIRING, settings, TABLES, context={"parking": parking, "boards": Boards()})
