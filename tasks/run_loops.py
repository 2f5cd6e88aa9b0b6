"""A run in this process: the job's side of a backfill item, and the loops that run ahead.

`tasks.batching` is the loop itself; here is who starts it (a run's jobs, the backfill, the
recovery pass) and what a job does when it arrives (`embed_item`).
"""

from __future__ import annotations

import logging
import threading

from db import runs
from db.session import unscoped
from tasks.batching import claim, fetch, run_batches, write
from tasks.embedding import Embedded, EmbedRequest, embed_skills
from tasks.errors import EmbedderError, FailedInBatch, database_error
from tasks.retry import describe
from tasks.runtime import Runtime

logger = logging.getLogger(__name__)


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
