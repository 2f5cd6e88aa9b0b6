"""Session-wide throwaway servers (PostgreSQL with pgvector, Redis, fake Ollama); fresh state per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from db import migrate
from db.session import make_engine
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis
from tests.databases import (
    OWNER,
    Database,
    build_app_schema,
    create_roles,
    throwaway_database,
)


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


@pytest.fixture
def db(postgres: LocalPostgres, worker_template: str) -> Iterator[Database]:
    """The drop-in case: the app's tables plus the worker's, with no rows."""
    with throwaway_database(postgres, worker_template) as database:
        yield database


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
