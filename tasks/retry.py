"""What fails, and whether it is tried again: one error tree, and the one retry policy.

The type carries the decision: a TransientError is retried later (Ollama or the database down,
Redis away), with a backoff that grows with jitter, until EMBED_MAX_RETRIES; a PermanentError
fails at once with its message, one sentence for a person that says what to fix. A job's
retries (tasks.jobs.settle) and a fan-out's (tasks.jobs.fan_out_rest) both ask here.
"""

from __future__ import annotations

import random

import psycopg
import redis
from sqlalchemy.exc import DBAPIError, OperationalError


class EmbedderError(Exception):
    """Base of the errors the worker raises on purpose; the message is one sentence for a person."""


class TransientError(EmbedderError):
    """Worth retrying: the same call may succeed later."""


class PermanentError(EmbedderError):
    """Retrying cannot help; the message says what to fix."""


class OllamaUnavailable(TransientError):
    """Ollama did not answer, or answered busy / with a server error."""


class ModelNotFound(PermanentError):
    """The model is not pulled on that Ollama."""


class ModelCannotEmbed(PermanentError):
    """The model exists but is not an embedding model."""


class OllamaRejected(PermanentError):
    """Ollama refused the request itself (400): retrying the same input fails the same way."""


class MalformedAnswer(TransientError):
    """Ollama (or a proxy in front of it) answered 200 with no usable list of vectors: not JSON,
    no `embeddings`, or fewer vectors than inputs. It says nothing about the inputs: retry."""


class BadEmbedding(PermanentError):
    """Ollama answered 200 with vectors we will not write: the wrong size, or not finite."""


class DimensionMismatch(PermanentError):
    """The model's vectors, the tenant's settings and the database column disagree on size."""


class SkillNotFound(PermanentError):
    """No skill with that id is visible to the tenant."""


class TenantMismatch(PermanentError):
    """The job names a tenant the skill does not belong to."""


class UnknownTenant(PermanentError):
    """No active tenant has that id."""


class OllamaNotReady(PermanentError):
    """The preflight before a backfill failed: nothing was queued."""


class BackfillBusy(PermanentError):
    """An open backfill holds some of the skills a new one would take, and does not cover it."""


class FailedInBatch(PermanentError):
    """A batch met this skill's permanent failure before its own job came; the message says why."""


class ModelSwitched(TransientError):
    """The tenant's model was swapped while this skill was embedded with the old one."""


class DatabaseUnavailable(TransientError):
    """PostgreSQL cut the connection, timed out or broke a deadlock: it may pass later."""


class WorkerDied(PermanentError):
    """The worker's process died each time it embedded this skill (out of memory, a crash)."""

    def __init__(self, deaths: int, name: str) -> None:
        super().__init__(f"the worker process died {deaths} times while embedding {name}")


class RedisUnavailable(TransientError):
    """Redis (crash counts, Ollama's slots) did not answer: it may be back later."""


def redis_error(exc: BaseException) -> RedisUnavailable | None:
    """The transient error a Redis failure stands for, or None if `exc` is not one."""
    if isinstance(exc, redis.RedisError):
        return RedisUnavailable(f"Redis did not answer: {_first_line(exc)}")
    return None


def database_error(exc: BaseException) -> DatabaseUnavailable | None:
    """The transient error a database failure stands for, or None if `exc` is not one.

    OperationalError covers a cut or terminated connection, a statement or lock timeout, a
    deadlock and a serialization failure; any error that invalidated the connection counts too.
    """
    if isinstance(exc, psycopg.OperationalError):  # raw, as SQLAlchemy's pool meets it
        return DatabaseUnavailable(f"the database failed: {_first_line(exc)}")
    if isinstance(exc, OperationalError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        reason = _first_line(exc.orig) if exc.orig else type(exc).__name__
        return DatabaseUnavailable(f"the database failed: {reason}")
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def should_retry(error: BaseException, retries: int, max_retries: int) -> bool:
    """Transient errors retry until the bound; everything else fails at once."""
    return isinstance(error, TransientError) and retries < max_retries


def backoff_seconds(retries: int, *, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [base/2, min(cap, base * 2**retries)]."""
    ceiling = min(cap, base * (2**retries))
    return random.uniform(min(base / 2, ceiling), ceiling)


def describe(error: BaseException) -> str:
    """The one line an operator reads in the log and in Flower."""
    if isinstance(error, EmbedderError):
        return str(error)
    return f"{type(error).__name__}: {error}"
