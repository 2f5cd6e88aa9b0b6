"""Claims on a run's items: a batch locks the rows it embeds, a job waits for the one that
holds its item, and the recovery pass finds runs whose pending items nobody holds."""

from __future__ import annotations

from sqlalchemy import Connection, text


def claim_items(
    conn: Connection, run_id: str, limit: int, *, including: str | None = None
) -> list[tuple[str, str]]:
    """Lock up to `limit` pending items of the run for this transaction; (skill_id, tenant_id).

    The claim is the row lock itself: it lasts until the transaction ends, so a process that
    dies or loses its connection gives its items back at once, with nothing to expire. SKIP
    LOCKED lets claimers on several hosts take batches side by side. With `including`, that
    item comes first, and nothing is claimed unless it could be (another batch holds it).
    """
    claimed: list[tuple[str, str]] = []
    if including is not None:
        own = conn.execute(
            text(
                "SELECT skill_id, tenant_id FROM embedding_run_items"
                " WHERE run_id = :run AND skill_id = :skill AND outcome IS NULL"
                " FOR UPDATE SKIP LOCKED"
            ),
            {"run": run_id, "skill": including},
        ).one_or_none()
        if own is None:
            return []
        claimed.append((str(own.skill_id), str(own.tenant_id)))
    if limit > len(claimed):
        rows = conn.execute(
            text(
                "SELECT skill_id, tenant_id FROM embedding_run_items"
                " WHERE run_id = :run AND outcome IS NULL"
                "   AND skill_id IS DISTINCT FROM CAST(:skill AS text)"
                " ORDER BY tenant_id, position LIMIT :limit FOR UPDATE SKIP LOCKED"
            ),
            {"run": run_id, "skill": including, "limit": limit - len(claimed)},
        )
        claimed += [(str(r.skill_id), str(r.tenant_id)) for r in rows]
    return claimed


def wait_for_item(
    conn: Connection, run_id: str, skill_id: str, *, timeout_seconds: float
) -> tuple[str | None, str | None] | None:
    """Wait for the batch that holds the item to end, then lock it; (outcome, detail).

    None when the run has no such item. A lock still held after `timeout_seconds` raises
    sqlalchemy's OperationalError (lock_timeout), which callers treat as transient.
    """
    conn.execute(
        text("SELECT set_config('lock_timeout', :ms, true)"),
        {"ms": f"{int(timeout_seconds * 1000)}ms"},
    )
    row = conn.execute(
        text(
            "SELECT outcome, detail FROM embedding_run_items"
            " WHERE run_id = :run AND skill_id = :skill FOR UPDATE"
        ),
        {"run": run_id, "skill": skill_id},
    ).one_or_none()
    return None if row is None else (row.outcome, row.detail)


def runs_with_free_items(conn: Connection) -> list[tuple[str, bool]]:
    """(run_id, force) of open runs with a pending item that no batch holds right now."""
    rows = conn.execute(
        text(
            """
            SELECT r.id, r.force FROM embedding_runs r
            WHERE r.finished_at IS NULL AND EXISTS (
                SELECT 1 FROM embedding_run_items i
                WHERE i.run_id = r.id AND i.outcome IS NULL
                FOR UPDATE SKIP LOCKED)
            ORDER BY r.started_at
            """
        )
    )
    return [(str(r.id), bool(r.force)) for r in rows]


def item_outcome(conn: Connection, run_id: str, skill_id: str) -> tuple[str, str | None] | None:
    """(outcome, detail) already recorded for the item (by a batch that took it), if any."""
    row = conn.execute(
        text(
            "SELECT outcome, detail FROM embedding_run_items"
            " WHERE run_id = :run AND skill_id = :skill AND outcome IS NOT NULL"
        ),
        {"run": run_id, "skill": skill_id},
    ).one_or_none()
    return None if row is None else (str(row.outcome), row.detail)
