"""The Celery tasks. Bodies stay short: load, decide, call, write live in their own modules."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task

from tasks import runtime
from tasks.backfill import ProgressLog, fan_out, reconcile_catalog, start_backfill
from tasks.batching import claim_ahead, embed_in_run
from tasks.embedding import EmbedRequest, Result, embed_skills
from tasks.errors import EmbedderError, PermanentError
from tasks.queues import BULK, EMBED_SKILL
from tasks.retry import backoff_seconds, describe, should_retry

logger = logging.getLogger(__name__)


@shared_task(
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
    skill_id: str,
    tenant_id: str | None = None,
    run_id: str | None = None,
    force: bool = False,
) -> str:
    """Bring one skill's embedding up to date; returns what happened (`embedded`, ...)."""
    rt = runtime.current()
    request = EmbedRequest(skill_id, tenant_id, force)
    if run_id is None:
        [result] = embed_skills(rt, [request])
        return settle(self, result, skill_id, run_id)
    outcome = embed_in_run(rt, run_id, request)
    if isinstance(outcome, str):
        return outcome  # recorded with its batch, which may have run before this job arrived
    return settle(self, outcome, skill_id, run_id)


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


@shared_task(name="tasks.backfill", bind=True, throws=(PermanentError,))
def backfill(
    self: Task[Any, Any], tenant_id: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Queue one `tasks.embed_skill` per published skill that needs one; returns the run at once."""
    rt = runtime.current()
    return start_backfill(
        rt,
        embed_skill,
        self.request.id,
        tenant_id,
        force,
        before_fanout=lambda run_id: claim_ahead(rt, run_id, force=force),
        continue_later=_continue_fan_out,
    )


@shared_task(name="tasks.fan_out", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def fan_out_rest(run_id: str, force: bool, after: list[Any]) -> None:
    """The next chunk of a backfill's jobs (queued behind the previous chunk)."""
    fan_out(
        runtime.current(),
        embed_skill,
        run_id,
        force=force,
        after=(str(after[0]), int(after[1])),
        continue_later=_continue_fan_out,
    )


def _continue_fan_out(run_id: str, force: bool, after: tuple[str, int]) -> None:
    fan_out_rest.apply_async(
        kwargs={"run_id": run_id, "force": force, "after": list(after)}, queue=BULK
    )


@shared_task(name="tasks.reconcile")
def reconcile() -> dict[str, int]:
    """Re-queue what is missing or stale and drop rows of unpublished skills (run by beat)."""
    return reconcile_catalog(runtime.current(), embed_skill, bulk_waiting=_waiting(BULK))


def _waiting(queue: str) -> int:
    """Messages waiting in a queue (not those a worker holds)."""
    with embed_skill.app.connection_for_read() as connection:
        try:
            channel: Any = connection.default_channel  # kombu's stubs lack queue_declare
            return int(channel.queue_declare(queue, passive=True).message_count)
        except connection.channel_errors:
            return 0
