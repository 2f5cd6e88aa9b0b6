"""`python -m worker health [--ready]`: is this host's worker consuming; can it do its work.

Liveness is a heartbeat file the worker's consumer refreshes from its own event loop (the
loop that takes messages off the queues), one file per node name under HEALTH_DIR. A file
rather than a Redis key: liveness must say whether the process works, not whether Redis is
up (readiness says that), and the health command runs in the worker's own container, where
it finds the file without being told the node name. A stopped or wedged worker stops
refreshing it, so `health` fails within a few heartbeat intervals.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from celery import bootsteps

from worker.settings import Settings, mask_url

if TYPE_CHECKING:
    from tasks.runtime import Runtime

SUFFIX = ".heartbeat"
# A heartbeat older than this many intervals means the loop has stopped, not just lagged.
STALE_AFTER_INTERVALS = 3


def heartbeat_path(directory: Path, hostname: str) -> Path:
    return directory / (re.sub(r"[^A-Za-z0-9@._-]", "_", hostname) + SUFFIX)


def heartbeat_step(settings: Settings) -> type[bootsteps.StartStopStep]:
    """A consumer bootstep refreshing this node's heartbeat file every interval."""
    directory = settings.health_dir
    interval = settings.heartbeat_interval_seconds

    class Heartbeat(bootsteps.StartStopStep):
        # After Tasks: the heartbeat starts once the worker consumes its queues.
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.tref: Any = None
            self.path = heartbeat_path(directory, str(parent.hostname))

        def start(self, parent: Any) -> None:
            directory.mkdir(parents=True, exist_ok=True)
            self.beat()
            self.tref = parent.timer.call_repeatedly(interval, self.beat)

        def beat(self) -> None:
            self.path.touch()

        def stop(self, parent: Any) -> None:
            # A consumer restarting (the broker connection was lost) does not consume: the
            # heartbeat pauses until it does again.
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None

        def shutdown(self, parent: Any) -> None:
            self.stop(parent)
            self.path.unlink(missing_ok=True)

    return Heartbeat


@dataclass(frozen=True, slots=True)
class Check:
    part: str
    problem: str | None  # None: healthy
    detail: str = ""

    @property
    def line(self) -> str:
        if self.problem is None:
            return f"ok: {self.part}{': ' + self.detail if self.detail else ''}"
        return f"{self.part}: {self.problem}"


def check_heartbeat(settings: Settings, hostname: str | None = None) -> Check:
    """The named node's heartbeat, or the freshest one on this host when none is named."""
    directory = settings.health_dir
    if hostname is not None:
        files = [heartbeat_path(directory, hostname)]
        files = [f for f in files if f.exists()]
    else:
        files = sorted(directory.glob(f"*{SUFFIX}"), key=_mtime, reverse=True)
    if not files:
        name = hostname or "any worker"
        return Check("worker", f"no heartbeat of {name} in {directory}: is the worker running?")
    newest = files[0]
    node = newest.name.removesuffix(SUFFIX)
    age = time.time() - _mtime(newest)
    limit = STALE_AFTER_INTERVALS * settings.heartbeat_interval_seconds
    if age > limit:
        return Check(
            "worker",
            f"{node} has not consumed for {age:.0f} s (heartbeat older than {limit:g} s):"
            " it is stopped or stuck",
        )
    return Check("worker", None, f"{node} consuming (heartbeat {age:.1f} s ago)")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def check_redis(settings: Settings) -> Check:
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check("redis", f"cannot reach {mask_url(settings.redis_url)}: {exc}")
    finally:
        client.close()
    return Check("redis", None)


def check_readiness(settings: Settings) -> Iterator[Check]:
    """Redis, PostgreSQL (as the worker's role), and each Ollama enabled tenants use."""
    from sqlalchemy.exc import SQLAlchemyError

    from db.sql import ping
    from tasks import runtime

    yield check_redis(settings)
    rt = runtime.install(settings)
    try:
        ping(rt.engine)
    except SQLAlchemyError as exc:
        from worker.errors import describe_operational_error

        reason = describe_operational_error(exc) or str(exc).splitlines()[0]
        yield Check("postgresql", reason)
        return
    yield Check("postgresql", None)
    yield from check_ollamas(rt)


def check_ollamas(rt: Runtime) -> Iterator[Check]:
    """Each distinct (Ollama, model) of the enabled tenants, and the worker's own default."""
    from db import catalog
    from db.sql import tenant_scope, unscoped
    from tasks.embedding import tenant_config
    from tasks.provider import ready
    from tasks.retry import EmbedderError

    settings = rt.settings
    wanted: dict[tuple[str, str], int] = {
        (settings.ollama_url, settings.ollama_model): settings.embedding_dimensions
    }
    with unscoped(rt.engine) as conn:
        tenants = catalog.list_active_tenants(conn)
    for tenant in tenants:
        with tenant_scope(rt.engine, tenant) as conn:
            config = tenant_config(rt, conn, tenant)
        if config.enabled:
            wanted[(config.ollama_url, config.model)] = config.dimensions
    for (url, model), dimensions in wanted.items():
        try:
            ready(rt.providers.for_url(url), model, configured=dimensions)
        except EmbedderError as exc:
            yield Check(f"ollama {url}", str(exc))
        else:
            yield Check(f"ollama {url}", None, f"{model} ready")
