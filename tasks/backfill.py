"""Backfill and reconcile: choose in SQL what needs work, fan out one job per skill, count it."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task
from kombu import Producer

from db import run_starts, runs, services
from db.session import scope_to_tenant, tenant_scope, unscoped
from tasks.closing import RunCloser
from tasks.embedding import tenant_config
from tasks.errors import (
    BackfillBusy,
    DatabaseUnavailable,
    DimensionMismatch,
    EmbedderError,
    OllamaNotReady,
    UnknownTenant,
    database_error,
)
from tasks.progress import ProgressLog
from tasks.queues import BULK
from tasks.runtime import Runtime

logger = logging.getLogger(__name__)


# Redis commands a producer buffers before one round trip: a fan-out chunk of 500 jobs (each a
# message and its task-sent event) goes in one.
PUBLISH_BATCH = 1000
# The embed_skill task, handed in by tasks.jobs so this module does not import it back.
Enqueuer = Task[..., Any]
# Queues the rest of a fan-out: (run_id, force, the last item queued).
Continuation = Callable[[str, bool, runs.ItemKey], None]


def _enabled_tenants(rt: Runtime, only: str | None) -> list[str]:
    with unscoped(rt.sessions) as session:
        tenants = services.list_active_tenants(session)
    if only is not None:
        if only not in tenants:
            raise UnknownTenant(f"tenant {only!r} does not exist or is not active: check the id")
        tenants = [only]
    enabled = []
    for tenant in tenants:
        with tenant_scope(rt.sessions, tenant) as session:
            if tenant_config(rt, session, tenant).enabled:
                enabled.append(tenant)
    return enabled


def preflight(rt: Runtime, tenants: list[str]) -> None:
    """Every Ollama the tenants use is up, has the model, and makes vectors the column holds."""
    column = rt.column_dimensions
    checked: set[tuple[str, str, int]] = set()
    for tenant in tenants:
        with tenant_scope(rt.sessions, tenant) as session:
            config = tenant_config(rt, session, tenant)
        key = (config.ollama_url, config.model, config.dimensions)
        if key in checked:
            continue
        checked.add(key)
        if column is not None and config.dimensions != column:
            raise DimensionMismatch(
                f"tenant {tenant!r} is set to {config.dimensions} dimensions but"
                f" skill_embeddings.embedding is vector({column}): fix"
                " site_settings.embedding_dimensions or EMBEDDING_DIMENSIONS"
            )
        try:
            rt.ollama.for_url(config.ollama_url).preflight(
                model=config.model, dimensions=config.dimensions
            )
        except EmbedderError as exc:
            raise OllamaNotReady(f"Backfill refused: {exc}") from None


def ensure_default_tenant_enabled(rt: Runtime) -> None:
    """The seed plan's step: the default tenant has a settings row with semantic search on."""
    tenant = rt.settings.default_tenant_id
    with unscoped(rt.sessions) as session:
        if tenant not in services.list_active_tenants(session):
            return
    with tenant_scope(rt.sessions, tenant) as session:
        row = services.get_site_settings(session, tenant)
        if row is None:
            # The app embeds search queries with the same model and size. The URL stays at the
            # app's default, which means "each worker's own OLLAMA_URL": workers on several
            # hosts each use their own Ollama, and the app keeps its own.
            services.update_site_settings(
                session,
                tenant,
                semantic_similarity_enabled=True,
                ollama_model=rt.settings.ollama_model,
                embedding_dimensions=rt.settings.embedding_dimensions,
            )
        elif not row.semantic_similarity_enabled:
            services.update_site_settings(session, tenant, semantic_similarity_enabled=True)


