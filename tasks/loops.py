"""Every thread a worker process runs beside its jobs, and the one reset and stop for them all:
a run's batch loop (claim -> fetch -> write), the app lane's turn ahead, the recovery pass.

A run's batches, in each worker process one loop per run:

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

While one batch is with Ollama, the next is claimed and the last is written, both from the
moment its request is out, so neither delays a request and the model waits only for the
answer's own trip and the next send (bench.model_busy). The loop stops
when no item is free, when the process shuts down, or after a batch meets a transient error
(Ollama or the database down): from then on the items' own jobs claim them, at the pace of
their retries, and the first job that gets through starts the loop again (RunLoops, below).

A process that died while embedding items is remembered per item (tasks.runtime.CrashCounts):
such an item goes alone next time, and after EMBED_MAX_DELIVERIES deaths it is recorded failed
instead of tried again.

The app lane's turn (LaneAhead): after a job served companions (tasks.app_lane), a thread
embeds the next app jobs waiting, writing each batch while the next is with the provider.
The recovery pass: every RECOVERY_INTERVAL_SECONDS, a loop for each open run with a free item
(its worker died, its jobs are lost), then what the runtime's hooks add (a switch's next turn).
`reset()` after a fork (threads are not copied), `stop()` before exit: batches in flight finish.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy import Connection

from db import claims, runs
from db.sql import held, unscoped
from tasks.app_lane import Together, fetch_together, waiting_companions, write_together
from tasks.embedding import (
    Batch,
    EmbedRequest,
    LiveTarget,
    Result,
    Sent,
    WriteTarget,
    send_vectors,
    take_vectors,
)
from tasks.progress import Closing, ProgressLog
from tasks.retry import (
    EmbedderError,
    TransientError,
    WorkerDied,
    database_error,
    describe,
    redis_error,
)
from tasks.runtime import Runtime

logger = logging.getLogger(__name__)

# The longest a batch's claim or write waits for the request in flight to go out. A send takes
# a few milliseconds; one that takes longer waits for its Ollama's slot (another worker's turn),
# and the GIL is free for them meanwhile.
SEND_GRACE_SECONDS = 0.02


class RecordedHere:
    """Outcomes this process's batches committed, kept until the item's own job asks.

    A run's job first learns whether its item is recorded; with one worker, nearly always by
    a batch of its own process, so it needs no query. A job delivered again, or one whose item
    another worker recorded, asks PostgreSQL (which is the record either way).
    """

    def __init__(self, runs: int = 8) -> None:
        self._runs: OrderedDict[str, dict[str, tuple[str, str | None]]] = OrderedDict()
        self._most = runs  # runs remembered: older ones' late jobs query instead
        self._lock = threading.Lock()

    def add(self, run_id: str, outcomes: Iterable[tuple[str, str, str | None]]) -> None:
        with self._lock:
            items = self._runs.setdefault(run_id, {})
            self._runs.move_to_end(run_id)
            items.update((skill_id, (outcome, detail)) for skill_id, outcome, detail in outcomes)
            while len(self._runs) > self._most:
                self._runs.popitem(last=False)

    def take(self, run_id: str, skill_id: str) -> tuple[str, str | None] | None:
        """The item's (outcome, detail), forgotten once its job has it."""
        with self._lock:
            items = self._runs.get(run_id)
            return None if items is None else items.pop(skill_id, None)

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()


recorded_here = RecordedHere()


class RunBatch:
    """Claimed items of one run, their transaction (which holds the claims), where their vectors
    go (the run's write target) and their results."""

    def __init__(
        self, rt: Runtime, run_id: str, conn: Connection, target: WriteTarget, work: Batch
    ) -> None:
        self.rt, self.run_id, self.conn, self.target, self.work = rt, run_id, conn, target, work
        self.skill_ids = [request.skill_id for request in work.requests]
        self.reopened: list[str] = []  # items the run's close handed back to embed again
        self.sent: Sent | None = None  # its requests, answered, not yet parsed
        # Called as its request goes out: the loop starts the next claim and the last write
        # then, so neither competes with the send for this process's GIL.
        self.on_sent: Callable[[], None] | None = None
        self.counted: list[str] = []  # its items counted in flight (tasks.runtime.CrashCounts)

    def end(self) -> None:
        """Close the transaction (a rollback unless committed): the claims end with it; and
        take back the items' count in flight, if their answers were never parsed."""
        self.uncount()
        self.conn.close()

    def uncount(self) -> None:
        counted, self.counted = self.counted, []
        if counted:
            self.rt.crashes.end_quietly(self.run_id, counted)


def write_target(rt: Runtime, conn: Connection, run_id: str) -> WriteTarget:
    """Where the run's vectors go: the target its kind registered in the hooks, else live."""
    run = runs.get_run(conn, run_id)
    factory = rt.hooks.targets.get(run.kind) if run is not None else None
    return LiveTarget(rt) if factory is None or run is None else factory(rt, conn, run)


