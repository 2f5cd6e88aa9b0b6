"""The runtime: the Celery app (`celery -A worker ...`), its settings and the command line.

Importing this package is cheap: the Celery app is built on first access of `worker.app`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    app: Celery


def __getattr__(name: str) -> Any:
    if name in {"app", "celery"}:
        from worker.celery_app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
