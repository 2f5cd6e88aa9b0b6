"""A run's start, fan-out and close; the reconcile. Backfill and reconcile choose in SQL what
needs work, fan out one job per skill (tasks.loops embeds them in batches), and count it.

How a run ends: its summary counts what the catalog holds at the end, not what it planned.

Y is the published skills of the run's tenants at its end, X those of them current (whichever
job made them so), Z those that failed; the run's own skills that left the catalog are counted
apart. A published skill that is not current (edited after its batch, or published during the
run, its app job not yet done) goes back to the run, or joins it, and is embedded before the run
closes: so X + Z = Y, exactly. Skills current at the start are no item of the run: they are
counted from the catalog, so a run over a catalog that changed little writes little.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from celery import Task
from kombu import Producer
from sqlalchemy import Connection

from db import catalog, run_close, run_starts, runs
from db.sql import per_tenant, scope_to_tenant, tenant_scope, unscoped
from tasks import BULK
from tasks.embedding import check_tenant_dimensions, tenant_config
from tasks.progress import Closing, ProgressLog
from tasks.provider import ready
from tasks.retry import (
    BackfillBusy,
    DatabaseUnavailable,
    EmbedderError,
    OllamaNotReady,
    UnknownTenant,
    database_error,
)
from tasks.runtime import HOOKS, Runtime

logger = logging.getLogger(__name__)


# Redis commands a producer buffers before one round trip: a fan-out chunk of 500 jobs (each a
# message and its task-sent event) goes in one.
PUBLISH_BATCH = 1000
# The embed_skill task, handed in by tasks.jobs so this module does not import it back.
Enqueuer = Task[..., Any]
# Queues the rest of a fan-out: (run_id, force, the last item queued).
Continuation = Callable[[str, bool, runs.ItemKey], None]


def _enabled_tenants(rt: Runtime, only: str | None) -> list[str]:
    with unscoped(rt.engine) as conn:
        tenants = catalog.list_active_tenants(conn)
    if only is not None:
        if only not in tenants:
            raise UnknownTenant(f"tenant {only!r} does not exist or is not active: check the id")
        tenants = [only]
    enabled = []
    for tenant in tenants:
        with tenant_scope(rt.engine, tenant) as conn:
            if tenant_config(rt, conn, tenant).enabled:
                enabled.append(tenant)
    return enabled


def preflight(rt: Runtime, tenants: list[str]) -> None:
    """Every provider the tenants use is up, has the model, and makes vectors the column holds."""
    column = rt.column_dimensions
    checked: set[tuple[str, str, int]] = set()
    for tenant in tenants:
        with tenant_scope(rt.engine, tenant) as conn:
            config = tenant_config(rt, conn, tenant)
        key = (config.ollama_url, config.model, config.dimensions)
        if key in checked:
            continue
        checked.add(key)
        check_tenant_dimensions(tenant, config, column)
        try:
            ready(rt.providers.for_url(config.ollama_url), config.model,
                  configured=config.dimensions)  # fmt: skip
        except EmbedderError as exc:
            raise OllamaNotReady(f"Backfill refused: {exc}") from None


def survey_tenants(
    rt: Runtime, tenants: Sequence[str], *, force: bool
) -> dict[str, catalog.Survey]:
    """Each tenant's published skills and those that need work, one pass over its catalog. A
    skill edited after its tenant's pass has its own job, and the run's close counts the
    catalog again at its end."""

    def count(conn: Connection, tenant: str) -> catalog.Survey:
        config = tenant_config(rt, conn, tenant)
        return catalog.survey(conn, tenant, model=config.model, dimensions=config.dimensions,
                              force=force)  # fmt: skip

    return per_tenant(rt.engine, tenants, count)


def ensure_default_tenant_enabled(rt: Runtime) -> None:
    """The seed plan's step: the default tenant has a settings row with semantic search on."""
    tenant = rt.settings.default_tenant_id
    with unscoped(rt.engine) as conn:
        if tenant not in catalog.list_active_tenants(conn):
            return
    with tenant_scope(rt.engine, tenant) as conn:
        row = catalog.get_site_settings(conn, tenant)
        if row is None:
            # The app embeds search queries with the same model and size. The URL stays at the
            # app's default, which means "each worker's own OLLAMA_URL": workers on several
            # hosts each use their own Ollama, and the app keeps its own.
            catalog.update_site_settings(
                conn,
                tenant,
                semantic_similarity_enabled=True,
                ollama_model=rt.settings.ollama_model,
                embedding_dimensions=rt.settings.embedding_dimensions,
            )
        elif not row.semantic_similarity_enabled:
            catalog.update_site_settings(conn, tenant, semantic_similarity_enabled=True)


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
    survey = survey_tenants(rt, tenants, force=force)
    published = queued = 0
    closed: runs.RunState | None = None
    # The run and all its items in one transaction: a worker killed while fanning out leaves
    # either nothing or the whole run, and the redelivered message resumes the fan-out.
    with unscoped(rt.engine) as conn:
        run_starts.lock_starts(conn)
        open_run = None
        if runs.get_run(conn, run_id) is None:
            open_run = run_starts.open_run_overlapping(conn, run_id, tenant_id)
        if open_run is not None:
            return _join(open_run, run_id, tenant_id, force, len(tenants))
        if runs.create_run(conn, run_id, tenant_id, force):
            for tenant in tenants:
                counted = survey[tenant]
                runs.add_tenant_items(conn, run_id, tenant, counted.published, counted.needing)
                published += counted.published
                queued += len(counted.needing)
            if not queued:
                # Nothing to send: the counts just taken are the catalog at the run's end, so it
                # closes here, without a second pass over the tenants' catalogs.
                closed = runs.mark_fanned_out(conn, run_id)
        else:
            run = runs.get_run(conn, run_id)
            assert run is not None
            published, queued = run.total, runs.pending_count(conn, run_id)
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
        fan_out(rt, task, run_id, force=force, continue_later=continue_later,
                handed_back=before_fanout)  # fmt: skip
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
    handed_back: Callable[[str], None] | None = None,
) -> None:
    """Queue one bulk job per item of the run in queue order, from just after `after`.

    With `continue_later`, one chunk now and `continue_later(run_id, force, last_key)` for the
    rest: the worker queues that as a job behind the chunk, so a job from the app never waits
    behind more than a chunk of fan-out, and the queue holds about a chunk at a time.
    `handed_back(run_id)` starts embedding the items the run's close handed back, if the last
    chunk's end closed it.
    """
    chunk = rt.settings.backfill_chunk_size
    try:
        while True:
            with unscoped(rt.engine) as conn:
                items = runs.items_after(conn, run_id, after, chunk)
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
        with unscoped(rt.engine) as conn:
            closing = Closing(rt)
            finished = runs.mark_fanned_out(conn, run_id, closing)
    except Exception as exc:
        error = database_error(exc)
        if error is None:
            raise
        raise FanOutInterrupted(after, error) from exc
    if finished is not None:
        ProgressLog(rt).closed(finished, closing)
    elif closing.reopened and handed_back is not None:
        handed_back(run_id)


