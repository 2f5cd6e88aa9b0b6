"""A backfill's batches: in each worker process, one loop per run, claim -> fetch -> write.

Every skill of a run keeps its own queued job (retried, counted and shown in Flower on its own),
but the embedding is done here, a batch at a time, ahead of those jobs:

1. claim: lock up to EMBED_BATCH_SIZE pending items of the run, in queue order, with
   FOR UPDATE SKIP LOCKED, in a transaction that stays open for the whole batch. The row lock
   is the claim: other processes skip these items, and PostgreSQL frees them the moment this
   process dies or its connection is cut.
2. fetch: one `/api/embed` call per Ollama for the items that need a vector, taking the
   deployment's slot for that Ollama (tasks.slots).
3. write: in the same transaction, upsert the vectors, set each item's outcome and the run's
   counts, then commit. Either every item of the batch is recorded, or (a crash, a cut
   connection, a failed write) none is and all are free again for the next claim.

The write of one batch overlaps the fetch of the next. The loop stops when no item is free, when
the process shuts down, or after a batch meets a transient error (Ollama or the database down):
from then on the items' own jobs claim them, at the pace of their retries, and the first job
that gets through starts the loop again.

A job finds its item's outcome with one lookup by primary key; if it has none, the job claims
a batch led by its own item, or waits for the batch that holds it. A process that died while
embedding items is remembered per item (tasks.crashes): such an item goes alone next time, and
after EMBED_MAX_DELIVERIES deaths it is recorded failed instead of tried again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy.orm import Session

from db import runs
from db.session import unscoped
from tasks.backfill import ProgressLog
from tasks.embedding import (
    Batch,
    Embedded,
    EmbedRequest,
    Result,
    embed_skills,
    fetch_vectors,
    load_and_decide,
    write_vectors,
)
from tasks.errors import (
    EmbedderError,
    FailedInBatch,
    TransientError,
    WorkerDied,
    database_error,
)
from tasks.retry import describe
from tasks.runtime import Runtime

logger = logging.getLogger(__name__)


class RunBatch:
    """Claimed items of one run, their transaction (which holds the claims) and their results."""

    def __init__(self, rt: Runtime, run_id: str, session: Session, work: Batch) -> None:
        self.rt, self.run_id, self.session, self.work = rt, run_id, session, work
        self.skill_ids = [request.skill_id for request in work.requests]
        self.begun = [r.skill_id for r in work.requests if work.needs_vector(r)]
        rt.crashes.begin(run_id, self.begun)

    def end(self, *, written: bool = False) -> None:
        """Close the transaction (a rollback unless committed): the claims end with it."""
        self.session.close()
        self.rt.crashes.end(self.run_id, self.begun, done=written)


def claim(
    rt: Runtime, run_id: str, *, force: bool, including: str | None = None
) -> RunBatch | None:
    """Lock the run's next pending items (`including` first) and decide what each needs."""
    size, most = rt.settings.embed_batch_size, rt.settings.embed_max_deliveries
    session = rt.sessions()
    try:
        rt.hold_claims(session)
        claimed = runs.claim_items(session, run_id, size, including=including)
        deaths = rt.crashes.deaths(run_id, [skill_id for skill_id, _ in claimed])
        suspect = next((s for s, n in deaths.items() if 0 < n < most), None)
        if suspect is not None and len(claimed) > 1:
            # A process died while embedding it (or is dying: its connection is gone, its count
            # not yet): alone, it cannot take neighbours down again. A job takes its own item.
            alone = including or suspect
            session.rollback()
            rt.hold_claims(session)
            claimed = runs.claim_items(session, run_id, 1, including=alone)
            deaths = {alone: deaths[alone]} if alone in deaths else {}
        if not claimed:
            session.close()
            return None
        requests = [EmbedRequest(skill_id, tenant, force) for skill_id, tenant in claimed]
        work = load_and_decide(rt, session, requests)
        for skill_id, count in deaths.items():
            if count >= most:
                work.fail(skill_id, WorkerDied(count, work.name_of(skill_id)))
        return RunBatch(rt, run_id, session, work)
    except Exception as exc:
        session.close()
        logger.warning("Could not claim a batch of run %s: %s", run_id, _reason(exc))
        raise


def fetch(batch: RunBatch) -> bool:
    """Ask Ollama for the batch's vectors; False when an item met a transient error."""
    try:
        fetch_vectors(batch.rt, batch.work, urgent=False)
    except BaseException:
        batch.end()
        raise
    return not any(isinstance(r, TransientError) for r in batch.work.results)


def write(batch: RunBatch) -> list[Result]:
    """Upsert the vectors and record every outcome in the batch's transaction, then commit.

    Items that met a transient error get no outcome: the commit frees them for a later claim.
    """
    written = False
    try:
        results = write_vectors(batch.rt, batch.session, batch.work)
        outcomes = [
            (skill_id, _outcome(result), None if isinstance(result, Embedded) else describe(result))
            for skill_id, result in zip(batch.skill_ids, results, strict=True)
            if not isinstance(result, TransientError)
        ]
        recorded = runs.record_outcomes(batch.session, batch.run_id, outcomes)
        batch.session.commit()
        written = True
    except Exception as exc:
        logger.warning(
            "A batch of %d items of run %s failed while writing (%s): nothing of it was"
            " recorded, and each item is free for the next claim",
            len(batch.skill_ids),
            batch.run_id,
            _reason(exc),
            extra={"run_id": batch.run_id},
        )
        raise
    finally:
        batch.end(written=written)
    tenants = {r.skill_id: r.tenant_id or "" for r in batch.work.requests}
    ProgressLog(batch.rt).recorded(
        recorded, dict(zip(batch.skill_ids, results, strict=True)), tenants
    )
    return results