def claim(
    rt: Runtime, run_id: str, *, force: bool, including: str | None = None
) -> RunBatch | None:
    """Lock the run's next pending items (`including` first) and decide what each needs."""
    size, most = rt.settings.embed_batch_size, rt.settings.embed_max_deliveries
    conn = held(rt.engine)
    try:
        rt.hold_claims(conn)
        claimed = claims.claim_items(conn, run_id, size, including=including)
        deaths = rt.crashes.deaths(run_id, [skill_id for skill_id, _ in claimed])
        suspect = next((s for s, n in deaths.items() if 0 < n < most), None)
        if suspect is not None and len(claimed) > 1:
            # A process died while embedding it (or is dying: its connection is gone, its count
            # not yet): alone, it cannot take neighbours down again. A job takes its own item.
            alone = including or suspect
            conn.rollback()
            rt.hold_claims(conn)
            claimed = claims.claim_items(conn, run_id, 1, including=alone)
            deaths = {alone: deaths[alone]} if alone in deaths else {}
        if not claimed:
            conn.close()
            return None
        requests = [
            EmbedRequest(skill_id, tenant, force, listed=True) for skill_id, tenant in claimed
        ]
        target = write_target(rt, conn, run_id)
        work = target.decide(conn, requests)
        for skill_id, count in deaths.items():
            if count >= most:
                work.fail(skill_id, WorkerDied(count, work.name_of(skill_id)))
        return RunBatch(rt, run_id, conn, target, work)
    except Exception as exc:
        conn.close()
        logger.warning("Could not claim a batch of run %s: %s", run_id, _reason(exc))
        raise


def fetch(batch: RunBatch) -> bool:
    """Send the batch's requests and read their answers, unparsed (the write parses them, while
    the model computes the next batch); False when an exchange met a transient error.

    Its items are counted from here until their answer is parsed: if this process dies
    meanwhile, the count stays and names them (tasks.runtime.CrashCounts), and not the batches
    claimed or being written.
    """
    rt = batch.rt
    batch.counted = [item.request.skill_id for item in batch.work.pending]
    rt.crashes.begin_quietly(batch.run_id, batch.counted)
    try:
        batch.sent = send_vectors(rt, batch.work, urgent=False, on_sent=batch.on_sent)
    except BaseException:
        batch.end()
        raise
    return batch.sent.transient is None


def _take(batch: RunBatch) -> None:
    """Parse the batch's answers into it, then take back its count (it outlived its answer)."""
    try:
        if batch.sent is not None:
            take_vectors(batch.rt, batch.work, batch.sent)
    finally:
        batch.uncount()


def write(batch: RunBatch) -> list[Result]:
    """Upsert the vectors and record every outcome in the batch's transaction, then commit.

    Items that met a transient error get no outcome: the commit frees them for a later claim.
    """
    try:
        _take(batch)
        results = batch.target.write(batch.conn, batch.work)
        outcomes = [
            (
                skill_id,
                _outcome(result),
                describe(result) if isinstance(result, EmbedderError) else None,
            )
            for skill_id, result in zip(batch.skill_ids, results, strict=True)
            if not isinstance(result, TransientError)
        ]
        closing = Closing(batch.rt)
        recorded = runs.record_outcomes(batch.conn, batch.run_id, outcomes, closing)
        batch.conn.commit()
        batch.reopened = closing.reopened
        # Reopened items are pending again: their jobs must not take the outcome handed back.
        kept = set(recorded.skill_ids) - set(closing.reopened)
        recorded_here.add(batch.run_id, (o for o in outcomes if o[0] in kept))
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
        batch.end()
    tenants = {r.skill_id: r.tenant_id or "" for r in batch.work.requests}
    ProgressLog(batch.rt).recorded(
        recorded, dict(zip(batch.skill_ids, results, strict=True)), tenants, closing
    )
    return results


def _transient(results: list[Result]) -> TransientError | None:
    return next((r for r in results if isinstance(r, TransientError)), None)


def _paused(run_id: str, error: TransientError | None) -> None:
    reason = describe(error) if error is not None else "a transient error"
    logger.warning("Batches of run %s paused: %s", run_id, reason, extra={"run_id": run_id})


def _handed_back(writing: Future[list[Result]] | None, batch: RunBatch) -> bool:
    """The batch was written and its run's close handed items back to be embedded again."""
    return writing is not None and writing.exception() is None and bool(batch.reopened)


def _outcome(result: Result) -> str:
    return runs.FAILED if isinstance(result, EmbedderError) else result.outcome.value