class FanOutInterrupted(Exception):
    """The database failed during a fan-out: every job up to `after` is queued, none past it."""

    def __init__(self, after: runs.ItemKey | None, error: DatabaseUnavailable) -> None:
        super().__init__(str(error))
        self.after, self.error = after, error


def enqueue_pending(rt: Runtime, task: Enqueuer, run_id: str, *, force: bool) -> int:
    """Queue a bulk job for each of the run's items without an outcome, streaming from SQL."""
    count = 0
    with unscoped(rt.engine) as conn, publishing(task) as producer:
        for skill_id, tenant in runs.iter_pending_items(conn, run_id):
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
    # A chunk is ~0.1 s of pure Python in the pool process, whose batch loop threads wait on
    # sockets meanwhile: each would then wait the GIL's switch interval at every read of an
    # answer (the convoy effect), and the model with them. A zero sleep hands them the GIL.
    time.sleep(0)


def reconcile_catalog(rt: Runtime, task: Enqueuer, *, bulk_waiting: int = 0) -> dict[str, int]:
    """Heal what a lost message, an emptied Redis or a long outage left behind.

    Rows of unpublished skills go at once. Re-queuing waits until the bulk lane is empty
    (`bulk_waiting == 0`): while jobs wait there, they are the plan, not something lost.
    """
    with unscoped(rt.engine) as conn:
        tenants = catalog.list_active_tenants(conn)
        pruned = runs.prune_finished(conn, rt.settings.run_retention_days * 86400)
    if pruned:
        logger.info(
            "Reconcile: pruned %d %s finished more than RUN_RETENTION_DAYS (%g) days ago",
            pruned,
            "run" if pruned == 1 else "runs",
            rt.settings.run_retention_days,
        )
    removed = sum(per_tenant(rt.engine, tenants, catalog.remove_unpublished_embeddings).values())
    if bulk_waiting:
        logger.info("Reconcile: bulk jobs still queued or retrying, re-queuing nothing")
        return {"removed": removed, "requeued": 0, "queued": 0}
    requeued = 0
    with unscoped(rt.engine) as conn:
        unfinished = runs.unfinished_runs(conn)
    for run in unfinished:
        requeued += enqueue_pending(rt, task, run.id, force=run.force)
        if not run.fanned_out:
            # Its fan-out step was lost with the queue: every pending job is queued now.
            with unscoped(rt.engine) as conn:
                closing = Closing(rt)
                finished = runs.mark_fanned_out(conn, run.id, closing)
            if finished is not None:
                ProgressLog(rt).closed(finished, closing)

    def stale(conn: Connection, tenant: str) -> list[str]:
        config = tenant_config(rt, conn, tenant)
        return list(catalog.skills_needing_embedding(conn, tenant, model=config.model,
                                                     dimensions=config.dimensions))  # fmt: skip

    queued = 0
    for tenant, needing in per_tenant(rt.engine, _enabled_tenants(rt, None), stale).items():
        with publishing(task) as producer:
            for skill_id in needing:
                task.apply_async(kwargs={"skill_id": skill_id, "tenant_id": tenant},
                                 queue=BULK, producer=producer)  # fmt: skip
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