def start_backfill(
    rt: Runtime,
    task: Enqueuer,
    run_id: str | None,
    tenant_id: str | None,
    force: bool,
    *,
    before_fanout: Callable[[str], None] | None = None,
    continue_later: Continuation | None = None,
    retry_later: Callable[[str, bool, FanOutInterrupted], None] | None = None,
) -> dict[str, Any]:
    """Preflight, record the run, fan out one bulk job per skill that needs work.

    `before_fanout(run_id)` runs once the run's items are recorded, before the first job is
    queued: the worker uses it to start embedding while the jobs are still being queued.
    `continue_later` is passed on to `fan_out`; `retry_later` takes over a fan-out the
    database interrupted (else the error is raised).
    """
    run_id = run_id or str(uuid.uuid4())
    if tenant_id in (None, rt.settings.default_tenant_id):
        ensure_default_tenant_enabled(rt)
    tenants = _enabled_tenants(rt, tenant_id)
    preflight(rt, tenants)
    published = queued = 0
    closed: runs.RunState | None = None
    # The run and all its items in one transaction: a worker killed while fanning out leaves
    # either nothing or the whole run, and the redelivered message resumes the fan-out.
    with unscoped(rt.sessions) as session:
        run_starts.lock_starts(session)
        open_run = None
        if runs.get_run(session, run_id) is None:
            open_run = run_starts.open_run_overlapping(session, run_id, tenant_id)
        if open_run is not None:
            return _join(open_run, run_id, tenant_id, force, len(tenants))
        if runs.create_run(session, run_id, tenant_id, force):
            for tenant in tenants:
                scope_to_tenant(session, tenant)
                config = tenant_config(rt, session, tenant)
                counts = runs.add_tenant_items(
                    session,
                    run_id,
                    tenant,
                    model=config.model,
                    dimensions=config.dimensions,
                    force=force,
                )
                published += counts[0]
                queued += counts[1]
            if not queued:
                # Nothing to send: the counts just taken are the catalog at the run's end (this
                # transaction's snapshot), so it closes here, without a second pass over the
                # tenants' catalogs.
                closed = runs.mark_fanned_out(session, run_id)
        else:
            run = runs.get_run(session, run_id)
            assert run is not None
            published, queued = run.total, runs.pending_count(session, run_id)
            if run.fanned_out:  # delivered again after its jobs were all queued
                return {"run_id": run_id, "tenants": len(tenants), "total": published,
                        "queued": queued}  # fmt: skip
            logger.info("Backfill %s was interrupted: resuming its fan-out", run_id)
    logger.info(
        "Backfill %s: %d published skills in %d tenants, %d to embed",
        run_id,
        published,
        len(tenants),
        queued,
    )
    if closed is not None:
        ProgressLog(rt).closed(closed)
        return {"run_id": run_id, "tenants": len(tenants), "total": published, "queued": 0}
    if before_fanout is not None and queued:
        before_fanout(run_id)
    try:
        fan_out(rt, task, run_id, force=force, continue_later=continue_later)
    except FanOutInterrupted as exc:
        if retry_later is None:
            raise
        retry_later(run_id, force, exc)
    return {"run_id": run_id, "tenants": len(tenants), "total": published, "queued": queued}


def _join(
    open_run: runs.RunState, run_id: str, tenant_id: str | None, force: bool, tenants: int
) -> dict[str, Any]:
    """A backfill started while another that holds its skills is open: each skill goes to
    Ollama once, so it joins that run (whose summary answers both), or is refused."""
    scope = f"tenant {open_run.tenant_id}" if open_run.tenant_id else "every tenant"
    if not run_starts.covers(open_run, tenant_id, force):
        forced = ", force" if open_run.force else ""
        raise BackfillBusy(
            f"Backfill refused: backfill {open_run.id} ({scope}{forced})"
            " is still running and holds some of these skills: start this one after its summary"
        )
    logger.info(
        "Backfill %s joins backfill %s (%s), still running: its summary answers both",
        run_id,
        open_run.id,
        scope,
        extra={"run_id": open_run.id},
    )
    return {"run_id": open_run.id, "joined": run_id, "tenants": tenants,
            "total": open_run.total, "queued": 0}  # fmt: skip


def fan_out(
    rt: Runtime,
    task: Enqueuer,
    run_id: str,
    *,
    force: bool,
    after: runs.ItemKey | None = None,
    continue_later: Continuation | None = None,
) -> None:
    """Queue one bulk job per item of the run in queue order, from just after `after`.

    With `continue_later`, one chunk now and `continue_later(run_id, force, last_key)` for the
    rest: the worker queues that as a job behind the chunk, so a job from the app never waits
    behind more than a chunk of fan-out, and the queue holds about a chunk at a time.
    """
    chunk = rt.settings.backfill_chunk_size
    try:
        while True:
            with unscoped(rt.sessions) as session:
                items = runs.items_after(session, run_id, after, chunk)
            # No database call from here to the end of the chunk: a database error leaves
            # either none of it queued or all of it, and `after` says which.
            with publishing(task) as producer:
                for skill_id, tenant, _ in items:
                    _queue_job(task, producer, run_id, skill_id, tenant, force=force)
            if items:
                after = (items[-1][1], items[-1][2])
            if len(items) < chunk:
                break
            if continue_later is not None and after is not None:  # a full chunk: always
                continue_later(run_id, force, after)
                return
        with unscoped(rt.sessions) as session:
            finished = runs.mark_fanned_out(session, run_id, RunCloser(rt))
    except Exception as exc:
        error = database_error(exc)
        if error is None:
            raise
        raise FanOutInterrupted(after, error) from exc
    if finished is not None:
        ProgressLog(rt).closed(finished)


