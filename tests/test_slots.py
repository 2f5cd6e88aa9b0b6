"""Ollama's slots in Redis: one request at a time per URL, and a slot freed when Redis returns."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

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
