"""The Celery app: `celery -A worker worker` is right by default (one job at a time, late acks)."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown
from kombu import Exchange, Queue

from tasks import runtime
from tasks.queues import BULK, CELERY_DEFAULT, INTERACTIVE
from worker import logs
from worker.observability import install_observability
from worker.settings import ConfigError, Settings, mask_url

logger = logging.getLogger(__name__)


def load_settings() -> Settings:
    try:
        return Settings.load()
    except ConfigError as exc:
        # Celery would print a traceback for an import error; an operator needs one line.
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def create_app(settings: Settings) -> Celery:
    """The app, configured from `settings`; tasks come from `tasks.jobs`."""
    runtime.install(settings)
    logs.quiet_libraries()
    app = Celery(
        "everyskill-embedder",
        broker=settings.redis_url,
        backend=settings.redis_url,
        include=["tasks.jobs"],
    )
    transport_options: dict[str, Any] = {
        # Longer than any job, including a retry's countdown that the worker holds unacked.
        "visibility_timeout": settings.broker_visibility_timeout_seconds,
        # Drain queues in name order: "celery" and "embed" (the app's jobs) before "embed_bulk".
        "queue_order_strategy": "sorted",
        "unacked_restore_interval": min(10, settings.broker_visibility_timeout_seconds),
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Ollama serves one embedding request at a time: more would only queue inside it.
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        # Ack after the job: a worker killed mid-job leaves its message to be delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_time_limit=settings.task_time_limit_seconds,
        # Sorted queue order: "celery" < "embed" < "embed_bulk". Both interactive lanes, the
        # default queue of a producer that names none and the app's own, drain before bulk.
        # "celery" keeps Celery's own exchange and key for it, so that no message routed to
        # the other queues is also bound to it.
        task_queues=(
            Queue(CELERY_DEFAULT, Exchange(CELERY_DEFAULT), routing_key=CELERY_DEFAULT),
            Queue(INTERACTIVE),
            Queue(BULK),
        ),
        task_default_queue=INTERACTIVE,
        broker_transport_options=transport_options,
        result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
        result_expires=86400,
        broker_connection_retry_on_startup=True,
        # Flower needs events; "sent" events show jobs that wait in the queue, too.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        task_track_started=True,
        beat_schedule={
            "reconcile": {
                "task": "tasks.reconcile",
                "schedule": settings.reconcile_interval_seconds,
                "options": {"queue": INTERACTIVE, "expires": settings.reconcile_interval_seconds},
            }
        },
    )
    if settings.flower_basic_auth:
        # Flower reads FLOWER_BASIC_AUTH from its own environment only, never app.conf; this
        # carries a value that came from .env over to it (it loads the app before reading).
        os.environ.setdefault("FLOWER_BASIC_AUTH", settings.flower_basic_auth)
    install_observability(app, settings)
    logger.debug(
        "broker %s, database %s", mask_url(settings.redis_url), settings.masked_database_url
    )
    return app


@worker_process_init.connect
def _start_pool_process(**_: Any) -> None:
    # A forked pool process must not reuse the parent's database or HTTP sockets.
    rt = runtime.current()
    rt.reset()
    # The batch loop's threads wait on Ollama and PostgreSQL while the job thread runs Python;
    # a shorter GIL switch interval hands them the GIL sooner when their answer arrives.
    sys.setswitchinterval(0.001)
    # The recovery pass: runs whose items no live batch holds (their worker died, their jobs
    # wait in its unacked messages for the visibility timeout) get a loop here, now and while
    # they stay open, without beat.
    interval = rt.settings.recovery_interval_seconds
    threading.Thread(
        target=rt.loops.recover_every, args=(interval,), name="run-recovery", daemon=True
    ).start()


@worker_process_shutdown.connect
def _stop_batches(**_: Any) -> None:
    # Batches claimed now would only wait out their lease: leave those items to their jobs.
    runtime.current().stop_batches()


app = create_app(load_settings())
