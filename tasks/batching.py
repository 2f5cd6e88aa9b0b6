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
from tasks.embedding import (
    Embedded,
    EmbedRequest,
    Result,
    Vectors,
    embed_skills,
    fetch_vectors,
    write_vectors,
)
from tasks.errors import EmbedderError, FailedInBatch, TransientError
from tasks.retry import describe
from tasks.runtime import Runtime

logger = logging.getLogger(__name__)

BatchResults = dict[str, Result]
AHEAD_BATCHES = 16


def embed_in_run(rt: Runtime, run_id: str, request: EmbedRequest) -> str | EmbedderError:
    """The job's outcome once recorded (by its batch or an earlier one), or the error to settle."""
    ledger = rt.batches
    skill_id = request.skill_id
    outcome = ledger.confirm(run_id, skill_id)
    future = None if outcome is not None else ledger.in_flight(run_id, skill_id)
    if outcome is None and future is None:
        recorded = _recorded_in_database(rt, run_id, skill_id)
        if recorded is not None:
            outcome, detail = recorded
            if outcome == runs.FAILED:
                return FailedInBatch(detail or f"skill {skill_id!r} failed in its batch")
        else:
            with unscoped(rt.sessions) as session:
                claimed = runs.claim_items(
                    session, run_id, rt.settings.embed_batch_size, including=skill_id
                )
            if not claimed or claimed[0][0] != skill_id:
                # Not an item of that run (a hand-made message): embed it on its own.
                [alone] = embed_skills(rt, [request])
                return alone if isinstance(alone, EmbedderError) else alone.outcome.value
            future = _submit(rt, run_id, claimed, force=request.force)
    result = future.result()[skill_id] if future is not None else None
    if isinstance(result, EmbedderError):
        # Settled (retried or failed) before anything claims its item again.
        return result
    claim_ahead(rt, run_id, force=request.force)
    if isinstance(result, Embedded):
        return result.outcome.value
    assert outcome is not None
    return outcome


def _recorded_in_database(rt: Runtime, run_id: str, skill_id: str) -> tuple[str, str | None] | None:
    with unscoped(rt.sessions) as session:
        return runs.item_outcome(session, run_id, skill_id)


def claim_ahead(rt: Runtime, run_id: str, *, force: bool) -> None:
    """Keep batches of the run in flight while this process confirms (or queues) its jobs.

    Bounded twice: at most the ledger's depth in flight, and at most AHEAD_BATCHES batches
    recorded whose jobs have not come yet, so a process never runs far ahead of its queue.
    """
    ledger = rt.batches
    if not ledger.claiming.acquire(blocking=False):
        return  # another thread of this process is claiming right now
    try:
        size = rt.settings.embed_batch_size
        while ledger.has_room() and ledger.unconfirmed() < AHEAD_BATCHES * size:
            with unscoped(rt.sessions) as session:
                claimed = runs.claim_items(session, run_id, size)
            if not claimed:
                return
            _submit(rt, run_id, claimed, force=force)
    finally:
        ledger.claiming.release()


def _submit(
    rt: Runtime, run_id: str, claimed: list[tuple[str, str]], *, force: bool
) -> Future[BatchResults]:
    requests = [EmbedRequest(skill_id, tenant, force) for skill_id, tenant in claimed]
    future = rt.batches.submit(
        run_id,
        [r.skill_id for r in requests],
        lambda: fetch_vectors(rt, requests, urgent=False),
        lambda vectors: _write_and_record(rt, run_id, requests, vectors),
    )
    future.add_done_callback(lambda done: _carry_on(rt, run_id, done, force=force))
    return future


def _carry_on(rt: Runtime, run_id: str, done: Future[BatchResults], *, force: bool) -> None:
    """A batch that went through claims the next; while Ollama fails, only jobs claim, at the
    pace of their retries."""
    error = done.exception()
    if error is not None:
        # Nobody may wait on a batch claimed ahead: say why it died; its jobs redo the work.
        logger.error("A batch of run %s failed", run_id, exc_info=error)
        return
    if not any(isinstance(result, TransientError) for result in done.result().values()):
        claim_ahead(rt, run_id, force=force)


def _write_and_record(
    rt: Runtime, run_id: str, requests: list[EmbedRequest], vectors: Vectors
) -> BatchResults:
    """Write and record a fetched batch; an item that may succeed later goes back to its job."""
    results = write_vectors(rt, vectors)
    pairs = list(zip(requests, results, strict=True))
    done = [
        (request.skill_id, result.outcome.value, result.name)
        for request, result in pairs
        if isinstance(result, Embedded)
    ]
    progress = ProgressLog(rt)
    retry = []
    for request, result in pairs:
        if isinstance(result, TransientError):
            retry.append(request.skill_id)
        elif isinstance(result, EmbedderError):
            # Retrying cannot help: record it now, so its own job fails with the reason.
            progress.failed(run_id, request.skill_id, describe(result), retries=0)
    if retry:
        with unscoped(rt.sessions) as session:
            runs.release_claims(session, run_id, retry)
    progress.finished_many(run_id, done)
    rt.batches.remember(run_id, [(skill_id, outcome) for skill_id, outcome, _ in done])
    return {request.skill_id: result for request, result in pairs}
