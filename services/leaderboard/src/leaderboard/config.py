"""The leaderboard's settings, read from ASSAY_LEADERBOARD_* environment variables when create_app builds them."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from service_kit.app import ServiceSettings


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ASSAY_LEADERBOARD_")

    database_url: str = "sqlite+aiosqlite:///assay-leaderboard.db"
    park_minutes: float = 10.0  # how long a result waits for its site's key or benchmark before it is rejected
    # a burst of results is announced once, this long after its first commit (`leaderboard.announce`): the
    # board is recomputed at most once per window, however many results it brings
    board_window_s: float = 0.25
