"""The privileges the worker's role needs, table by table: the one list there is.

`python -m worker grants ROLE` prints these statements and `python -m worker migrate --grant
ROLE` runs them after migrating, so an operator never copies a list that drifts from the code.
A table the worker starts to use is added here in the change that uses it; the test that runs
every task and command as a role holding exactly these grants fails until it is.

The app's tables are read-only where the worker only reads them. A locking read (FOR SHARE,
FOR UPDATE) needs UPDATE as well, and an upsert (ON CONFLICT DO UPDATE) needs INSERT and UPDATE.
"""

from __future__ import annotations

import re
from typing import Final

from sqlalchemy import Connection, text

READ: Final = ("SELECT",)
WRITE: Final = ("SELECT", "INSERT", "UPDATE", "DELETE")

WORKER_PRIVILEGES: Final[dict[str, tuple[str, ...]]] = {
    # The app's tables.
    "tenants": READ,
    "skills": READ,  # its writes lock skills with advisory locks, never FOR UPDATE
    "skill_embeddings": WRITE,
    # Read for each tenant's Ollama and model; held FOR SHARE by writers; a model switch's swap
    # updates its model. The worker never creates a tenant's row.
    "site_settings": ("SELECT", "UPDATE"),
    # The worker's own (its migrations create them). The reconcile prunes finished runs, and
    # their items go with them (ON DELETE CASCADE).
    "embedding_runs": WRITE,
    "embedding_run_items": WRITE,
    "embedding_failures": WRITE,
    "embedding_switches": WRITE,
    "staged_embeddings": WRITE,
}

_ROLE = re.compile(r"[A-Za-z_][A-Za-z0-9_$-]{0,62}")


def check_role(role: str) -> str:
    """`role` if it can be a PostgreSQL role name; ValueError saying what is wrong otherwise."""
    if not _ROLE.fullmatch(role):
        raise ValueError(f"{role!r} is not a role name (letters, digits, _ and $, at most 63)")
    return role


def grant_statements(role: str) -> list[str]:
    """The GRANT statements that give `role` what the worker needs, and nothing more."""
    # Bare when PostgreSQL would not fold it, so that `app_rw` means the role CREATE ROLE
    # app_rw made; quoted otherwise, as such a role must have been created.
    name = check_role(role)
    quoted = name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else f'"{name}"'
    return [
        f"GRANT {', '.join(privileges)} ON TABLE {table} TO {quoted};"
        for table, privileges in WORKER_PRIVILEGES.items()
    ]


def apply_grants(connection: Connection, role: str) -> None:
    """Run grant_statements(role) on `connection` (as the tables' owner, in its transaction)."""
    for statement in grant_statements(role):
        connection.execute(text(statement))
