"""The few settings a process needs to send a message, read without the full settings model.

`celery -A worker call`, Flower and the web app's tools load the Celery app only to talk to the
broker; validating every worker setting (pydantic, SQLAlchemy's URL parser) would cost them most
of their start. A worker validates everything when it starts (worker.settings, worker.serve).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
ENV_FILE = ".env"
T = TypeVar("T")


class ConfigError(Exception):
    """A setting is missing or malformed; the message is one line naming the variable."""


def load_or_exit(load: Callable[[], T]) -> T:
    """`load()`, or exit 2 with its one line: Celery would print a traceback instead."""
    try:
        return load()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None


def check_redis_url(value: str) -> str:
    """`value` if it is a Redis URL; ValueError saying what is wrong otherwise."""
    parts = urlsplit(value)
    if parts.scheme not in {"redis", "rediss", "unix", "redis+socket"}:
        raise ValueError("expected redis://host:6379/0")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError("the port is not a number") from None
    return value


@dataclass(frozen=True, slots=True)
class Messaging:
    """REDIS_URL and FLOWER_BASIC_AUTH, from the environment over an optional `.env`."""

    redis_url: str = DEFAULT_REDIS_URL
    flower_basic_auth: str | None = None

    @classmethod
    def load(cls) -> Messaging:
        """Read them; ConfigError with one line naming the variable when REDIS_URL is malformed."""
        values = _variables("REDIS_URL", "FLOWER_BASIC_AUTH")
        redis_url = values.get("REDIS_URL") or DEFAULT_REDIS_URL
        try:
            check_redis_url(redis_url)
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL is invalid: {exc}") from None
        return cls(redis_url, values.get("FLOWER_BASIC_AUTH") or None)


def _variables(*names: str) -> dict[str, str]:
    # Names are matched without regard to case, as the full settings (pydantic-settings) do.
    found: dict[str, str] = {}
    if Path(ENV_FILE).is_file():
        from dotenv import dotenv_values

        found.update({k.upper(): v for k, v in dotenv_values(ENV_FILE).items() if v is not None})
    found.update({k.upper(): v for k, v in os.environ.items() if k.upper() in names})
    return {name: found[name] for name in names if name in found}
