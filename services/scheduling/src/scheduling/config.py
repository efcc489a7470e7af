"""Scheduling settings (environment prefix ASSAY_SCHEDULING_)."""

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from service_kit.app import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ASSAY_SCHEDULING_")
    key_file: Path = Path("scheduling.key")  # the scheduler signs every job it sends to a site
    job_ttl_days: float = 30.0  # a job waits this long for its site (which may be offline), then is never run
