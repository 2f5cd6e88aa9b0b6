"""What an operator watches a worker with: JSON logs, the metrics endpoint, the heartbeat."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_init,
    worker_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from tasks import CONSUMED
from worker import logs, metrics
from worker.health import heartbeat_step
from worker.settings import Settings


def install_observability(app: Celery, settings: Settings) -> None:
    """Connect the worker's signals and its heartbeat step, as `settings` asks.

    Handlers are closures over `settings`, so they are held strongly (weak=False); the
    dispatch_uid keeps a second create_app in one process from connecting them twice.
    """
    app.steps["consumer"].add(heartbeat_step(settings))
    if settings.log_format == "json":
        after_setup_logger.connect(logs.on_logger_setup, weak=False, dispatch_uid="embedder-json")
        after_setup_task_logger.connect(
            logs.on_logger_setup, weak=False, dispatch_uid="embedder-json-task"
        )

        def quiet_banner(instance: Any = None, **_: Any) -> None:
            # The startup banner is printed, not logged: it would break one-object-a-line.
            if instance is not None:
                instance.quiet = True
            logs.capture_warnings()

        celeryd_init.connect(quiet_banner, weak=False, dispatch_uid="embedder-quiet")
    if settings.metrics_port is None:
        return
    created: list[Path] = []

    def prepare(**_: Any) -> None:
        # worker_init comes in the main process before the pool forks: the pool's processes
        # inherit the directory and count into it.
        directory = metrics.prepare_multiprocess_dir(settings)
        if settings.prometheus_multiproc_dir is None:
            created.append(directory)

    def serve(**_: Any) -> None:
        metrics.serve(settings, CONSUMED)

    def pool_process_exited(**_: Any) -> None:
        metrics.process_exited(os.getpid())

    def cleanup(**_: Any) -> None:
        for directory in created:
            metrics.remove_multiprocess_dir(directory)

    worker_init.connect(prepare, weak=False, dispatch_uid="embedder-metrics-dir")
    worker_ready.connect(serve, weak=False, dispatch_uid="embedder-metrics-serve")
    worker_process_shutdown.connect(
        pool_process_exited, weak=False, dispatch_uid="embedder-metrics-exit"
    )
    worker_shutdown.connect(cleanup, weak=False, dispatch_uid="embedder-metrics-cleanup")
