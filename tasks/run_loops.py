"""Who starts a run's batch loop in this process: the run's jobs, the backfill, the recovery pass.

`tasks.batching` is the loop itself. Loops are this process's own state (threads), kept here,
beside the runtime they use rather than inside it: `reset()` after a fork, `stop()` before exit.
"""

from __future__ import annotations

import logging
import threading

from db import claims
from db.session import unscoped
from tasks.batching import recorded_here, run_batches
from tasks.errors import database_error, redis_error
from tasks.retry import describe
from tasks.runtime import Runtime
from tasks.swap import settle_all

logger = logging.getLogger(__name__)


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
        with unscoped(self._rt.sessions) as session:
            open_runs = claims.runs_with_free_items(session)
        for run_id, force in open_runs:
            self.ensure(run_id, force=force)
        settle_all(self._rt)  # a swap whose worker died before it, and tenants waiting their turn

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
    global _loops
    _loops = None
    recorded_here.clear()


def stop() -> None:
    """Before the process exits: batches in flight finish, no more are claimed."""
    if _loops is not None:
        _loops.stop()
