"""What a job is about, for its log lines and metrics; the Prometheus metrics task code moves
(the scrape-time ones are in worker/).

Metrics are created on first use, not at import: prometheus_client picks its multiprocess mode
when a metric is created, from PROMETHEUS_MULTIPROC_DIR, which the worker sets before it forks
its pool; importing this module from the web app's producer must not create anything either.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tasks import EMBED_SKILL

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

# The ids a job's arguments may carry, in `tasks.embed_skill`'s order (skill_id, tenant_id, run_id).
JOB_FIELDS = ("skill_id", "tenant_id", "run_id")
# The longest id a job may carry (tasks.arguments refuses longer ones); a log line never names
# a longer value as an id.
MAX_ID_LENGTH = 200


def job_fields() -> dict[str, str]:
    """task_id, skill_id, tenant_id and run_id of the current job, those it knows.

    Empty outside a job: Celery keeps its current task per thread, so a batch thread's lines
    name their ids with `extra=` instead.
    """
    # Celery's own, imported here: `python -m worker status` reads no job and loads no Celery.
    from celery import current_task

    task = current_task
    request = getattr(task, "request", None) if task else None
    task_id = getattr(request, "id", None)
    if not task_id:
        return {}
    fields = {"task_id": str(task_id)}
    # Positional arguments mean these ids only for embed_skill (the app's producers send them).
    args = list(getattr(request, "args", None) or ()) if task.name == EMBED_SKILL else []
    kwargs = dict(getattr(request, "kwargs", None) or {})
    for index, name in enumerate(JOB_FIELDS):
        value = kwargs.get(name, args[index] if index < len(args) else None)
        if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH:
            fields[name] = value
    return fields


UNKNOWN_TENANT = "unknown"
# Ollama answers a batch in a few hundred ms, a slow one up to the 10 s client timeout.
OLLAMA_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class _Metrics:
    embeddings: Counter
    ollama_seconds: Histogram
    refused: Counter


_metrics: _Metrics | None = None
_lock = threading.Lock()


def _get() -> _Metrics:
    global _metrics
    with _lock:
        if _metrics is None:
            from prometheus_client import Counter, Histogram

            _metrics = _Metrics(
                embeddings=Counter(
                    "embedder_embeddings",
                    "Skills whose job ended, by tenant and outcome (embedded, unchanged, failed)",
                    ["tenant", "outcome"],
                ),
                ollama_seconds=Histogram(
                    "embedder_ollama_request_seconds",
                    "Time of one request to Ollama, waiting for its answer",
                    buckets=OLLAMA_BUCKETS,
                ),
                refused=Counter(
                    "embedder_refused_messages",
                    "Messages the worker refused without running them, by reason"
                    " (not_json, bad_arguments, content_type, ...: tasks/refusals.py)",
                    ["reason"],
                ),
            )
        return _metrics


def count_outcomes(tenant_id: str | None, outcome: str, n: int = 1) -> None:
    """`n` skills of `tenant_id` ended with `outcome` (each counted once, where it is recorded)."""
    if n > 0:
        _get().embeddings.labels(tenant=tenant_id or UNKNOWN_TENANT, outcome=outcome).inc(n)


def count_job_outcome(outcome: str) -> None:
    """The current job's skill (outside any run) ended with `outcome`."""
    count_outcomes(job_fields().get("tenant_id"), outcome)


def count_refusal(reason: str) -> None:
    """One message refused for `reason` (set aside in Redis by tasks.refusals)."""
    _get().refused.labels(reason=reason).inc()


@contextmanager
def ollama_request_timer() -> Iterator[None]:
    """Times the request inside (an error's time is counted too: a timeout is the slow case)."""
    with _get().ollama_seconds.time():
        yield
