"""The scheduling service: `faststream run scheduling.main:create_app --factory`."""

from __future__ import annotations

from datetime import timedelta

from contracts.signing import KeyPair
from scheduling.config import Settings
from scheduling.handlers import WIRING, Dispatch
from scheduling.models import TABLES
from service_kit.app import ServiceApp, service_app


def create_app(settings: Settings | None = None) -> ServiceApp:
    settings = settings or Settings()
    dispatch = Dispatch(KeyPair.load(settings.key_file), timedelta(days=settings.job_ttl_days))
    return service_app(WIRING, settings, TABLES, context={"dispatch": dispatch})
