"""What task bodies need (settings, database sessions, Ollama clients), built once per process."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import Engine, text

from db.session import SessionFactory, make_engine, make_session_factory
from tasks.ledger import BatchLedger
from tasks.ollama import OllamaClients

if TYPE_CHECKING:
    from tasks.embedding import Result


class TaskSettings(Protocol):
    """The settings the tasks read; `worker.settings.Settings` provides them."""

    @property
    def database_url(self) -> str: ...
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
    def ollama(self) -> OllamaClients:
        return OllamaClients(timeout=self.settings.ollama_timeout_seconds)

    @cached_property
    def batches(self) -> BatchLedger[dict[str, Result]]:
        """The background thread that embeds a run's batches ahead of their jobs."""
        return BatchLedger()

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

    def stop_batches(self) -> None:
        """Before the process exits: finish the batches in flight, claim no more."""
        if "batches" in self.__dict__:
            self.batches.close()

    def reset(self) -> None:
        """Drop connections (after a fork: a child must not share its parent's sockets).

        A fork copies no threads either: the child starts its own batch threads on first use.
        """
        for name in ("engine", "sessions", "ollama", "batches", "column_dimensions"):
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
