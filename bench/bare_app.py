"""A bare Celery app with the worker's own options and two tasks that do nothing: the floor a
job costs.

`celery -A bench.bare_app worker` consumes `bare.noop` and `bare.ping` with concurrency 1, late
acks, prefetch 1 and task events on, as `celery -A worker worker` does; bench.from_command
measures its CPU per job beside the embedder's CPU per skill, bench.app_lane the time from a
publish to a job's body beside the time from a publish to its row.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import redis
from celery import Celery, signals

app = Celery("bare", broker=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    worker_concurrency=1,
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_track_started=True,
    task_default_queue="bare",
)


@signals.worker_ready.connect(weak=False)
def _consuming(**_: Any) -> None:
    """A heartbeat file, as the embedder's worker writes: devstack.stack waits for it."""
    if directory := os.environ.get("HEALTH_DIR"):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "bare.heartbeat").touch()


@app.task(name="bare.noop", ignore_result=True, acks_late=True)
def noop(skill_id: str, tenant_id: str, run_id: str) -> str:
    return "unchanged"


@cache
def _broker() -> redis.Redis:
    return redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))


@app.task(name="bare.ping", ignore_result=True, acks_late=True)
def ping(reply_to: str) -> None:
    """Answer on a Redis list at once: the publisher times a job from its send to its body."""
    _broker().lpush(reply_to, "1")
