"""What task bodies need (settings, database sessions, Ollama clients), built once per process.

The runtime holds resources, not work: the loops that use it (tasks.run_loops) keep their own
state, so nothing here imports the modules that do the embedding.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import redis
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from db.session import SessionFactory, make_engine, make_session_factory
from tasks.crashes import CrashCounts
from tasks.ollama import OllamaClients
from tasks.slots import OllamaSlots


class TaskSettings(Protocol):
    """The settings the tasks read; `worker.settings.Settings` provides them."""

    @property
    def database_url(self) -> str: ...
    @property
    def redis_url(self) -> str: ...
    @property
    def ollama_max_concurrency(self) -> int: ...
    @property
    def embed_max_deliveries(self) -> int: ...
    @property
    def recovery_interval_seconds(self) -> float: ...
    @property
    def run_retention_days(self) -> float: ...
    @property
    def ollama_url(self) -> str: ...
    @property
    def ollama_model(self) -> str: ...
    @property
    def embedding_dimensions(self) -> int: ...
    @property
    def default_tenant_id(self) -> str: ...
    @property
    def ollama_timeout_seconds(self) -> float: ...
    @property
    def embed_max_retries(self) -> int: ...
    @property
    def embed_retry_backoff_seconds(self) -> float: ...
    @property
    def embed_retry_backoff_max_seconds(self) -> float: ...
    @property
    def embed_batch_size(self) -> int: ...
    @property
    def backfill_chunk_size(self) -> int: ...
    @property
    def catch_up_interval_seconds(self) -> float: ...


@dataclass
class Runtime:
    settings: TaskSettings
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.database_url)

    @cached_property
    def sessions(self) -> SessionFactory:
        return make_session_factory(self.engine)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(
            self.settings.redis_url, socket_timeout=5, socket_connect_timeout=5
        )

    @property
    def slot_lease_seconds(self) -> float:
        """How long a slot outlives a holder that died: one request timeout plus a margin for a
        live holder to read the answer and let go (half the timeout, at least a second)."""
        timeout = self.settings.ollama_timeout_seconds
        return timeout + max(1.0, timeout / 2)

    @property
    def claim_seconds(self) -> float:
        """The longest a batch may hold its items: every other holder of the slot served first
        (urgent jobs and batches, say a dozen leases), then its own request."""
        return 12 * self.slot_lease_seconds

    @cached_property
    def ollama(self) -> OllamaClients:
        slots = OllamaSlots(
            self.redis,
            limit=self.settings.ollama_max_concurrency,
            lease_seconds=self.slot_lease_seconds,
            wait_seconds=self.claim_seconds - self.slot_lease_seconds,
        )
        return OllamaClients(timeout=self.settings.ollama_timeout_seconds, slots=slots)

    @cached_property
    def crashes(self) -> CrashCounts:
        return CrashCounts(self.redis)

    def hold_claims(self, session: Session) -> None:
        """Begin a batch's transaction: if its process stops answering (frozen, cut off),
        PostgreSQL ends it, and its claims, after `claim_seconds` of silence."""
        session.execute(
            text("SELECT set_config('idle_in_transaction_session_timeout', :ms, true)"),
            {"ms": f"{int(self.claim_seconds * 1000)}ms"},
        )

    @cached_property
    def column_dimensions(self) -> int | None:
        """The size of `skill_embeddings.embedding`, as the database declares it."""
        with self.engine.connect() as connection:
            value = connection.execute(
                text(
                    "SELECT atttypmod FROM pg_attribute WHERE attname = 'embedding'"
                    " AND attrelid = to_regclass('skill_embeddings')"
                )
            ).scalar()
        return int(value) if value and value > 0 else None

    def reset(self) -> None:
        """Drop connections (after a fork: a child must not share its parent's sockets)."""
        for name in ("engine", "sessions", "ollama", "redis", "crashes", "column_dimensions"):
            resource = self.__dict__.pop(name, None)
            if isinstance(resource, Engine):
                resource.dispose(close=False)


_current: Runtime | None = None


def install(settings: TaskSettings) -> Runtime:
    global _current
    _current = Runtime(settings)
    return _current


def current() -> Runtime:
    if _current is None:
        raise RuntimeError("tasks.runtime is not installed: load the Celery app with -A worker")
    return _current
