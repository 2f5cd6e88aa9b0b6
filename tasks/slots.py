"""Ollama's slots across the deployment: at most N requests in flight to one URL, via Redis.

Ollama serves an embedding model one request at a time; a second caller only queues inside it,
where a timeout counts against the caller. Every worker process, on any host, takes a slot
before it posts to a URL. A slot is a redis-py lock with a lease (one request timeout plus a
margin), so a process that dies holding one frees it by itself.

A caller marked urgent (a job from the app) registers while it waits; callers that are not
urgent (backfill batches) take no slot while an urgent one waits for the same URL.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.lock import Lock

from tasks.retry import OllamaUnavailable

# Between two tries for a busy slot: short against a batch's ~150 ms, long enough that a few
# waiters do not load Redis.
POLL_SECONDS = 0.004


class OllamaSlots:
    """Deployment-wide slots per Ollama URL; `hold(url, urgent=...)` around each request."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        limit: int,
        lease_seconds: float,
        wait_seconds: float,
        prefix: str = "embedder:ollama",
    ) -> None:
        self._redis = client
        self.limit = limit
        self.lease_seconds = lease_seconds
        self.wait_seconds = wait_seconds
        self._prefix = prefix
        # Slots whose release Redis did not take (it was away): released as soon as it is
        # back, before this process asks for another. Redis keeps a lock through its own
        # restart, so left alone each would stay taken to the end of its lease (a request
        # timeout and more), and every worker would wait that out after a short outage.
        self._unreleased: list[tuple[Lock, str]] = []
        self._unreleased_lock = threading.Lock()

    def _locks(self, url: str) -> list[Lock]:
        return [
            self._redis.lock(f"{self._prefix}:{url}:slot:{i}", timeout=self.lease_seconds)
            for i in range(self.limit)
        ]

    @contextmanager
    def hold(self, url: str, *, urgent: bool) -> Iterator[None]:
        """Wait for one of the URL's slots (urgent callers first), hold it for the block."""
        try:
            self._release_leftovers()
            lock = self._acquire(url, urgent=urgent)
        except redis.RedisError as exc:
            raise OllamaUnavailable(
                f"cannot take a turn on Ollama at {url}: Redis did not answer ({exc})"
            ) from exc
        try:
            yield
        finally:
            self._release(lock)

    def _release(self, lock: Lock, token: str | None = None) -> None:
        # By its token, not lock.release(): that forgets the token before it asks Redis, and
        # keeps it per thread, so a release to retry later needs the token kept here.
        token = token if token is not None else lock.local.token
        if token is None:
            return
        lock.local.token = None
        try:
            lock.do_release(token)
        except redis.exceptions.LockError:
            pass  # its lease ran out first: the slot is someone else's, or free
        except redis.RedisError:
            with self._unreleased_lock:
                self._unreleased.append((lock, token))

    def _release_leftovers(self) -> None:
        if not self._unreleased:
            return
        with self._unreleased_lock:
            leftovers, self._unreleased = self._unreleased, []
        for lock, token in leftovers:
            self._release(lock, token)  # Redis still away: kept for the next turn

    def _acquire(self, url: str, *, urgent: bool) -> Lock:
        waiting = f"{self._prefix}:{url}:urgent"
        if urgent and (lock := self._free_slot(url)) is not None:
            return lock  # no wait, so no need to make batches step aside
        me = uuid.uuid4().hex
        deadline = time.monotonic() + self.wait_seconds
        try:
            while True:
                now = time.time()
                if urgent:
                    # Scored by when the entry stops counting: a waiter that died drops out.
                    pipe = self._redis.pipeline()
                    pipe.zremrangebyscore(waiting, "-inf", now)
                    pipe.zadd(waiting, {me: now + self.lease_seconds})
                    pipe.execute()
                ready = urgent or not self._redis.zcount(waiting, now, "+inf")
                if ready and (lock := self._free_slot(url)) is not None:
                    return lock
                if time.monotonic() > deadline:
                    raise OllamaUnavailable(
                        f"Ollama at {url} stayed busy for {self.wait_seconds:.0f} s"
                        f" (all {self.limit} of its slots taken): is another worker stuck?"
                    )
                time.sleep(POLL_SECONDS)
        finally:
            if urgent:
                self._redis.zrem(waiting, me)

    def _free_slot(self, url: str) -> Lock | None:
        for lock in random.sample(self._locks(url), self.limit):
            if lock.acquire(blocking=False):
                return lock
        return None
