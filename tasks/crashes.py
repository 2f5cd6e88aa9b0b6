"""Embeddings begun and not ended, per item: what a worker process was doing when it died.

A process counts each item while Ollama embeds it and its answer is read, and takes the count
back once that is over, whatever the outcome (a job from the app counts its own skill from its
first look to its write: tasks.app_lane). A count that stays is a death: the process was
killed (out of memory, a crash in native code) in the middle of it. Counts live
in Redis, so every worker of the deployment sees them, and expire a day after their last use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import redis

logger = logging.getLogger(__name__)

APP_JOBS = "app"  # the key for jobs outside any run
COUNT_SECONDS = 86400  # a run's counts expire this long after their last use
QUIET_SECONDS = 10.0  # between two lines about the same outage


class CrashCounts:
    """Per run (or APP_JOBS), per skill: how many processes died while embedding it."""

    def __init__(self, client: redis.Redis, *, prefix: str = "embedder:unfinished") -> None:
        self._redis = client
        self._prefix = prefix
        self._quiet_until = 0.0

    def key(self, run_id: str | None) -> str:
        """The hash of the run's counts (for a script that reads them with other keys)."""
        return f"{self._prefix}:{run_id or APP_JOBS}"

    def deaths(self, run_id: str | None, skill_ids: Sequence[str]) -> dict[str, int]:
        if not skill_ids:
            return {}
        counts = self._redis.hmget(self.key(run_id), list(skill_ids))
        return {s: int(c) for s, c in zip(skill_ids, counts, strict=True) if c is not None}

    def begin(self, run_id: str | None, skill_ids: Sequence[str]) -> None:
        if not skill_ids:
            return
        key = self.key(run_id)
        pipe = self._redis.pipeline(transaction=False)
        for skill_id in skill_ids:
            pipe.hincrby(key, skill_id, 1)
        pipe.expire(key, COUNT_SECONDS)
        pipe.execute()

    def end(
        self,
        run_id: str | None,
        skill_ids: Sequence[str],
        *,
        done: bool,
        pipe: redis.client.Pipeline | None = None,
    ) -> None:
        """The items' batch ended and this process lives: done, they are cleared; else the count
        goes back to the deaths alone. With `pipe`, the commands join it and its caller sends
        them with its own."""
        if not skill_ids:
            return
        key = self.key(run_id)
        queue = self._redis.pipeline(transaction=False) if pipe is None else pipe
        if done:
            queue.hdel(key, *skill_ids)
        else:
            for skill_id in skill_ids:
                queue.hincrby(key, skill_id, -1)
        if pipe is None:
            queue.execute()

    @contextmanager
    def embedding(
        self, run_id: str | None, skill_ids: Sequence[str], *, clear_on_success: bool = False
    ) -> Iterator[None]:
        """Count the items for the block; with `clear_on_success`, a block that ends without an
        error forgets their earlier deaths too.

        Redis failing does not stop the block: the items go uncounted (a death then goes
        unnoticed), and what the block fetched is written all the same.
        """
        try:
            self.begin(run_id, skill_ids)
        except redis.RedisError as exc:
            self._unavailable(exc)
            yield
            return
        done = False
        try:
            yield
            done = clear_on_success
        finally:
            try:
                self.end(run_id, skill_ids, done=done)
            except redis.RedisError as exc:
                # The count stays: a later claim sends these items alone, as after a death.
                self._unavailable(exc)

    def _unavailable(self, exc: redis.RedisError) -> None:
        now = time.monotonic()
        if now >= self._quiet_until:  # one line per outage and interval, not one per batch
            self._quiet_until = now + QUIET_SECONDS
            logger.warning("Cannot count embeddings in flight: Redis did not answer (%s)", exc)
