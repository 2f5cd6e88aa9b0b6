"""Ollama's slots across the deployment: at most N requests in flight to one URL, via Redis.

Ollama serves an embedding model one request at a time; a second caller only queues inside it,
where a timeout counts against the caller. Every worker process, on any host, takes a slot
before it posts to a URL. A slot is a redis-py lock with a lease (one request timeout plus a
margin), so a process that dies holding one frees it by itself.

A caller marked urgent (a job from the app) registers while it waits; callers that are not
urgent (backfill batches) take no slot while an urgent one waits for the same URL.

A waiter blocks in Redis (BLPOP) until a holder lets go: each release pushes one wake-up, to the
urgent waiters' list while one waits, else to everyone's, so a freed slot is taken at once
instead of at the next poll. A holder that died sends none; its lease runs out instead, and the
waiters look again every `RECHECK_SECONDS`.
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

# The longest a waiter blocks without a wake-up: how soon a slot whose holder died (its lease
# run out) or a wake-up taken by a waiter that then left is noticed; a release itself wakes a
# waiter at once.
RECHECK_SECONDS = 0.1

# Lets go of a slot held under ARGV[1] and, in the same step, wakes one waiter: an urgent one
# while any is registered (its entries scored by when they stop counting), else anyone. The
# wake-up lists hold at most one entry per slot and expire with a lease.
_RELEASE = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('del', KEYS[1])
local wake = KEYS[4]
if redis.call('zcount', KEYS[2], ARGV[2], '+inf') > 0 then wake = KEYS[3] end
redis.call('lpush', wake, 1)
redis.call('ltrim', wake, 0, tonumber(ARGV[3]) - 1)
redis.call('pexpire', wake, ARGV[4])
return 1
"""


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
        self._unreleased: list[tuple[str, Lock, str]] = []
        self._unreleased_lock = threading.Lock()
        self._release_script = client.register_script(_RELEASE)

    def _keys(self, url: str) -> tuple[str, str, str]:
        """The URL's urgent waiters (a sorted set), and its two wake-up lists (urgent, all)."""
        base = f"{self._prefix}:{url}"
        return f"{base}:urgent", f"{base}:freed:urgent", f"{base}:freed"

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
            self._release(url, lock)

    def _release(self, url: str, lock: Lock, token: str | None = None) -> None:
        # By its token, not lock.release(): that forgets the token before it asks Redis, and
        # keeps it per thread, so a release to retry later needs the token kept here. A token
        # Redis no longer holds (the lease ran out first) releases nothing and wakes no one.
        token = token if token is not None else lock.local.token
        if token is None:
            return
        lock.local.token = None
        waiting, freed_urgent, freed = self._keys(url)
        try:
            self._release_script(
                keys=[str(lock.name), waiting, freed_urgent, freed],
                args=[token, time.time(), self.limit, int(self.lease_seconds * 1000)],
            )
        except redis.RedisError:
            with self._unreleased_lock:
                self._unreleased.append((url, lock, token))

    def _release_leftovers(self) -> None:
        if not self._unreleased:
            return
        with self._unreleased_lock:
            leftovers, self._unreleased = self._unreleased, []
        for url, lock, token in leftovers:
            self._release(url, lock, token)  # Redis still away: kept for the next turn

    def _acquire(self, url: str, *, urgent: bool) -> Lock:
        waiting, freed_urgent, freed = self._keys(url)
        if urgent and (lock := self._free_slot(url)) is not None:
            return lock  # no wait, so no need to make batches step aside
        me = uuid.uuid4().hex
        deadline = time.monotonic() + self.wait_seconds
        woken = None  # the last wait's wake-up, if a release sent one
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
                if woken is not None and not ready:
                    # Released just before an urgent caller came: the wake-up is its own.
                    pipe = self._redis.pipeline()
                    pipe.lpush(freed_urgent, 1)
                    pipe.pexpire(freed_urgent, int(self.lease_seconds * 1000))
                    pipe.execute()
                if ready and (lock := self._free_slot(url)) is not None:
                    return lock
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OllamaUnavailable(
                        f"Ollama at {url} stayed busy for {self.wait_seconds:.0f} s"
                        f" (all {self.limit} of its slots taken): is another worker stuck?"
                    )
                # Batches wait on everyone's list alone, so a release made while an urgent
                # caller waits reaches that caller even if batches blocked before it came.
                lists = [freed_urgent, freed] if urgent else [freed]
                # (At least a millisecond: a timeout of 0 would block for good.)
                woken = self._redis.blpop(lists, timeout=max(0.001, min(left, RECHECK_SECONDS)))
        finally:
            if urgent:
                self._redis.zrem(waiting, me)

    def _free_slot(self, url: str) -> Lock | None:
        for lock in random.sample(self._locks(url), self.limit):
            if lock.acquire(blocking=False):
                return lock
        return None
