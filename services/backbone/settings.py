"""Settings shared by every service, read from ``CRABGLAMP_*`` variables."""

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CRABGLAMP_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str = "postgresql+psycopg://crabglamp@127.0.0.1:5432/crabglamp"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    data_dir: Path = Path(".data")
    master_key_file: Path | None = None
    insecure_registries: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allow_registries: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_format: str = "console"
    log_level: str = "INFO"
    stream_replicas: int = 1
    request_timeout_s: float = 20.0
    deploy_workers: int = 1
    registry_timeout_s: float = 10.0
    vm_memory_mb: int = 128
    vm_cpus: int = 1
    vm_accel: str = "auto"

    @field_validator("insecure_registries", "allow_registries", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split(value)

    @property
    def resolved_master_key_file(self) -> Path:
        return self.master_key_file or self.data_dir / "master.key"
