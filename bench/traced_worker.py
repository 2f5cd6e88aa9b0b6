"""The embedder's worker with a clock at each step of an app job: `celery -A bench.traced_worker
worker` runs exactly what `celery -A worker worker` runs, and each process appends
`<perf_counter> <step>` lines to `$STEPS_LOG.<pid>` (perf_counter is one clock for every
process of the machine). bench.publish_steps reads them.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any, TextIO

from celery import signals

from worker import app

__all__ = ["app"]

_log: TextIO | None = None


def mark(step: str) -> None:
    global _log
    if _log is None:
        _log = open(f"{os.environ['STEPS_LOG']}.{os.getpid()}", "a", buffering=1)  # noqa: SIM115
    _log.write(f"{time.perf_counter():.7f} {step}\n")


@signals.task_received.connect(weak=False)
def _received(**_: Any) -> None:
    mark("received")


@signals.task_prerun.connect(weak=False)
def _prerun(**_: Any) -> None:
    mark("prerun")


def _around(owner: Any, name: str, before: str | None, after: str | None) -> None:
    function: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            mark(before)
        try:
            return function(*args, **kwargs)
        finally:
            if after:
                mark(after)

    setattr(owner, name, wrapper)


@signals.worker_process_init.connect(weak=False)
def _trace_steps(**_: Any) -> None:
    from tasks import app_lane

    _around(app_lane, "_start", None, "looked")
    _around(app_lane, "fetch_vectors", "fetching", "fetched")
