"""The Celery tasks: where an item's life starts (its job) and ends (its result or retry).

A skill's life, top to bottom: `embed_skill` here -> an app job embeds its skill with the app's
jobs waiting behind it (tasks.app_lane), a run's job finds its outcome recorded or takes part in
its run's batches (tasks.loops: claim -> fetch -> write) -> load, decide, fetch, write
(tasks.embedding) -> the outcome and summary lines (tasks.progress). Bodies stay short.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery import Task, shared_task
from celery.worker.request import Request

from db import claims, runs
from db.sql import unscoped
from tasks import BULK, EMBED_SKILL, loops, runtime
from tasks.app_lane import embed_app_job
from tasks.arguments import CheckedTask, Identifier
from tasks.backfill import FanOutInterrupted, fan_out, reconcile_catalog, start_backfill
from tasks.embedding import Embedded, EmbedRequest, Result, embed_skills, skill_name
from tasks.loops import claim, fetch, recorded_here, write
from tasks.progress import ProgressLog
from tasks.retry import (
    EmbedderError,
    FailedInBatch,
    PermanentError,
    WorkerDied,
    backoff_seconds,
    database_error,
    describe,
    redis_error,
    should_retry,
)
from tasks.switch import STAGE_SWITCH, Stager, begin_staging, start_switch

logger = logging.getLogger(__name__)


class EmbedJob(Request):
    """How the worker's main process handles an embed job whose pool process died under it."""

    def on_failure(
        self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        if isinstance(exc_info.exception, WorkerLostError):
            given_up = give_up_after_deaths(self.kwargs or {}, list(self.args or []))
            if given_up is not None:
                # A failure, not a loss: the message is acknowledged instead of requeued.
                exc_info = ExceptionInfo((WorkerDied, given_up, None))
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


def give_up_after_deaths(kwargs: dict[str, Any], args: list[Any]) -> WorkerDied | None:
    """The job's skill killed EMBED_MAX_DELIVERIES processes: record it failed, say why."""
    rt = runtime.current()
    skill_id = str(kwargs.get("skill_id") or (args[0] if args else ""))
    run_id = kwargs.get("run_id")
    deaths = rt.crashes.deaths(run_id or runtime.APP_JOBS, [skill_id]).get(skill_id, 0)
    if deaths < rt.settings.embed_max_deliveries:
        return None
    error = WorkerDied(deaths, skill_name(rt, skill_id, kwargs.get("tenant_id")))
    ProgressLog(rt).failed(run_id, skill_id, describe(error), retries=0)
    return error


class EmbedTask(CheckedTask):
    Request = "tasks.jobs:EmbedJob"


@shared_task(
    base=EmbedTask,
    name=EMBED_SKILL,
    bind=True,
    # Expected failures: Flower shows the reason; the log gets our one line, not a traceback.
    throws=(EmbedderError,),
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def embed_skill(
    self: Task[Any, Any],
    skill_id: Identifier,
    tenant_id: Identifier | None = None,
    *,
    run_id: Identifier | None = None,
    force: bool = False,
) -> str:
    """Bring one skill's embedding up to date; returns what happened (`embedded`, ...)."""
    rt = runtime.current()
    request = EmbedRequest(skill_id, tenant_id, force)
    try:
        if run_id is not None:
            outcome = embed_item(rt, run_id, request)
            if isinstance(outcome, str):
                return outcome  # recorded by its batch, which may have run before this job came
            return settle(self, outcome, skill_id, run_id)
        result, served = embed_app_job(rt, request, self.request.id)
        if served:  # more of the burst is likely waiting: embed it while these jobs confirm
            loops.lane_ahead(rt).ensure()
    except Exception as exc:
        # A cut connection, a deadlock, a timeout, Redis away: retried like Ollama being down.
        error = database_error(exc) or redis_error(exc)
        if error is None:
            raise
        result = error
    return settle(self, result, skill_id, run_id)


def embed_item(rt: runtime.Runtime, run_id: str, request: EmbedRequest) -> str | EmbedderError:
    """A run job: its item's outcome, recorded by whichever batch embeds it (maybe this job's)."""
    skill_id = request.skill_id
    recorded = recorded_here.take(run_id, skill_id)
    if recorded is None:
        with unscoped(rt.engine) as conn:
            recorded = claims.item_outcome(conn, run_id, skill_id)
    if recorded is not None:
        return _settled(skill_id, *recorded)
    loops.loops(rt).ensure(run_id, force=request.force)
    while True:
        batch = claim(rt, run_id, force=request.force, including=skill_id)
        if batch is not None:
            fetch(batch)
            results = write(batch)
            if batch.reopened:  # the run's close handed items back: the loop embeds them
                loops.loops(rt).ensure(run_id, force=request.force)
            result = results[batch.skill_ids.index(skill_id)]
            return result.outcome.value if isinstance(result, Embedded) else result
        # Another batch holds the item: wait for it to end, then see what it recorded.
        with unscoped(rt.engine) as conn:
            state = claims.wait_for_item(conn, run_id, skill_id, timeout_seconds=rt.claim_seconds)
        if state is None:  # not an item of that run (a hand-made message): embed it alone
            [alone] = embed_skills(rt, [request])
            return alone.outcome.value if isinstance(alone, Embedded) else alone
        if state[0] is not None:
            return _settled(skill_id, state[0], state[1])


def _settled(skill_id: str, outcome: str, detail: str | None) -> str | EmbedderError:
    if outcome == runs.FAILED:
        return FailedInBatch(detail or f"skill {skill_id!r} failed in its batch")
    return outcome


def settle(task: Task[Any, Any], result: Result, skill_id: str, run_id: str | None) -> str:
    """Retry, fail or record one job's result, and log the line an operator reads."""
    rt = runtime.current()
    settings = rt.settings
    retries = int(task.request.retries or 0)
    if isinstance(result, EmbedderError):
        if should_retry(result, retries, settings.embed_max_retries):
            delay = backoff_seconds(
                retries,
                base=settings.embed_retry_backoff_seconds,
                cap=settings.embed_retry_backoff_max_seconds,
            )
            logger.info("Retrying %s in %.1f s: %s", skill_id, delay, describe(result))
            raise task.retry(exc=result, countdown=delay, max_retries=settings.embed_max_retries)
        ProgressLog(rt).failed(run_id, skill_id, describe(result), retries)
        raise result
    # Only a job outside a run gets here with a result: a run's outcomes go with its batch.
    ProgressLog(rt).finished(result.outcome.value, result.name)
    return result.outcome.value


@shared_task(name="tasks.backfill", base=CheckedTask, bind=True, throws=(PermanentError,))
def backfill(
    self: Task[Any, Any], tenant_id: Identifier | None = None, force: bool = False
) -> dict[str, Any]:
    """Queue one `tasks.embed_skill` per published skill that needs one; returns the run at once."""
    rt = runtime.current()
    return start_backfill(
        rt,
        embed_skill,
        self.request.id,
        tenant_id,
        force,
        before_fanout=lambda run_id: loops.loops(rt).ensure(run_id, force=force),
        continue_later=_continue_fan_out,
        retry_later=_retry_fan_out,
    )


@shared_task(
    name="tasks.fan_out",
    base=CheckedTask,
    bind=True,
    throws=(EmbedderError,),
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def fan_out_rest(
    self: Task[Any, Any], run_id: Identifier, force: bool, after: list[Any] | None
) -> None:
    """The next chunk of a backfill's jobs (queued behind the previous chunk)."""
    rt = runtime.current()
    try:
        fan_out(
            rt,
            embed_skill,
            run_id,
            force=force,
            after=(str(after[0]), int(after[1])) if after else None,
            continue_later=_continue_fan_out,
            handed_back=lambda run: loops.loops(rt).ensure(run, force=force),
        )
    except FanOutInterrupted as exc:
        retries = int(self.request.retries or 0)
        if retries >= rt.settings.embed_max_retries:
            # The run stays open: the reconcile (the worker's catch-up, or beat) queues the rest.
            logger.warning("Fan-out of run %s stopped: %s", run_id, exc.error,
                           extra={"run_id": run_id})  # fmt: skip
            raise exc.error from None
        delay = _fan_out_backoff(rt, retries)
        logger.warning("Fan-out of run %s paused: %s; retrying in %.1f s", run_id, exc.error,
                       delay, extra={"run_id": run_id})  # fmt: skip
        # Resume after the last job queued: a retried chunk queues none of them again.
        raise self.retry(
            kwargs={"run_id": run_id, "force": force, "after": _key(exc.after)},
            exc=exc.error,
            countdown=delay,
            max_retries=rt.settings.embed_max_retries,
        ) from None


def _retry_fan_out(run_id: str, force: bool, exc: FanOutInterrupted) -> None:
    """The backfill's own chunk met a database error: a fan-out job takes over, after a pause."""
    delay = _fan_out_backoff(runtime.current(), 0)
    logger.warning("Fan-out of run %s paused: %s; retrying in %.1f s", run_id, exc.error, delay,
                   extra={"run_id": run_id})  # fmt: skip
    fan_out_rest.apply_async(
        kwargs={"run_id": run_id, "force": force, "after": _key(exc.after)},
        queue=BULK,
        countdown=delay,
    )


def _fan_out_backoff(rt: runtime.Runtime, retries: int) -> float:
    settings = rt.settings
    return backoff_seconds(
        retries,
        base=settings.embed_retry_backoff_seconds,
        cap=settings.embed_retry_backoff_max_seconds,
    )


def _key(after: tuple[str, int] | None) -> list[Any] | None:
    return list(after) if after is not None else None


def _continue_fan_out(run_id: str, force: bool, after: tuple[str, int]) -> None:
    fan_out_rest.apply_async(
        kwargs={"run_id": run_id, "force": force, "after": list(after)}, queue=BULK
    )


@shared_task(name="tasks.reconcile", base=CheckedTask)
def reconcile() -> dict[str, int]:
    """Re-queue what is missing or stale and drop rows of unpublished skills (run by beat, and by
    the worker's catch-up)."""
    return reconcile_catalog(runtime.current(), embed_skill, bulk_waiting=_bulk_jobs())


def _bulk_jobs() -> int:
    """Bulk jobs waiting in their queue, or at least one held by a worker (running, or waiting
    out a retry's countdown): while there are any, they are the plan, not something lost."""
    with embed_skill.app.connection_for_read() as connection:
        channel: Any = connection.default_channel  # kombu's stubs lack queue_declare
        try:
            waiting = int(channel.queue_declare(BULK, passive=True).message_count)
        except connection.channel_errors:
            waiting = 0
        if waiting:
            return waiting
        # Kombu's Redis transport keeps each held message as [message, exchange, routing key].
        key, client = getattr(channel, "unacked_key", None), getattr(channel, "client", None)
        if key is None or client is None:
            return 0
        for _, held in client.hscan_iter(key, count=500):
            with contextlib.suppress(ValueError, IndexError, TypeError):
                if json.loads(held)[2] == BULK:
                    return 1
    return 0


def _stager(rt: runtime.Runtime) -> Stager:
    return Stager(
        embed_skill,
        before_fanout=lambda run_id: loops.loops(rt).ensure(run_id, force=False),
        continue_later=_continue_fan_out,
    )


@shared_task(name="tasks.switch_model", base=CheckedTask, throws=(PermanentError,))
def switch_model(model: Identifier, tenant_id: Identifier | None = None) -> dict[str, Any]:
    """Stage `model`'s vectors for a tenant (or every active one, in turn), then swap them in."""
    rt = runtime.current()
    return start_switch(rt, model, tenant_id, _stager(rt))


@shared_task(
    name=STAGE_SWITCH,
    base=CheckedTask,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def stage_switch(tenant_id: Identifier) -> str | None:
    """Start (or top up) the staging run of the tenant's switch; nothing if one is running."""
    rt = runtime.current()
    return begin_staging(rt, tenant_id, _stager(rt))
