"""Alembic environment: runs on the connection `db.migrate` hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from db.migrate import VERSION_TABLE

connection: Connection = context.config.attributes["connection"]
context.configure(
    connection=connection, version_table=VERSION_TABLE, transaction_per_migration=True
)
with context.begin_transaction():
    context.run_migrations()
