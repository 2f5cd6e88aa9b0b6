"""everyskill-embedder's work. This package's own module is what a producer imports: the
producer API for the web app (enqueue `tasks.embed_skill`, never raise, never wait long) and the
queue names the worker's configuration and every producer share; it loads nothing heavy.

The modules, in the order a job's life meets them (README.md, "How it works", has the map):
jobs (the Celery tasks) -> app_lane (an app job and its companions) or loops (a run's batches)
-> embedding (load, decide, fetch, write) -> progress (outcomes, lines, the summary); beside
them backfill (a run's start, fan-out and close), switch (a model switch, plugged in through
runtime's hooks), runtime (resources), provider and ollama (the vectors), retry (errors).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

# The worker drains queues in sorted name order ("embed" < "embed_bulk"), so a job from the app
# is always taken before any waiting backfill job.
INTERACTIVE = "embed"
BULK = "embed_bulk"
# Celery's default queue: where a producer that names no queue sends (celery-node's
# `createTask(...).applyAsync(...)` among them). The worker serves it as an interactive lane.
CELERY_DEFAULT = "celery"
CONSUMED = (CELERY_DEFAULT, INTERACTIVE, BULK)
EMBED_SKILL = "tasks.embed_skill"

_apps: dict[str, Celery] = {}
_lock = threading.Lock()


def _producer(broker_url: str) -> Celery:
    # Celery is imported on first use, so importing `tasks` costs the app nothing.
    from celery import Celery

    with _lock:
        app = _apps.get(broker_url)
        if app is None:
            app = Celery("everyskill-embedder-producer", broker=broker_url, set_as_current=False)
            app.conf.update(
                task_serializer="json",
                broker_connection_retry=False,
                broker_connection_max_retries=0,
                broker_connection_timeout=0.3,
                # A down or unreachable Redis must cost the request at most a few hundred ms.
                broker_transport_options={
                    "socket_connect_timeout": 0.3,
                    "socket_timeout": 0.3,
                    "max_retries": 0,
                },
                task_create_missing_queues=True,
                # Flower shows a job as soon as it waits in the queue, not only once taken.
                task_send_sent_event=True,
            )
            _apps[broker_url] = app
        return app


def enqueue_embed_skill(
    skill_id: str, tenant_id: str | None = None, *, broker_url: str | None = None
) -> bool:
    """Queue an embedding refresh for a published or edited skill; False if it could not be queued.

    Fire-and-forget: the database stays the truth, and the periodic reconcile catches any skill
    whose job was never queued. `broker_url` defaults to the REDIS_URL environment variable.
    """
    url = broker_url or os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    try:
        _producer(url).send_task(
            EMBED_SKILL,
            args=[skill_id],
            kwargs={"tenant_id": tenant_id},
            queue=INTERACTIVE,
            retry=False,
        )
    except Exception as exc:  # the contract is "never raises": say why, return False
        logger.warning("could not enqueue tasks.embed_skill for %s: %s", skill_id, exc)
        return False
    return True


__all__ = [
    "BULK",
    "CELERY_DEFAULT",
    "CONSUMED",
    "EMBED_SKILL",
    "INTERACTIVE",
    "enqueue_embed_skill",
]
