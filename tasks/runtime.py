"""What task bodies need, built once per process: settings, the database, Redis, the providers,
the crash counts; and the hooks through which a capability plugs into the pipeline.

The runtime holds resources, not work: nothing here imports the modules that embed. A
capability beside the live path (the model switch, tasks.switch) registers itself in `HOOKS`:
what a kind of run writes to and how it closes, what the recovery pass does for it, what follows
a live write. The live path calls the hooks and knows nothing of what they do.

Crash counts: embeddings begun and not ended, per item. A process counts each item while the
provider embeds it and its answer is read, and takes the count back once that is over, whatever
the outcome (a job from the app counts its own skill from its first look to its write:
tasks.app_lane). A count that stays is a death: the process was killed (out of memory, a crash
in native code) in the middle of it. Counts live in Redis, so every worker of the deployment
sees them, and expire a day after their last use.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Protocol

import redis
from sqlalchemy import Engine

from db.sql import column_dimensions, end_if_silent, make_engine
from tasks.provider import Providers

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from db.runs import RunState
    from tasks.embedding import EmbedRequest, Result, WriteTarget
    from tasks.progress import Closer

logger = logging.getLogger(__name__)


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


APP_JOBS = "app"  # the key for jobs outside any run
COUNT_SECONDS = 86400  # a run's counts expire this long after their last use
QUIET_SECONDS = 10.0  # between two lines about the same outage


class CrashCounts:
    """Per run (or APP_JOBS), per skill: how many processes died while embedding it."""

    def __init__(self, client: redis.Redis, *, prefix: str = "embedder:unfinished") -> None:
        self._redis = client
        self._prefix = prefix
        self._quiet_until = 0.0

    def key(self, run_id: str | None) -> str:
        """The hash of the run's counts (for a script that reads them with other keys)."""
        return f"{self._prefix}:{run_id or APP_JOBS}"

    def deaths(self, run_id: str | None, skill_ids: Sequence[str]) -> dict[str, int]:
        if not skill_ids:
            return {}
        counts = self._redis.hmget(self.key(run_id), list(skill_ids))
        return {s: int(c) for s, c in zip(skill_ids, counts, strict=True) if c is not None}

    def begin(self, run_id: str | None, skill_ids: Sequence[str]) -> None:
        if not skill_ids:
            return
        key = self.key(run_id)
        pipe = self._redis.pipeline(transaction=False)
        for skill_id in skill_ids:
            pipe.hincrby(key, skill_id, 1)
        pipe.expire(key, COUNT_SECONDS)
        pipe.execute()

    def end(
        self,
        run_id: str | None,
        skill_ids: Sequence[str],
        *,
        done: bool,
        pipe: redis.client.Pipeline | None = None,
    ) -> None:
        """The items' batch ended and this process lives: done, they are cleared; else the count
        goes back to the deaths alone. With `pipe`, the commands join it and its caller sends
        them with its own."""
        if not skill_ids:
            return
        key = self.key(run_id)
        queue = self._redis.pipeline(transaction=False) if pipe is None else pipe
        if done:
            queue.hdel(key, *skill_ids)
        else:
            for skill_id in skill_ids:
                queue.hincrby(key, skill_id, -1)
        if pipe is None:
            queue.execute()

    def begin_quietly(self, run_id: str | None, skill_ids: Sequence[str]) -> None:
        """`begin`, or, with Redis away, one line per outage: the items go uncounted."""
        try:
            self.begin(run_id, skill_ids)
        except redis.RedisError as exc:
            self._unavailable(exc)

    def end_quietly(self, run_id: str | None, skill_ids: Sequence[str]) -> None:
        """`end` of a batch that lived (its deaths stay); with Redis away the count stays, and
        a later claim sends these items alone, as after a death."""
        try:
            self.end(run_id, skill_ids, done=False)
        except redis.RedisError as exc:
            self._unavailable(exc)

    @contextmanager
    def embedding(
        self, run_id: str | None, skill_ids: Sequence[str], *, clear_on_success: bool = False
    ) -> Iterator[None]:
        """Count the items for the block; with `clear_on_success`, a block that ends without an
        error forgets their earlier deaths too.

        Redis failing does not stop the block: the items go uncounted (a death then goes
        unnoticed), and what the block fetched is written all the same.
        """
        try:
            self.begin(run_id, skill_ids)
        except redis.RedisError as exc:
            self._unavailable(exc)
            yield
            return
        done = False
        try:
            yield
            done = clear_on_success
        finally:
            try:
                self.end(run_id, skill_ids, done=done)
            except redis.RedisError as exc:
                # The count stays: a later claim sends these items alone, as after a death.
                self._unavailable(exc)

    def _unavailable(self, exc: redis.RedisError) -> None:
        now = time.monotonic()
        if now >= self._quiet_until:  # one line per outage and interval, not one per batch
            self._quiet_until = now + QUIET_SECONDS
            logger.warning("Cannot count embeddings in flight: Redis did not answer (%s)", exc)


@dataclass
class Runtime:
    settings: TaskSettings
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.database_url)

    @cached_property
    def readers(self) -> Engine:
        """Connections of their own for a run's close to read other tenants while its
        transaction holds the run's row: the pool's connections may all be held by batches and
        by jobs that wait for that row."""
        return make_engine(self.settings.database_url, pooled=False)

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
    def providers(self) -> Providers:
        # Imported on first use: a command that only reads the database (`status`) loads no
        # HTTP client.
        from tasks.ollama import OllamaClients
        from tasks.slots import OllamaSlots

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

    @property
    def hooks(self) -> Hooks:
        return HOOKS

    def hold_claims(self, conn: Connection) -> None:
        """Begin a batch's transaction: if its process stops answering (frozen, cut off),
        PostgreSQL ends it, and its claims, after `claim_seconds` of silence."""
        end_if_silent(conn, self.claim_seconds)

    @cached_property
    def column_dimensions(self) -> int | None:
        """The size of `skill_embeddings.embedding`, as the database declares it."""
        return column_dimensions(self.engine)

    def reset(self) -> None:
        """Drop connections (after a fork: a child must not share its parent's sockets)."""
        for name in ("engine", "readers", "providers", "redis", "crashes", "column_dimensions"):
            resource = self.__dict__.pop(name, None)
            if isinstance(resource, Engine):
                resource.dispose(close=False)


# What a run of some kind writes to (its batches' target) and how it closes, per kind; a kind
# with no entry is the live one (a backfill: tasks.embedding.LiveTarget, tasks.backfill.RunCloser).
TargetFactory = Callable[["Runtime", "Connection", "RunState"], "WriteTarget"]
CloserFactory = Callable[["Runtime"], "Closer"]


@dataclass
class Hooks:
    """Where capabilities beside the live path plug in; each registers itself at import."""

    targets: dict[str, TargetFactory] = field(default_factory=dict)
    closers: dict[str, CloserFactory] = field(default_factory=dict)
    # Each recovery pass (every RECOVERY_INTERVAL_SECONDS, in every worker process).
    recovery: list[Callable[[Runtime], None]] = field(default_factory=list)
    # After an app job's live write committed: its requests and their results.
    after_live_write: list[Callable[[Runtime, Sequence[EmbedRequest], Sequence[Result]], None]] = (
        field(default_factory=list)
    )


HOOKS = Hooks()


_current: Runtime | None = None


def install(settings: TaskSettings) -> Runtime:
    global _current
    _current = Runtime(settings)
    return _current


def current() -> Runtime:
    if _current is None:
        raise RuntimeError("tasks.runtime is not installed: load the Celery app with -A worker")
    return _current
