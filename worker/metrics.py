"""`METRICS_PORT`: the worker's Prometheus endpoint, served by its main process.

The pool's processes count embeddings and time Ollama requests (tasks/metrics.py) into files
under PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode); the main process sums
them at scrape time and adds what it reads then: queue depths from Redis and the newest run's
items from PostgreSQL, so no series is ever labelled with a run id.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import redis
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from db import runs
from db.sql import make_engine, unscoped
from worker.settings import Settings

if TYPE_CHECKING:
    from prometheus_client.core import Metric

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir(settings: Settings) -> Path:
    """Empty the samples directory and point prometheus_client at it, before the pool forks.

    Samples of an earlier worker's processes would otherwise be summed into this one's.
    """
    if settings.prometheus_multiproc_dir is not None:
        directory = settings.prometheus_multiproc_dir
        directory.mkdir(parents=True, exist_ok=True)
        for entry in directory.glob("*.db"):
            entry.unlink()
    else:
        directory = Path(tempfile.mkdtemp(prefix="everyskill-embedder-metrics-"))
    os.environ[MULTIPROC_ENV] = str(directory)
    # prometheus_client chooses its value class when first imported, and the `celery` command
    # imports it before us (Flower's command plugin does): choose again, now that the variable
    # is set. Metrics created from here on (ours are created on first use) count into files.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return directory


class WorkerCollector:
    """Collected at scrape time: queue depth per consumed queue, the newest run's items."""

    def __init__(self, redis_url: str, database_url: str, queues: Sequence[str]) -> None:
        self.redis_url = redis_url
        self.database_url = database_url
        self.queues = tuple(queues)
        self._engine: Engine | None = None

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily(
            "embedder_queue_depth", "Jobs waiting in a queue the worker consumes", labels=["queue"]
        )
        try:
            client = redis.Redis.from_url(
                self.redis_url, socket_timeout=2, socket_connect_timeout=2
            )
            try:
                for queue in self.queues:
                    depth.add_metric([queue], float(client.llen(queue)))
            finally:
                client.close()
            yield depth
        except redis.RedisError as exc:
            logger.warning("metrics: cannot read queue depths from Redis: %s", exc)
        items = GaugeMetricFamily(
            "embedder_backfill_items",
            "Items of the newest backfill run by state (total: every published skill it covers)",
            labels=["state"],
        )
        try:
            counts = self._newest_run_counts()
        except SQLAlchemyError as exc:  # a scrape still answers, with the queue depths
            logger.warning("metrics: cannot read the newest run: %s", exc)
            return
        for state, value in counts.items():
            items.add_metric([state], float(value))
        yield items

    def _newest_run_counts(self) -> dict[str, int]:
        if self._engine is None:
            self._engine = make_engine(self.database_url, pool_size=1)
        with unscoped(self._engine) as conn:
            run = runs.latest_run(conn)
            if run is None:
                return {}
            pending = runs.pending_count(conn, run.id)
        return {
            "total": run.total,
            "pending": pending,
            "embedded": run.embedded,
            "unchanged": run.unchanged,
            "failed": run.failed,
            "skipped": run.skipped,
        }


def serve(settings: Settings, queues: Sequence[str]) -> None:
    """Start the HTTP endpoint on METRICS_PORT in a thread of this (the main) process."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    assert settings.metrics_port is not None
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(WorkerCollector(settings.redis_url, settings.database_url, queues))
    start_http_server(settings.metrics_port, registry=registry)
    logger.info("Metrics on http://0.0.0.0:%d/metrics", settings.metrics_port)


def process_exited(pid: int) -> None:
    """prometheus_client's clean-up for a pool process that ends (its live gauges go)."""
    if MULTIPROC_ENV in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def remove_multiprocess_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
