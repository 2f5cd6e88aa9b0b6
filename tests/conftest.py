"""Throwaway servers (PostgreSQL + pgvector, Redis, fake Ollama, workers); fresh state per test.

A test that asks for `worker` gets the session's shared worker (tests.shared_worker), and with
it that worker's database and Redis, emptied before the test; every other test gets a database
of its own and the session's other Redis, emptied.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from db import catalog, migrate, runs
from db.sql import make_engine, scope_to_tenant
from devstack.fake_ollama import FakeOllama
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis
from tests.databases import (
    OWNER,
    TENANT_A,
    Database,
    build_app_schema,
    create_roles,
    throwaway_database,
)
from tests.processes import Process, start_worker
from tests.shared_worker import SharedWorker

# Whole end-to-end modules (the demo, the compose file, broker outages): slow throughout.
SLOW_MODULES = {"test_demo.py", "test_compose.py", "test_outages.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    server = LocalPostgres(tmp_path_factory.mktemp("postgres") / "data", durable=False).start()
    try:
        create_roles(server)
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def app_template(postgres: LocalPostgres) -> Iterator[str]:
    """A template database holding the app's own tables, not yet migrated by the worker."""
    with throwaway_database(postgres) as database:
        build_app_schema(database)
        database.dispose()
        yield database.name


@pytest.fixture(scope="session")
def worker_template(postgres: LocalPostgres, app_template: str) -> Iterator[str]:
    """The app's database after `python -m worker migrate`, run by the tables' owner."""
    with throwaway_database(postgres, app_template) as database:
        engine = make_engine(database.url(OWNER).replace("postgresql://", "postgresql+psycopg://"))
        migrate.upgrade(engine)
        engine.dispose()
        yield database.name


@pytest.fixture
def empty_db(postgres: LocalPostgres) -> Iterator[Database]:
    with throwaway_database(postgres) as database:
        yield database


@pytest.fixture
def app_db(postgres: LocalPostgres, app_template: str) -> Iterator[Database]:
    with throwaway_database(postgres, app_template) as database:
        yield database


@pytest.fixture(scope="session")
def shared(
    postgres: LocalPostgres, worker_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedWorker]:
    server = LocalRedis().start()
    stack = SharedWorker(postgres, worker_template, server, tmp_path_factory.mktemp("shared"))
    try:
        yield stack
    finally:
        stack.close()
        server.stop()


def uses_shared_worker(request: pytest.FixtureRequest) -> bool:
    """Whether the test's `worker` is the shared one: it is this file's `worker` (a module may
    define its own), and the test does not ask for `redis_server`, the Redis it would stop or
    restart under a worker (such a test gets a worker of its own on that Redis)."""
    info = request.node._fixtureinfo
    definitions = info.name2fixturedefs.get("worker", ())
    return (
        bool(definitions)
        and definitions[-1].func.__module__ == __name__
        and "redis_server" not in info.argnames
    )


@pytest.fixture(autouse=True)
def _shared_state_reset(request: pytest.FixtureRequest) -> None:
    """Before anything else of a test on the shared worker: the worker idle, its database and
    Redis empty, the fake Ollama's gates released and its stats cleared."""
    if not uses_shared_worker(request):
        return
    fake: FakeOllama = request.getfixturevalue("ollama")
    stack: SharedWorker = request.getfixturevalue("shared")
    stack.reset()
    fake.reset()  # anything the previous test's last job sent is not this test's


@pytest.fixture
def db(
    request: pytest.FixtureRequest, postgres: LocalPostgres, worker_template: str
) -> Iterator[Database]:
    """The drop-in case: the app's tables plus the worker's, with no rows."""
    if uses_shared_worker(request):
        stack: SharedWorker = request.getfixturevalue("shared")
        yield stack.database
        stack.database.dispose()
        return
    with throwaway_database(postgres, worker_template) as database:
        yield database


@pytest.fixture
def engine(db: Database) -> Iterator[sa.Engine]:
    """Connections as the worker's non-owner role, under row level security."""
    engine = make_engine(db.app_url.replace("postgresql://", "postgresql+psycopg://"))
    yield engine
    engine.dispose()


@pytest.fixture
def pending_run(db: Database, engine: sa.Engine) -> str:
    """The id of a run of 10 published skills, all pending, as `tasks.backfill` records it."""
    db.add_tenant(TENANT_A)
    db.published_catalog(TENANT_A, 10)
    run_id = str(uuid.uuid4())
    with engine.begin() as conn:
        runs.create_run(conn, run_id, None, False)
        scope_to_tenant(conn, TENANT_A)
        counted = catalog.survey(conn, TENANT_A, model="nomic-embed-text", dimensions=768,
                                 force=False)  # fmt: skip
        runs.add_tenant_items(conn, run_id, TENANT_A, counted.published, counted.needing)
    return run_id


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    server = LocalRedis().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ollama_server() -> Iterator[FakeOllama]:
    with FakeOllama() as server:
        yield server


@pytest.fixture
def ollama(ollama_server: FakeOllama) -> Iterator[FakeOllama]:
    """The session's fake Ollama with default knobs and no faults or stats."""
    ollama_server.reset()
    ollama_server.request_latency = ollama_server.input_latency = 0.0
    ollama_server.dimensions = 768
    ollama_server.models = {"nomic-embed-text"}
    ollama_server.model_dimensions = {}
    ollama_server.embedding_capable = True
    if ollama_server.port and not _listening(ollama_server.port):
        ollama_server.up()
    return ollama_server


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def redis_url(request: pytest.FixtureRequest, redis_server: LocalRedis) -> str:
    """The session's Redis, emptied: no queued job leaks from one test into the next."""
    if uses_shared_worker(request):
        stack: SharedWorker = request.getfixturevalue("shared")
        return stack.redis_url  # emptied by _shared_state_reset, Kombu's bindings kept
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def embedder_env(db: Database, redis_url: str, ollama: FakeOllama) -> dict[str, str]:
    """The environment a deployment gives the worker: the app's non-owner role, fast retries."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("EMBED")}
    env.update(
        DATABASE_URL=db.app_url,
        REDIS_URL=redis_url,
        OLLAMA_URL=ollama.url,
        OLLAMA_MODEL="nomic-embed-text",
        EMBEDDING_DIMENSIONS="768",
        EMBED_RETRY_BACKOFF_SECONDS="0.05",
        EMBED_RETRY_BACKOFF_MAX_SECONDS="0.2",
        EMBED_MAX_RETRIES="4",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def worker(
    request: pytest.FixtureRequest, embedder_env: dict[str, str], tmp_path: Path
) -> Iterator[Process]:
    """A real `celery -A worker worker` process serving this test, idle when it starts: the
    session's shared one (tests.shared_worker), whose `log()` holds this test's lines only, or
    one of the test's own (see uses_shared_worker)."""
    if uses_shared_worker(request):
        stack: SharedWorker = request.getfixturevalue("shared")
        yield stack.serve(embedder_env)
        return
    process = start_worker(embedder_env, tmp_path / "worker.log")
    try:
        yield process
    finally:
        process.kill()  # the test is over: its shutdown is not under test


@pytest.fixture
def own_worker(embedder_env: dict[str, str], tmp_path: Path) -> Iterator[Process]:
    """A `celery -A worker worker` process of this test's alone: for tests that kill it, cut its
    connections or hold it up."""
    process = start_worker(embedder_env, tmp_path / "worker.log")
    try:
        yield process
    finally:
        process.kill()  # the test is over: its shutdown is not under test
