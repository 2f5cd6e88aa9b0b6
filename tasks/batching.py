"""Batching for backfills: a run's jobs are embedded a batch at a time, one batch ahead.

Every skill keeps its own queued job (retried, counted and visible in Flower on its own). The
first job of a run that finds its skill not yet done claims it and up to EMBED_BATCH_SIZE - 1
pending neighbours, embeds them in one `/api/embed` call and one upsert, and records their
outcomes; when a neighbour's own job arrives it finds its outcome recorded and returns at once.
While those jobs are confirmed, the process's background thread already embeds the next batch
it claimed, so the worker's own overhead per job overlaps Ollama's time instead of adding to it.

Claims are leases (`claimed_at`): a process that dies mid-batch leaves its items to their own
jobs. Jobs from the app carry no run and are never batched; they wait at most for the batch
Ollama is serving, never for one to fill.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

from db import runs
from db.session import unscoped
from tasks.backfill import ProgressLog
from tasks.embedding import Embedded, EmbedRequest, Result, embed_skills
from tasks.errors import EmbedderError
from tasks.runtime import Runtime

logger = logging.getLogger(__name__)

BatchResults = dict[str, Result]


def embed_in_run(rt: Runtime, run_id: str, request: EmbedRequest) -> str | EmbedderError:
    """The job's outcome once recorded (by its batch or an earlier one), or the error to settle."""
    ledger = rt.batches
    skill_id = request.skill_id
    outcome = ledger.recorded(run_id, skill_id)
    future = None if outcome is not None else ledger.in_flight(run_id, skill_id)
    if outcome is None and future is None:
        outcome = _recorded_in_database(rt, run_id, skill_id)
        if outcome is None:
            with unscoped(rt.sessions) as session:
                claimed = runs.claim_items(
                    session, run_id, rt.settings.embed_batch_size, including=skill_id
                )
            future = _submit(rt, run_id, claimed, force=request.force)
    result = future.result()[skill_id] if future is not None else None
    if isinstance(result, EmbedderError):
        # Settled (retried or failed) before anything claims its item again.
        return result
    _claim_next_batch(rt, run_id, force=request.force)
    if isinstance(result, Embedded):
        return result.outcome.value
    assert outcome is not None
    return outcome


def _recorded_in_database(rt: Runtime, run_id: str, skill_id: str) -> str | None:
    with unscoped(rt.sessions) as session:
        return runs.item_outcome(session, run_id, skill_id)


def _claim_next_batch(rt: Runtime, run_id: str, *, force: bool) -> None:
    """Keep one batch in flight while this process confirms the jobs of the last one."""
    if not rt.batches.idle():
        return
    with unscoped(rt.sessions) as session:
        claimed = runs.claim_items(session, run_id, rt.settings.embed_batch_size)
    if claimed:
        _submit(rt, run_id, claimed, force=force)


def _submit(
    rt: Runtime, run_id: str, claimed: list[tuple[str, str]], *, force: bool
) -> Future[BatchResults]:
    requests = [EmbedRequest(skill_id, tenant, force) for skill_id, tenant in claimed]
    return rt.batches.submit(
        run_id, [r.skill_id for r in requests], lambda: _embed_batch(rt, run_id, requests)
    )


def _embed_batch(rt: Runtime, run_id: str, requests: list[EmbedRequest]) -> BatchResults:
    """Embed and record a claimed batch; a failed item goes back to its own job to retry."""
    try:
        results = embed_skills(rt, requests)
        pairs = list(zip(requests, results, strict=True))
        done = [
            (request.skill_id, result.outcome.value, result.name)
            for request, result in pairs
            if isinstance(result, Embedded)
        ]
        failed = [request.skill_id for request, result in pairs if not isinstance(result, Embedded)]
        if failed:
            with unscoped(rt.sessions) as session:
                runs.release_claims(session, run_id, failed)
        ProgressLog(rt).finished_many(run_id, done)
        rt.batches.remember(run_id, [(skill_id, outcome) for skill_id, outcome, _ in done])
    except Exception:
        # Nobody may wait on a batch claimed ahead: say why it died; its jobs redo the work.
        logger.exception("A batch of %d skills of run %s failed", len(requests), run_id)
        raise
    return {request.skill_id: result for request, result in pairs}