def _reason(exc: BaseException) -> str:
    return describe(database_error(exc) or redis_error(exc) or exc)


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
    written. Ollama waits neither for our claim nor for our write: both start the moment a
    request has gone out (`sent`), and end while the model computes it, so the next request
    leaves as soon as its answer is in.
    """

    def claim_next(after: threading.Event | None = None) -> RunBatch | None:
        if after is not None:
            after.wait(SEND_GRACE_SECONDS)
        return claim(rt, run_id, force=force) if keep_going() else None

    def write_once(sent: threading.Event, batch: RunBatch) -> list[Result]:
        sent.wait(SEND_GRACE_SECONDS)
        return write(batch)

    # Set once the next request is on its way, or once none will be: the last write waits on it.
    sent = threading.Event()
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-claim") as claimer,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-write") as writer,
    ):
        claiming: Future[RunBatch | None] = claimer.submit(claim_next)
        writing: Future[list[Result]] | None = None
        written: RunBatch | None = None
        try:
            while keep_going():
                try:
                    batch = claiming.result(timeout=SEND_GRACE_SECONDS)
                except TimeoutError:
                    # No request is about to leave; and the claim may wait on a lock that waits
                    # on the last batch's transaction: its write must not wait on the claim.
                    sent.set()
                    batch = claiming.result()
                if batch is None:
                    sent.set()  # no request follows: the last write goes now
                    if written is None or not _handed_back(writing, written):
                        break
                    # The last write ended the run but handed items back: claim them now.
                    written = writing = None
                    claiming = claimer.submit(claim_next)
                    continue
                going = sent
                claiming = claimer.submit(claim_next, going)
                batch.on_sent = going.set
                went_through = fetch(batch)
                going.set()  # a request that never left (refused, or none to send)
                if writing is not None:
                    try:
                        # The previous batch, parsed and written while this one was with the model.
                        unreadable = _transient(writing.result())
                    except BaseException:
                        batch.end()  # the database is failing: hand this batch's items back
                        raise
                    if unreadable is not None:  # its answers could not be read: pause, as below
                        batch.end()
                        _paused(run_id, unreadable)
                        break
                sent = threading.Event()
                writing, written = writer.submit(write_once, sent, batch), batch
                if not went_through:
                    # The provider is failing: jobs retry, and the first one through restarts us.
                    _paused(run_id, batch.sent.transient if batch.sent else None)
                    break
        finally:
            sent.set()  # whatever ended the loop, the last batch fetched is written
            if claiming.exception() is None and (ahead := claiming.result()) is not None:
                ahead.end()  # claimed for a turn the loop will not take: its items go back
            if writing is not None:
                writing.exception()  # wait for it; its failure is logged where it happened


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
            if database_error(exc) is None and redis_error(exc) is None:
                logger.exception("The batch loop of run %s stopped", run_id)

    def running(self) -> bool:
        return not self._stopping.is_set()

    def recover(self) -> None:
        """Start a loop for every open run with a free item (its worker died, its jobs are lost)."""
        with unscoped(self._rt.engine) as conn:
            open_runs = claims.runs_with_free_items(conn)
        for run_id, force in open_runs:
            self.ensure(run_id, force=force)
        for hook in self._rt.hooks.recovery:  # a switch's next tenant, say
            hook(self._rt)

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


_loops: RunLoops | None = None
_loops_lock = threading.Lock()


def loops(rt: Runtime) -> RunLoops:
    """This process's loops over `rt`, made on first use."""
    global _loops
    with _loops_lock:
        if _loops is None or _loops._rt is not rt:
            _loops = RunLoops(rt)
        return _loops


def reset() -> None:
    """Forget the parent's loops after a fork: their threads were not copied."""
    global _loops, _ahead
    _loops = None
    _ahead = None
    recorded_here.clear()


def stop() -> None:
    """Before the process exits: batches in flight finish, no more are claimed."""
    if _loops is not None:
        _loops.stop()
    if _ahead is not None:
        _ahead.stop()


class LaneAhead:
    """This process's turn ahead of the app's jobs: after a job served a batch of a burst,
    a thread embeds the next ones waiting (reserved, marked) while the served jobs confirm,
    so the model's time overlaps theirs, as a backfill's batches overlap its jobs: while one
    batch is with Ollama, the one before it is written."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def ensure(self) -> None:
        with self._lock:
            if self._stopping.is_set() or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._drain, name="app-lane", daemon=True)
            self._thread.start()

    def _drain(self) -> None:
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="app-lane-write") as writer:
                writing: Future[Result | None] | None = None
                try:
                    while not self._stopping.is_set():
                        together = Together(None, waiting_companions(self.rt, None))
                        if not together.companions:
                            return
                        batch = fetch_together(self.rt, together)
                        if writing is not None:
                            writing.result()  # one batch written at a time, in order
                        writing = writer.submit(write_together, self.rt, together, batch)
                finally:
                    if writing is not None:
                        writing.result()
        except Exception as exc:
            # The jobs embed their own skills: nothing waits on this turn but a faster drain.
            logger.warning("The app lane's turn stopped: %s", describe(database_error(exc) or exc))

    def stop(self) -> None:
        self._stopping.set()


_ahead: LaneAhead | None = None
_ahead_lock = threading.Lock()


def lane_ahead(rt: Runtime) -> LaneAhead:
    global _ahead
    with _ahead_lock:
        if _ahead is None or _ahead.rt is not rt:
            _ahead = LaneAhead(rt)
        return _ahead
