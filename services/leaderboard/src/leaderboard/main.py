"""Wires the leaderboard; run it with `faststream run leaderboard.main:create_app --factory`."""

from __future__ import annotations

from datetime import timedelta

from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter

from leaderboard.announce import Announcer
from leaderboard.config import Settings
from leaderboard.current import Boards
from leaderboard.handlers import WIRING, ParkingTerms
from leaderboard.models import TABLES
from service_kit.app import ServiceApp, service_app
from service_kit.work import Units


def create_app(settings: Settings | None = None, spans: SpanExporter | None = None,
               metric_reader: MetricReader | None = None) -> ServiceApp:
    """`spans`, `metric_reader`: where its telemetry goes (a test's; else OTLP where `otlp_endpoint` says)."""
    settings = settings or Settings()
    parking = ParkingTerms(wait=timedelta(minutes=settings.park_minutes))
    boards = Boards()  # one cache for the queries and the announcements: what one made, the other reuses

    def announcer(units: Units) -> Announcer:
        return Announcer(units, boards, window_s=settings.board_window_s)

    return service_app(WIRING, settings, TABLES, context={"parking": parking, "boards": boards}, spans=spans,
                       metric_reader=metric_reader, deferred=[announcer])
