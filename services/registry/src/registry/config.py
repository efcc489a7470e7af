"""Registry settings (environment prefix ASSAY_REGISTRY_)."""

from pydantic_settings import SettingsConfigDict

from service_kit.app import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ASSAY_REGISTRY_")
    operator_id: str = "operator"
    operator_public_key: str = ""