class RunCloser:
    """A backfill's close (a tasks.progress.Closer): counts the live catalog, notes what it
    handed back."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.reopened: list[str] = []

    def closed(self, state: runs.RunState) -> None:
        """Nothing follows a backfill's summary."""

    def __call__(self, conn: Connection, run_id: str) -> runs.Final | None:
        tenants = run_close.run_tenants(conn, run_id)
        configs, items = {}, {}
        for tenant in tenants:
            scope_to_tenant(conn, tenant)
            config = configs[tenant] = tenant_config(self.rt, conn, tenant)
            items[tenant] = run_close.tally_items(
                conn, run_id, tenant, model=config.model, dimensions=config.dimensions
            )

        def outside(other: Connection, tenant: str) -> tuple[int, list[str]]:
            config = configs[tenant]
            return run_close.outside_items(
                other, run_id, tenant, model=config.model, dimensions=config.dimensions
            )

        # The pass over each tenant's catalog is most of a close's time in a large catalog, and
        # the run's row stays locked through it. It reads none of this transaction's writes
        # (the run's items), so with several tenants it runs on connections of its own, several
        # tenants at once; one tenant's pass stays in the transaction.
        if len(tenants) < 2:
            rest = {tenant: outside(conn, tenant) for tenant in tenants}
        else:
            rest = per_tenant(self.rt.readers, tenants, outside)
        tallies = [
            (tenant, replace(items[tenant], others=rest[tenant][0], arrived=rest[tenant][1]))
            for tenant in tenants
        ]
        redo = [skill_id for _, tally in tallies for skill_id in tally.redo]
        arrived = [(tenant, skill_id) for tenant, tally in tallies for skill_id in tally.arrived]
        if redo or arrived:
            others = sum(tally.others for _, tally in tallies)
            run_close.reopen(conn, run_id, redo, arrived, others)
            self.reopened = redo + [skill_id for _, skill_id in arrived]
            logger.info(
                "%d skills of run %s changed after their batch and %d were published during"
                " it: embedding them before the summary",
                len(redo),
                run_id,
                len(arrived),
                extra={"run_id": run_id},
            )
            return None
        counted = [tally for _, tally in tallies]
        return runs.Final(
            embedded=sum(t.embedded for t in counted),
            unchanged=sum(t.unchanged + t.others for t in counted),
            failed=sum(t.failed for t in counted),
            skipped=sum(t.skipped for t in counted),
            unpublished=sum(t.unpublished for t in counted),
            deleted=sum(t.deleted for t in counted),
        )


HOOKS.closers[runs.BACKFILL] = RunCloser
