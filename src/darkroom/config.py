"""Settings: one object, built once (env `DARKROOM_*`, then CLI flags) and passed down. No module-level globals."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Limits(BaseModel):
    """Every request limit in one place; each violation is a 4xx naming the field."""

    max_width: int = 2048
    max_height: int = 2048
    max_pixels: int = 2048 * 2048
    min_side: int = 64
    max_steps: int = 150
    max_n: int = 8
    max_prompt_chars: int = 4000
    max_upload_bytes: int = 16 * 1024 * 1024
    max_upload_pixels: int = 4096 * 4096
    max_guidance: float = 30.0
    max_queue_depth: int = 10_000


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DARKROOM_", env_nested_delimiter="__", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("darkroom-data")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite in the data dir")
    models_dir: Path | None = Field(default=None, description="default: <data_dir>/models")
    public_url: str | None = Field(default=None, description="base URL clients use to fetch images")

    workers: int = 1
    worker_id: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    pipeline_cache_size: int = 2

    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    poll_seconds: float = 0.5
    progress_interval: float = 0.1
    max_attempts: int = 3
    sync_timeout_seconds: float = 600.0
    create_default_model: bool = True

    limits: Limits = Field(default_factory=Limits)

    @property
    def resolved_models_dir(self) -> Path:
        return (self.models_dir or self.data_dir / "models").resolve()

    @property
    def blobs_dir(self) -> Path:
        return (self.data_dir / "blobs").resolve()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'darkroom.db').resolve()}"
