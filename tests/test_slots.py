"""Ollama's slots in Redis: one request at a time per URL, and a slot freed when Redis returns."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import redis

import tasks.slots as slots_module
from devstack.redis import LocalRedis
from tasks.retry import OllamaUnavailable
from tasks.slots import OllamaSlots

URL = "http://127.0.0.1:11434"


def test_a_slot_held_through_a_redis_outage_is_free_as_soon_as_redis_is_back(
    tmp_path: Path,
) -> None:
    server = LocalRedis(data_dir=tmp_path / "redis").start()  # keeps its keys through a restart
    client = redis.Redis.from_url(server.url, socket_timeout=2)
    # A lease far longer than the wait: a slot left taken would refuse the next turn.
    slots = OllamaSlots(client, limit=1, lease_seconds=60, wait_seconds=1)
    try:
        with slots.hold(URL, urgent=False):
            server.stop()  # Redis goes away while the request is with Ollama
        server.start()
        assert client.keys("embedder:ollama:*:slot:*"), "the slot outlived the outage in Redis"

        with slots.hold(URL, urgent=True):
            # Still one at a time: another caller finds the one slot taken.
            other = OllamaSlots(client, limit=1, lease_seconds=60, wait_seconds=0.05)
            with (
                pytest.raises(OllamaUnavailable, match="stayed busy"),
                other.hold(URL, urgent=False),
            ):
                pass
        assert not client.keys("embedder:ollama:*:slot:*")
    finally:
        client.close()
        server.stop()


class _Waiter(threading.Thread):
    """Takes a slot in a thread of its own, holds it until told, and says when it got it."""

    def __init__(self, slots: OllamaSlots, *, urgent: bool, order: list[str], name: str) -> None:
        super().__init__(daemon=True)
        self.slots, self.urgent, self.order, self.label = slots, urgent, order, name
        self.got, self.done = threading.Event(), threading.Event()

    def run(self) -> None:
        with self.slots.hold(URL, urgent=self.urgent):
            self.order.append(self.label)
            self.got.set()
            self.done.wait(30)


def _wait_registered(client: redis.Redis, urgent: int) -> None:
    """Until `urgent` urgent callers are registered as waiting (each writes its entry first)."""
    key = f"embedder:ollama:{URL}:urgent"
    for _ in range(3000):
        if client.zcard(key) >= urgent:
            return
        threading.Event().wait(0.001)
    raise AssertionError("the urgent caller never registered its wait")


def _blocked_clients(client: redis.Redis) -> int:
    return int(client.info("clients")["blocked_clients"])


def _wait_blocked(client: redis.Redis, count: int) -> None:
    """Until `count` waiters block in Redis for a wake-up."""
    for _ in range(3000):
        if _blocked_clients(client) >= count:
            return
        threading.Event().wait(0.001)
    raise AssertionError(f"{count} waiters never blocked for a wake-up")


def test_a_released_slot_wakes_a_waiter_at_once_and_an_urgent_one_first(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No rechecks within the test: a waiter can get the slot only from a release's wake-up.
    monkeypatch.setattr(slots_module, "RECHECK_SECONDS", 60.0)
    client = redis.Redis.from_url(redis_url, socket_timeout=90)
    slots = OllamaSlots(client, limit=1, lease_seconds=120, wait_seconds=120)
    order: list[str] = []
    holder = _Waiter(slots, urgent=False, order=order, name="holder")
    holder.start()
    assert holder.got.wait(10)
    batch = _Waiter(slots, urgent=False, order=order, name="batch")
    batch.start()
    _wait_blocked(client, 1)
    app_job = _Waiter(slots, urgent=True, order=order, name="app job")
    app_job.start()
    _wait_registered(client, 1)
    _wait_blocked(client, 2)

    holder.done.set()  # the holder lets go: the urgent waiter is woken, the batch is not
    assert app_job.got.wait(10), "a released slot did not wake the urgent waiter"
    assert not batch.got.is_set()
    app_job.done.set()
    assert batch.got.wait(10), "the urgent caller's release did not wake the waiting batch"
    batch.done.set()
    for thread in (holder, app_job, batch):
        thread.join(10)
    assert order == ["holder", "app job", "batch"]
    client.close()


def test_a_slot_whose_holder_died_is_taken_once_its_lease_runs_out(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    slots = OllamaSlots(client, limit=1, lease_seconds=0.5, wait_seconds=30)
    # A holder that died: it took the slot and will never release it nor wake anyone.
    assert client.lock(f"embedder:ollama:{URL}:slot:0", timeout=0.5).acquire(blocking=False)
    order: list[str] = []
    waiter = _Waiter(slots, urgent=False, order=order, name="waiter")
    waiter.start()
    assert waiter.got.wait(10), "the slot stayed taken after its lease ran out"
    waiter.done.set()
    waiter.join(10)
    client.close()
