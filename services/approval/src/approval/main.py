"""The approval service: `faststream run approval.main:create_app --factory`."""

from __future__ import annotations

from approval.config import Settings
from approval.handlers import WIRING
from approval.models import TABLES
from service_kit.app import ServiceApp, service_app


def create_app(settings: Settings | None = None) -> ServiceApp:
    return service_app(WIRING, settings or Settings(), TABLES)
