"""The service's settings: built once from the environment (and an optional `.env`), handed down."""

from __future__ import annotations

import re
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.environment import DEFAULT_REDIS_URL, ENV_FILE, ConfigError, check_redis_url

__all__ = ["ConfigError", "Settings", "mask_url"]

DEFAULT_TENANT = "default-tenant-000-0000-000000000000"


def normalise_database_url(raw: str) -> str:
    """The web app's URL (`postgres://`, `postgresql://`, `?host=/socket-dir`) for psycopg 3."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    value = raw.strip()
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in {"postgres", "postgresql", "postgresql+psycopg"}:
        raise ValueError("expected postgresql://user:password@host:5432/dbname")
    try:
        url = make_url(f"postgresql+psycopg://{rest}")
    except ValueError:
        raise ValueError("the port is not a number") from None
    except ArgumentError as exc:
        raise ValueError(f"cannot parse it ({exc})") from None
    if not url.database:
        raise ValueError("it names no database (…/dbname)")
    if not url.host and "host" not in url.query:
        raise ValueError("it names no host (a hostname, or ?host=/path/to/socket-dir)")
    return url.render_as_string(hide_password=False)


def mask_url(url: str) -> str:
    """The URL with its password replaced, for logs and messages."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


class Settings(BaseSettings):
    """Environment variables (upper case) and their defaults: the README's configuration table."""

    model_config = SettingsConfigDict(env_file=ENV_FILE, extra="ignore", frozen=True)

    database_url: str
    redis_url: str = DEFAULT_REDIS_URL
    ollama_url: str = "http://localhost:11434"
    ollama_model: str = "nomic-embed-text"
    embedding_dimensions: int = Field(default=768, ge=1, le=16000)
    default_tenant_id: str = DEFAULT_TENANT
    ollama_timeout_seconds: float = Field(default=10.0, gt=0)
    ollama_max_concurrency: int = Field(default=1, ge=1, le=64)
    embed_max_retries: int = Field(default=8, ge=0)
    embed_retry_backoff_seconds: float = Field(default=2.0, gt=0)
    embed_retry_backoff_max_seconds: float = Field(default=300.0, gt=0)
    embed_batch_size: int = Field(default=32, ge=1, le=512)
    embed_max_deliveries: int = Field(default=3, ge=1)
    recovery_interval_seconds: float = Field(default=10.0, gt=0)
    backfill_chunk_size: int = Field(default=500, ge=1)
    reconcile_interval_seconds: float = Field(default=600.0, gt=0)
    # 60 s: a job refused during a broker outage is queued at most ~75 s after it is back.
    catch_up_interval_seconds: float = Field(default=60.0, ge=0.1, le=3600)
    # Finished runs (and their items) are kept this long, for `status` and for a person asking
    # what a run did; the newest run is always kept.
    run_retention_days: float = Field(default=30.0, gt=0, le=36500)
    broker_visibility_timeout_seconds: int = Field(default=3600, ge=1)
    task_time_limit_seconds: int = Field(default=300, ge=1)
    flower_basic_auth: str | None = None
    task_events: bool = True
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # prometheus_client's own variable: where the pool's processes write their samples.
    prometheus_multiproc_dir: Path | None = None
    log_format: Literal["text", "json"] = "text"
    health_dir: Path = Path(tempfile.gettempdir()) / "everyskill-embedder-health"
    heartbeat_interval_seconds: float = Field(default=2.0, gt=0, le=60)
    # Celery's mingle and gossip between workers: nothing here uses them (README).
    worker_mingle_gossip: bool = False

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return normalise_database_url(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        return check_redis_url(value)

    @field_validator("ollama_url")
    @classmethod
    def _ollama_url(cls, value: str) -> str:
        parts = urlsplit(value)
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("the port is not a number") from None
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("expected http://host:11434")
        return value.rstrip("/")

    @field_validator("flower_basic_auth")
    @classmethod
    def _flower_basic_auth(cls, value: str | None) -> str | None:
        if value and any(":" not in pair for pair in value.split(",")):
            raise ValueError("expected user:password (several separated by commas)")
        return value or None

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _metrics_port(cls, value: object) -> object:
        return None if value == "" else value  # METRICS_PORT= (empty) means off, like unset

    @cached_property
    def masked_database_url(self) -> str:
        return mask_url(self.database_url)

    @classmethod
    def load(cls) -> Settings:
        """Read the environment; raise ConfigError with one line naming the variable."""
        try:
            return cls()
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    name = str(first["loc"][0]).upper() if first["loc"] else "configuration"
    if first["type"] == "missing":
        return f"{name} is not set: export {name}=... (see the README's configuration table)"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{name} is invalid: {message}"
