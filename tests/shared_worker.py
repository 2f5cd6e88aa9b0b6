"""One `celery worker` process that serves test after test, on one database and one Redis.

Starting a worker takes seconds; most tests only need one to be there. Between two tests the
worker is left idle, its database emptied (TRUNCATE: its pooled connections stay valid) and its
Redis cleared of all but Kombu's bindings (which the worker declared once, at its start). A test
that kills or cuts a worker, or needs other settings, starts its own instead.
"""

from __future__ import annotations

import time
from pathlib import Path

import redis

from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis
from tasks import CONSUMED
from tests.databases import Database
from tests.processes import Process, start_worker

# Catch-up reconciles once a minute in each worker: over a session that would fire in the middle
# of unrelated tests (a fresh worker's first turn comes 15 s after its start, after most tests).
SHARED_ONLY = {"CATCH_UP_INTERVAL_SECONDS": "3600"}
IDLE_TIMEOUT = 15.0


class SharedWorker:
    def __init__(
        self, postgres: LocalPostgres, template: str, server: LocalRedis, log_dir: Path
    ) -> None:
        self.postgres = postgres
        self.template = template
        self.server = server
        self.log_dir = log_dir
        self.database = self._create_database()
        self.tables = self.database.tables()
        self.schema = self.database.schema()
        self.process: Process | None = None
        self._env: dict[str, str] | None = None
        self._starts = 0

    @property
    def redis_url(self) -> str:
        return self.server.url

    def reset(self) -> None:
        """Before a test: the worker idle, no row in the database, no key in Redis."""
        if self.process is not None and self.process.alive() and not self._idle():
            self.stop()  # still busy with the previous test: a fresh one is cheaper than waiting
        self.database.dispose()
        try:
            self.database.reset(self.tables)
            same_schema = self.database.schema() == self.schema
        except Exception:
            same_schema = False
        if not same_schema:
            # The last test changed more than rows (or left a lock): start over from the template.
            self.stop()
            self.database.dispose()
            self.postgres.psql(f"DROP DATABASE IF EXISTS {self.database.name} WITH (FORCE)")
            self.database = self._create_database()
        client = redis.Redis.from_url(self.redis_url)
        try:
            keys = [key for key in client.keys("*") if not key.startswith(b"_kombu.binding.")]
            if keys:
                client.delete(*keys)
        finally:
            client.close()

    def serve(self, env: dict[str, str]) -> Process:
        """The shared worker, running with `env`; its log from here on is this test's."""
        # pytest names the running test in the environment: no setting of the worker's.
        env = {key: value for key, value in env.items() if key != "PYTEST_CURRENT_TEST"}
        if self.process is None or not self.process.alive() or env != self._env:
            self.stop()
            self._starts += 1
            path = self.log_dir / f"shared-worker-{self._starts}.log"
            self.process = start_worker({**env, **SHARED_ONLY}, path)
            self._env = env
        self.process.new_log_section()
        return self.process

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # between tests: no job of a test left to finish
        self.process = None

    def close(self) -> None:
        self.stop()
        self.database.dispose()
        self.postgres.psql(f"DROP DATABASE IF EXISTS {self.database.name} WITH (FORCE)")

    def _create_database(self) -> Database:
        name = f"shared_{time.monotonic_ns()}"
        self.postgres.psql(f"CREATE DATABASE {name} TEMPLATE {self.template}")
        return Database(self.postgres, name)

    def _idle(self) -> bool:
        """No job queued and none delivered but unacknowledged (in flight or held for a retry);
        a worker restarted since (Redis too) has no bindings and counts as busy."""
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + IDLE_TIMEOUT
        try:
            while True:
                try:
                    bound = client.exists(f"_kombu.binding.{CONSUMED[1]}")
                    busy = sum(client.llen(queue) for queue in CONSUMED) + client.hlen("unacked")
                except redis.RedisError:
                    return False
                if not bound:
                    return False
                if not busy:
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
        finally:
            client.close()
