"""One throwaway stack: PostgreSQL (migrated), Redis, fake Ollamas and real workers.

    with stack() as s:
        fake = s.fake(7.5, 4.3)                    # a fake Ollama in a process of its own
        worker = s.worker(s.env(fake.url))         # `celery -A worker worker`, consuming
        ...

Everything it started is stopped when the block ends, whatever happened in it: workers first
(SIGTERM to their process group, SIGKILL after a grace period), then the fakes, Redis and
PostgreSQL, whose data directory goes with the temporary directory. The benchmarks start their
servers through it; a test may too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import redis as redis_lib
import sqlalchemy as sa

from devstack.fake_process import FakeOllamaProcess
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis

ROOT = Path(__file__).resolve().parent.parent
CELERY = (sys.executable, "-m", "celery")


class Worker:
    """A `celery -A <app> worker --loglevel=<loglevel> [options]` (as a user types it, plus
    `--hostname` when given) in a process group of its own, its output in a log file.

    It counts as started once it consumes: its heartbeat file appears in its own HEALTH_DIR
    (the embedder's worker writes it from a consumer bootstep; bench.bare_app from
    `worker_ready`). `started_in` is the seconds from the command to that moment."""

    def __init__(
        self,
        env: dict[str, str],
        log: Path,
        *,
        app: str = "worker",
        name: str = "w1",
        hostname: str | None = None,
        options: Sequence[str] = (),
        loglevel: str = "WARNING",
    ) -> None:
        self.name = name
        self.log_path = log
        self.health = log.with_suffix(".health")
        self.env = {**env, "HEALTH_DIR": str(self.health)}
        command = [*CELERY, "-A", app, "worker", f"--loglevel={loglevel}", *options]
        if hostname is not None:
            command.append(f"--hostname={hostname}")
        started = time.perf_counter()
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.started_in = self._wait_consuming(started)

    def _wait_consuming(self, started: float, timeout: float = 120.0) -> float:
        while not any(self.health.glob("*.heartbeat")):
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log()[-3000:]}")
            if time.perf_counter() - started > timeout:
                self.stop()
                raise RuntimeError(f"worker {self.name} not consuming:\n{self.log()[-3000:]}")
            time.sleep(0.005)
        return time.perf_counter() - started

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the process group (a warm shutdown), SIGKILL it after `timeout`."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def fresh_database(postgres: LocalPostgres, name: str) -> str:
    """A migrated database `name` (dropped first if it exists); returns its URL."""
    from db import migrate

    postgres.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    postgres.psql(f"CREATE DATABASE {name}")
    url = postgres.url(database=name)
    engine = engine_for(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    return url


def engine_for(url: str) -> sa.Engine:
    """An engine for one of the stack's databases, through psycopg 3 (as the worker connects)."""
    from db.sql import make_engine
    from worker.settings import normalise_database_url

    return make_engine(normalise_database_url(url))


@dataclass
class Stack:
    work: Path
    postgres: LocalPostgres
    redis: LocalRedis
    database_url: str
    engine: sa.Engine
    _fakes: list[FakeOllamaProcess] = field(default_factory=list)
    _workers: list[Worker] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return self.redis.url

    @property
    def postgres_pid(self) -> int:
        return int((self.postgres.data_dir / "postmaster.pid").read_text().split()[0])

    @property
    def redis_pid(self) -> int:
        assert self.redis.process is not None
        return self.redis.process.pid

    def fake(
        self, request_ms: float = 0.0, input_ms: float = 0.0, *, models: Sequence[str] = ()
    ) -> FakeOllamaProcess:
        """A fake Ollama in a process of its own (so its CPU is not the caller's), at a cost of
        `request_ms` per request plus `input_ms` per input."""
        fake = FakeOllamaProcess(request_ms, input_ms, self.work / f"fake-{len(self._fakes)}.log")
        self._fakes.append(fake)
        if models:
            fake.configure(models=list(models))
        return fake

    def env(self, ollama_url: str, **extra: str) -> dict[str, str]:
        """The environment of a worker (or a `celery call`, `python -m worker ...`) on this stack;
        OLLAMA_* and EMBED_* of the caller's environment are left out. The worker's own catch-up
        waits an hour (its first turn a quarter of that): a reconcile queuing the catalog's stale
        skills in the middle of a measure is not what a bench measures (`extra` may set it)."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "EMBED_"))}
        return {**inherited, "DATABASE_URL": self.database_url, "REDIS_URL": self.redis.url,
                "OLLAMA_URL": ollama_url, "PYTHONUNBUFFERED": "1",
                "CATCH_UP_INTERVAL_SECONDS": "3600", **extra}  # fmt: skip

    def worker(
        self,
        env: dict[str, str],
        *,
        app: str = "worker",
        name: str = "w1",
        hostname: str | None = None,
        options: Sequence[str] = (),
        loglevel: str = "WARNING",
    ) -> Worker:
        """Start a worker and return once it consumes; it stops with the stack at the latest."""
        log = self.work / f"{name}-{len(self._workers)}.log"
        started = Worker(env, log, app=app, name=name, hostname=hostname, options=options,
                         loglevel=loglevel)  # fmt: skip
        self._workers.append(started)
        return started

    def flush_redis(self) -> None:
        client = redis_lib.Redis.from_url(self.redis.url)
        client.flushall()
        client.close()

    def database(self, name: str) -> str:
        """A fresh migrated database `name` on the same server; returns its URL."""
        return fresh_database(self.postgres, name)

    def drop_database(self, name: str) -> None:
        self.postgres.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        for fake in self._fakes:
            with contextlib.suppress(Exception):
                fake.stop()
        self.engine.dispose()


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def stack(
    *, prefix: str = "stack-", keep: bool = False, durable_redis: bool = False
) -> Iterator[Stack]:
    """PostgreSQL with a migrated database `bench`, and Redis, in a temporary directory; fake
    Ollamas and workers started through the stack stop with it. `durable_redis` gives Redis an
    append-only file (a restart keeps what was queued); `keep` leaves the directory (logs)
    behind and says where."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds as SIGINT does, so the servers come down with the block.
        previous = signal.signal(signal.SIGTERM, _terminated)
    postgres = LocalPostgres(work / "pg", durable=False)
    server = LocalRedis(data_dir=work / "redis" if durable_redis else None)
    started: Stack | None = None
    try:
        postgres.start()
        server.start()
        database_url = fresh_database(postgres, "bench")
        started = Stack(work, postgres, server, database_url, engine_for(database_url))
        yield started
    finally:
        if started is not None:
            started.close()
        server.stop()
        postgres.destroy()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
        if keep:
            print(f"logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
