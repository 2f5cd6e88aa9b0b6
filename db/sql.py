"""The one way to the database: SQL text with `:name` parameters on a SQLAlchemy Connection.

Every statement the worker runs is `conn.execute(text(SQL), {...})` on a Connection from one
pooled Engine (psycopg 3 underneath). Core, not the ORM: the ORM's unit of work around a
statement cost an idle worker's job more than the statement itself; Core's compiled-text cache
costs a few tens of microseconds a statement over psycopg alone (bench.statements measures the
three). Transactions that touch one tenant's rows are scoped to it (row level security):
`tenant_scope`, or `scope_to_tenant` inside a transaction that serves several tenants.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Connection, CursorResult, Engine, Result, create_engine, text
from sqlalchemy.pool import NullPool

TENANT_SETTING = "app.current_tenant_id"
# Fail fast when the database is unreachable rather than hanging a job.
_CONNECT_ARGS = {"connect_timeout": 5, "application_name": "everyskill-embedder"}
_SCOPE = text("SELECT set_config(:setting, :tenant, true)")


def make_engine(database_url: str, *, pool_size: int = 4, pooled: bool = True) -> Engine:
    """An engine for a psycopg 3 URL; a small pool: a worker process holds at most a job's
    transaction and three batches' (tasks.loops). Unpooled, each use connects anew: for reads
    that are seldom and must never wait for a connection the pool's holders keep."""
    if not pooled:
        return create_engine(database_url, poolclass=NullPool, connect_args=_CONNECT_ARGS)
    return create_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=2,
        pool_pre_ping=True,
        connect_args=_CONNECT_ARGS,
    )


def scope_to_tenant(conn: Connection, tenant_id: str) -> None:
    """From here to the end of the transaction, row level security shows `tenant_id`'s rows."""
    # set_config(..., true) is SET LOCAL with a bind parameter: it ends with the transaction,
    # so a pooled connection never carries one tenant's id into another's work.
    conn.execute(_SCOPE, {"setting": TENANT_SETTING, "tenant": tenant_id})


@contextmanager
def unscoped(engine: Engine) -> Iterator[Connection]:
    """A transaction on tables without row level security (tenants, the worker's own), or one
    that scopes itself per tenant as it goes; commits on exit."""
    with engine.begin() as conn:
        yield conn


@contextmanager
def tenant_scope(engine: Engine, tenant_id: str) -> Iterator[Connection]:
    """A transaction in which row level security shows only `tenant_id`'s rows; commits on exit."""
    with engine.begin() as conn:
        scope_to_tenant(conn, tenant_id)
        yield conn


# Tenants read at once (per_tenant): a pass over a tenant's catalog hashes its published texts
# in PostgreSQL, and row level security keeps a statement to one tenant, so a large catalog of
# many tenants is read on several of the server's cores instead of one tenant after the other.
TENANT_CONNECTIONS = 4
T = TypeVar("T")


def per_tenant(
    engine: Engine, tenants: Sequence[str], read: Callable[[Connection, str], T]
) -> dict[str, T]:
    """`read(conn, tenant)` for each tenant, each in a transaction scoped to it, on up to
    TENANT_CONNECTIONS connections at once."""

    def one(tenant: str) -> T:
        with tenant_scope(engine, tenant) as conn:
            return read(conn, tenant)

    if len(tenants) < 2:
        return {tenant: one(tenant) for tenant in tenants}
    with ThreadPoolExecutor(min(TENANT_CONNECTIONS, len(tenants))) as pool:
        return dict(zip(tenants, pool.map(one, tenants), strict=True))


def held(engine: Engine) -> Connection:
    """A connection whose transaction the caller ends (`commit()`, or `close()`: a rollback), for
    a batch whose open transaction is its claim on its items."""
    return engine.connect()


_HOLD = text("SELECT set_config('idle_in_transaction_session_timeout', :ms, true)")


def end_if_silent(conn: Connection, seconds: float) -> None:
    """If the transaction's client stops answering (frozen, cut off) for `seconds`, PostgreSQL
    ends the transaction, and the row locks it holds (a batch's claims)."""
    conn.execute(_HOLD, {"ms": f"{int(seconds * 1000)}ms"})


_COLUMN = text(
    "SELECT atttypmod FROM pg_attribute WHERE attname = 'embedding'"
    " AND attrelid = to_regclass('skill_embeddings')"
)


def column_dimensions(engine: Engine) -> int | None:
    """The size of `skill_embeddings.embedding`, as the database declares it."""
    with engine.connect() as conn:
        value = conn.execute(_COLUMN).scalar()
    return int(value) if value and value > 0 else None


def ping(engine: Engine) -> None:
    """One round trip: the database answers, as this role."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE, INSERT or DELETE touched."""
    return int(result.rowcount) if isinstance(result, CursorResult) else 0
