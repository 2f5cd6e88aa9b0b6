"""Starting a run beside open ones: starts take turns, so a second sees the first's items."""

from __future__ import annotations

from sqlalchemy import Connection, text

from db.runs import BACKFILL, RUN_COLUMNS, RunState, _state

# Any constant will do: only the worker's own starts take this transaction-level lock.
_STARTS_LOCK = 0x656D626564  # "embed"


def lock_starts(conn: Connection) -> None:
    """Until this transaction ends, no other backfill starts: two started 50 ms apart see each
    other, the second after the first has recorded all its items."""
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _STARTS_LOCK})


def open_run_overlapping(conn: Connection, run_id: str, tenant_id: str | None) -> RunState | None:
    """The oldest open run other than `run_id` whose tenants meet `tenant_id`'s (None: all)."""
    row = conn.execute(
        text(
            f"SELECT {RUN_COLUMNS} FROM embedding_runs WHERE finished_at IS NULL AND id <> :id"
            # A model switch's staging run embeds another model: a backfill never joins it.
            f" AND kind = '{BACKFILL}'"
            " AND (CAST(:tenant AS text) IS NULL OR tenant_id IS NULL OR tenant_id = :tenant)"
            " ORDER BY started_at LIMIT 1"
        ),
        {"id": run_id, "tenant": tenant_id},
    ).one_or_none()
    return _state(row) if row else None


def covers(run: RunState, tenant_id: str | None, force: bool) -> bool:
    """The open run does all a new one would: the same tenants or more, forced if it must be."""
    return (run.tenant_id is None or run.tenant_id == tenant_id) and (run.force or not force)
