"""Engines and sessions; every transaction on one tenant's rows is scoped to it: `tenant_scope`
for a session, `scope_connection` for a job's psycopg connection (db.job_statements)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from psycopg import Connection
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

SessionFactory = sessionmaker[Session]
TENANT_SETTING = "app.current_tenant_id"


def make_engine(database_url: str, *, pool_size: int = 4) -> Engine:
    """An engine for a psycopg 3 URL; a small pool: a worker process holds at most a job's
    transaction and three batches' (tasks.batching)."""
    return create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=2,
        pool_pre_ping=True,
        # Fail fast when the database is unreachable rather than hanging a job.
        connect_args={"connect_timeout": 5, "application_name": "everyskill-embedder"},
    )


def make_session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(engine, expire_on_commit=False)


def scope_to_tenant(session: Session, tenant_id: str) -> None:
    """From here to the end of the transaction, row level security shows `tenant_id`'s rows."""
    # set_config(..., true) is SET LOCAL with a bind parameter: it ends with the transaction,
    # so a pooled connection never carries one tenant's id into another's work.
    session.execute(select(func.set_config(TENANT_SETTING, tenant_id, True)))


def scope_connection(conn: Connection[Any], tenant_id: str) -> None:
    """scope_to_tenant on a psycopg connection in a transaction."""
    conn.execute("SELECT set_config(%s, %s, true)", (TENANT_SETTING, tenant_id))


@contextmanager
def job_transaction(engine: Engine) -> Iterator[Connection[Any]]:
    """A transaction on a pooled connection, used through psycopg alone (db.job_statements);
    commits on exit. The pool still pings the connection on checkout and drops it if it broke."""
    fairy = engine.raw_connection()
    conn = cast("Connection[Any]", fairy.driver_connection)
    try:
        with conn.transaction():
            yield conn
    except BaseException:
        if conn.broken:
            fairy.invalidate()
        raise
    finally:
        fairy.close()


def driver(session: Session) -> Connection[Any]:
    """The psycopg connection under a session's transaction (db.job_statements runs on it)."""
    return cast("Connection[Any]", session.connection().connection.driver_connection)


@contextmanager
def tenant_scope(factory: SessionFactory, tenant_id: str) -> Iterator[Session]:
    """A transaction in which row level security shows only `tenant_id`'s rows; commits on exit."""
    with factory.begin() as session:
        scope_to_tenant(session, tenant_id)
        yield session


@contextmanager
def unscoped(factory: SessionFactory) -> Iterator[Session]:
    """A transaction on tables without row level security (tenants, the worker's own)."""
    with factory.begin() as session:
        yield session
