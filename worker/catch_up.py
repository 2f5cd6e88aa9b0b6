"""The worker's own reconcile: what a lost enqueue left stale is caught without beat.

The app's producer returns False when the broker refuses a job (an outage, a restart); the
database still says what is missing or stale, and `tasks.reconcile` finds it. Each pool process
checks every quarter interval whether the deployment's turn is free: a redis-py lock whose lease
is CATCH_UP_INTERVAL_SECONDS, taken without waiting and left to expire, so one worker at a time
reconciles, about once an interval, however many workers run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from tasks.retry import database_error, describe

logger = logging.getLogger(__name__)

LOCK_NAME = "embedder:catch-up"


class CatchUp:
    """Every `interval / 4`, reconcile if no worker of the deployment did in the last `interval`."""

    def __init__(
        self, client: redis.Redis, reconcile: Callable[[], object], interval: float
    ) -> None:
        self._redis = client
        self._reconcile = reconcile
        self.interval = interval
        self._stopping = threading.Event()
        self._quiet_until = 0.0

    def run(self) -> None:
        """Until `stop`; for a daemon thread."""
        while not self._stopping.wait(self.interval / 4):
            self.tick()

    def tick(self) -> bool:
        """Take the deployment's turn and reconcile; False when another worker has it."""
        try:
            lock = self._redis.lock(LOCK_NAME, timeout=self.interval)
            if not lock.acquire(blocking=False):
                return False
        except redis.RedisError as exc:
            self._warn(f"Redis did not answer ({exc})")
            return False
        try:
            self._reconcile()
        except Exception as exc:
            self._warn(describe(database_error(exc) or exc))
        return True

    def _warn(self, reason: str) -> None:
        # An outage fails every check: one line an interval says so.
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + self.interval
            logger.warning("Catch-up reconcile skipped: %s", reason)

    def stop(self) -> None:
        self._stopping.set()


_current: CatchUp | None = None


def start(client: redis.Redis, reconcile: Callable[[], object], interval: float) -> CatchUp:
    """This process's catch-up, in a daemon thread."""
    global _current
    _current = CatchUp(client, reconcile, interval)
    threading.Thread(target=_current.run, name="catch-up", daemon=True).start()
    return _current


def stop() -> None:
    if _current is not None:
        _current.stop()
