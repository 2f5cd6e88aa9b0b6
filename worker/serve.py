"""What a worker (or beat) process adds to the light Celery app when it starts.

Called from the loader's `init_worker` (worker.celery_app), before the worker reads its
configuration: the full settings, the tasks' runtime, the worker's own Celery options, the
observability signals, and the hooks of each pool process (connections, the recovery pass).
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from typing import Any

from celery import Celery
from celery.exceptions import CPendingDeprecationWarning
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready

from tasks import INTERACTIVE, loops, runtime
from tasks.jobs import reconcile
from worker import catch_up, logs
from worker.observability import install_observability
from worker.settings import Settings, mask_url

logger = logging.getLogger(__name__)


def configure_worker(app: Celery, settings: Settings) -> None:
    """Install the runtime and give `app` the options a consuming process runs with."""
    runtime.install(settings)
    logs.quiet_libraries()
    app.conf.update(
        # Ack after the job: a worker killed mid-job leaves its message to be delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_time_limit=settings.task_time_limit_seconds,
        broker_transport_options={
            # Longer than any job, including a retry's countdown that the worker holds unacked.
            "visibility_timeout": settings.broker_visibility_timeout_seconds,
            # Drain queues in name order: "celery" and "embed" (the app's jobs) before
            # "embed_bulk".
            "queue_order_strategy": "sorted",
            "unacked_restore_interval": min(10, settings.broker_visibility_timeout_seconds),
            "unacked_restore_throttle": 1,
        },
        # Flower needs events; "sent" events show jobs that wait in the queue, too.
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        task_track_started=True,
        # A lost broker connection must not kill the job in flight: its batch's vectors are
        # written all the same, and its message comes back if it was not acknowledged.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Back within a second of Redis's return (worker.consumer), however long it was away:
        # a worker waits for its broker rather than giving up after 100 attempts.
        broker_connection_max_retries=None,
        # Prefetch is 1: after a reconnect there is nothing to reduce, only a line to log.
        worker_enable_prefetch_count_reduction=False,
        worker_consumer=(
            "worker.consumer:NeighbourlyConsumer"
            if settings.worker_mingle_gossip
            else "worker.consumer:EmbedderConsumer"
        ),
        beat_schedule={
            "reconcile": {
                "task": "tasks.reconcile",
                "schedule": settings.reconcile_interval_seconds,
                "options": {"queue": INTERACTIVE, "expires": settings.reconcile_interval_seconds},
            }
        },
    )
    install_observability(app, settings)
    worker_process_init.connect(_start_pool_process, weak=False, dispatch_uid="embedder-pool")
    worker_ready.connect(_quiet_connection_loss, weak=False, dispatch_uid="embedder-quiet")
    worker_process_shutdown.connect(_stop_batches, weak=False, dispatch_uid="embedder-stop")
    logger.debug(
        "broker %s, database %s", mask_url(settings.redis_url), settings.masked_database_url
    )


def _quiet_connection_loss(**_: Any) -> None:
    # Jobs are kept running through a lost broker connection on purpose (above); Celery warns
    # about that choice in seven lines at each loss. Filtered once its logging setup has
    # turned its own warnings on.
    warnings.filterwarnings(
        "ignore", r"\s*In Celery 5\.1 we introduced", CPendingDeprecationWarning
    )


def _start_pool_process(**_: Any) -> None:
    # A forked pool process must not reuse the parent's database or HTTP sockets.
    rt = runtime.current()
    rt.reset()
    loops.reset()
    # The batch loop's threads wait on Ollama and PostgreSQL while the job thread runs Python;
    # a shorter GIL switch interval hands them the GIL sooner when their answer arrives.
    sys.setswitchinterval(0.001)
    # The recovery pass: runs whose items no live batch holds (their worker died, their jobs
    # wait in its unacked messages for the visibility timeout) get a loop here, now and while
    # they stay open, without beat.
    threading.Thread(
        target=loops.loops(rt).recover_every,
        args=(rt.settings.recovery_interval_seconds,),
        name="run-recovery",
        daemon=True,
    ).start()
    # What a refused enqueue left stale is reconciled without beat, by one worker at a time.
    catch_up.start(rt.redis, reconcile, rt.settings.catch_up_interval_seconds)


def _stop_batches(**_: Any) -> None:
    # Batches claimed now would only wait out their lease: leave those items to their jobs.
    loops.stop()
    catch_up.stop()
