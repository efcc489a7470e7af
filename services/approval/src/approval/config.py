"""Approval settings (environment prefix ASSAY_APPROVAL_)."""

from pydantic_settings import SettingsConfigDict

from service_kit.app import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ASSAY_APPROVAL_")