class FanOutInterrupted(Exception):
    """The database failed during a fan-out: every job up to `after` is queued, none past it."""

    def __init__(self, after: runs.ItemKey | None, error: DatabaseUnavailable) -> None:
        super().__init__(str(error))
        self.after, self.error = after, error


def enqueue_pending(rt: Runtime, task: Enqueuer, run_id: str, *, force: bool) -> int:
    """Queue a bulk job for each of the run's items without an outcome, streaming from SQL."""
    count = 0
    with unscoped(rt.sessions) as session, publishing(task) as producer:
        for skill_id, tenant in runs.iter_pending_items(session, run_id):
            _queue_job(task, producer, run_id, skill_id, tenant, force=force)
            count += 1
    return count


@contextmanager
def publishing(task: Enqueuer) -> Iterator[Producer]:
    """One producer whose messages (and their task-sent events) go to Redis in pipelines of
    up to PUBLISH_BATCH commands: half the CPU of a round trip per message. Messages not yet
    flushed when the block raises are dropped, never half-sent."""
    with task.app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH):
        yield producer


def _queue_job(
    task: Enqueuer, producer: Producer, run_id: str, skill_id: str, tenant: str, *, force: bool
) -> None:
    kwargs = {"skill_id": skill_id, "tenant_id": tenant, "run_id": run_id}
    task.apply_async(
        kwargs={**kwargs, "force": True} if force else kwargs, queue=BULK, producer=producer
    )


def reconcile_catalog(rt: Runtime, task: Enqueuer, *, bulk_waiting: int = 0) -> dict[str, int]:
    """Heal what a lost message, an emptied Redis or a long outage left behind.

    Rows of unpublished skills go at once. Re-queuing waits until the bulk lane is empty
    (`bulk_waiting == 0`): while jobs wait there, they are the plan, not something lost.
    """
    with unscoped(rt.sessions) as session:
        tenants = services.list_active_tenants(session)
        pruned = runs.prune_finished(session, rt.settings.run_retention_days * 86400)
    if pruned:
        logger.info(
            "Reconcile: pruned %d %s finished more than RUN_RETENTION_DAYS (%g) days ago",
            pruned,
            "run" if pruned == 1 else "runs",
            rt.settings.run_retention_days,
        )
    removed = 0
    for tenant in tenants:
        with tenant_scope(rt.sessions, tenant) as session:
            removed += services.remove_unpublished_embeddings(session, tenant)
    if bulk_waiting:
        logger.info("Reconcile: bulk jobs still queued or retrying, re-queuing nothing")
        return {"removed": removed, "requeued": 0, "queued": 0}
    requeued = 0
    with unscoped(rt.sessions) as session:
        unfinished = runs.unfinished_runs(session)
    for run in unfinished:
        requeued += enqueue_pending(rt, task, run.id, force=run.force)
        if not run.fanned_out:
            # Its fan-out step was lost with the queue: every pending job is queued now.
            with unscoped(rt.sessions) as session:
                finished = runs.mark_fanned_out(session, run.id, RunCloser(rt))
            if finished is not None:
                ProgressLog(rt).closed(finished)
    queued = 0
    for tenant in _enabled_tenants(rt, None):
        with tenant_scope(rt.sessions, tenant) as session:
            config = tenant_config(rt, session, tenant)
            needing = services.skills_needing_embedding(
                session,
                tenant,
                model=config.model,
                dimensions=config.dimensions,
                exclude_pending_runs=True,
            )
            with publishing(task) as producer:
                for skill_id in needing:
                    task.apply_async(
                        kwargs={"skill_id": skill_id, "tenant_id": tenant},
                        queue=BULK,
                        producer=producer,
                    )
                    queued += 1
    if removed or requeued or queued:
        logger.info(
            "Reconcile: removed %d rows of unpublished skills, re-queued %d run jobs,"
            " queued %d missing or stale skills",
            removed,
            requeued,
            queued,
        )
    return {"removed": removed, "requeued": requeued, "queued": queued}