def _outcome(result: Result) -> str:
    return result.outcome.value if isinstance(result, Embedded) else runs.FAILED


def _reason(exc: BaseException) -> str:
    return describe(database_error(exc) or exc)


def run_batches(
    rt: Runtime,
    run_id: str,
    *,
    force: bool,
    keep_going: Callable[[], bool],
    fetch: Callable[[RunBatch], bool] = fetch,
    write: Callable[[RunBatch], list[Result]] = write,
) -> None:
    """The loop: claim, fetch, write, batch after batch, while an item of the run is free.

    Three batches are in flight: the next one claimed, one with Ollama, the last one being
    written. Ollama waits neither for our claim nor for our write.
    """

    def claim_next() -> RunBatch | None:
        return claim(rt, run_id, force=force) if keep_going() else None

    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-claim") as claimer,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-write") as writer,
    ):
        claiming = claimer.submit(claim_next)
        writing: Future[list[Result]] | None = None
        try:
            while keep_going() and (batch := claiming.result()) is not None:
                claiming = claimer.submit(claim_next)
                went_through = fetch(batch)
                if writing is not None:
                    try:
                        writing.result()  # the previous batch, written while this one was fetched
                    except BaseException:
                        batch.end()  # the database is failing: hand this batch's items back
                        raise
                writing = writer.submit(write, batch)
                if not went_through:
                    break  # Ollama is failing: jobs retry, and the first one through restarts us
        finally:
            if claiming.exception() is None and (ahead := claiming.result()) is not None:
                ahead.end()  # claimed for a turn the loop will not take: its items go back
            if writing is not None:
                writing.exception()  # wait for it; its failure is logged where it happened


def embed_item(rt: Runtime, run_id: str, request: EmbedRequest) -> str | EmbedderError:
    """A run job: its item's outcome, recorded by whichever batch embeds it (maybe this job's)."""
    skill_id = request.skill_id
    with unscoped(rt.sessions) as session:
        recorded = runs.item_outcome(session, run_id, skill_id)
    if recorded is not None:
        return _settled(skill_id, *recorded)
    rt.loops.ensure(run_id, force=request.force)
    while True:
        batch = claim(rt, run_id, force=request.force, including=skill_id)
        if batch is not None:
            fetch(batch)
            results = write(batch)
            result = results[batch.skill_ids.index(skill_id)]
            return result.outcome.value if isinstance(result, Embedded) else result
        # Another batch holds the item: wait for it to end, then see what it recorded.
        with unscoped(rt.sessions) as session:
            state = runs.wait_for_item(session, run_id, skill_id, timeout_seconds=rt.claim_seconds)
        if state is None:  # not an item of that run (a hand-made message): embed it alone
            [alone] = embed_skills(rt, [request])
            return alone.outcome.value if isinstance(alone, Embedded) else alone
        if state[0] is not None:
            return _settled(skill_id, state[0], state[1])


def _settled(skill_id: str, outcome: str, detail: str | None) -> str | EmbedderError:
    if outcome == runs.FAILED:
        return FailedInBatch(detail or f"skill {skill_id!r} failed in its batch")
    return outcome


class RunLoops:
    """This process's loops, at most one per run, started by jobs and by the recovery pass."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def ensure(self, run_id: str, *, force: bool) -> None:
        with self._lock:
            running = self._threads.get(run_id)
            if self._stopping.is_set() or (running is not None and running.is_alive()):
                return
            thread = threading.Thread(
                target=self._loop, args=(run_id, force), name=f"run-{run_id[:8]}", daemon=True
            )
            self._threads[run_id] = thread
            thread.start()

    def _loop(self, run_id: str, force: bool) -> None:
        try:
            run_batches(self._rt, run_id, force=force, keep_going=self.running)
        except Exception as exc:
            # Each stage logged its own failure in one line; the rest is a bug worth a traceback.
            if database_error(exc) is None:
                logger.exception("The batch loop of run %s stopped", run_id)

    def running(self) -> bool:
        return not self._stopping.is_set()

    def recover(self) -> None:
        """Start a loop for every open run with a free item (its worker died, its jobs are lost)."""
        with unscoped(self._rt.sessions) as session:
            open_runs = runs.runs_with_free_items(session)
        for run_id, force in open_runs:
            self.ensure(run_id, force=force)

    def recover_every(self, seconds: float) -> None:
        """The recovery pass, now and every `seconds`, until `stop`; for a daemon thread."""
        while not self._stopping.is_set():
            try:
                self.recover()
            except Exception as exc:
                logger.warning("Recovery pass failed: %s", describe(database_error(exc) or exc))
            self._stopping.wait(seconds)

    def stop(self) -> None:
        """Claim nothing more (the process is going away); batches in flight finish."""
        self._stopping.set()
