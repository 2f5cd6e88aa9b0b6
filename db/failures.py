"""Failed skills an operator can name: a run's failed items, and jobs outside any run.

A run's failures stay with the run (`embedding_run_items`: outcome, detail, finished_at, and
the attempts made). A job outside any run has no such record, so `embedding_failures` keeps
one row per skill whose last job failed, until the skill is embedded (the write that embeds
it deletes the row: db.catalog.write_current).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, text


@dataclass(frozen=True, slots=True)
class Failure:
    skill_id: str
    tenant_id: str | None
    reason: str
    attempts: int | None
    failed_at: datetime | None
    run_id: str | None


def record_failure(
    conn: Connection, skill_id: str, tenant_id: str | None, reason: str, attempts: int
) -> None:
    """Upsert the skill's failure outside runs (one row per skill: the latest reason wins)."""
    conn.execute(
        text(
            "INSERT INTO embedding_failures (skill_id, tenant_id, reason, attempts)"
            " VALUES (:skill, :tenant, :reason, :attempts)"
            " ON CONFLICT (skill_id) DO UPDATE SET tenant_id = coalesce(EXCLUDED.tenant_id,"
            " embedding_failures.tenant_id), reason = EXCLUDED.reason,"
            " attempts = EXCLUDED.attempts, failed_at = now()"
        ),
        {"skill": skill_id, "tenant": tenant_id, "reason": reason, "attempts": attempts},
    )


def record_run_attempts(conn: Connection, run_id: str, skill_id: str, attempts: int) -> str | None:
    """Note the attempts of a run item about to be failed; its tenant, or None if already set."""
    return conn.execute(
        text(
            "UPDATE embedding_run_items SET attempts = :attempts"
            " WHERE run_id = :run AND skill_id = :skill AND outcome IS NULL RETURNING tenant_id"
        ),
        {"run": run_id, "skill": skill_id, "attempts": attempts},
    ).scalar_one_or_none()


def run_failures(conn: Connection, run_id: str) -> list[Failure]:
    """The run's failed items, newest first."""
    rows = conn.execute(
        text(
            "SELECT skill_id, tenant_id, detail, attempts, finished_at FROM embedding_run_items"
            " WHERE run_id = :run AND outcome = 'failed'"
            " ORDER BY finished_at DESC NULLS LAST, skill_id"
        ),
        {"run": run_id},
    )
    return [
        Failure(r.skill_id, r.tenant_id, r.detail or "", r.attempts, r.finished_at, run_id)
        for r in rows
    ]


def failures_outside_runs(conn: Connection, limit: int = 1000) -> list[Failure]:
    """Skills whose last job outside any run failed, newest first."""
    rows = conn.execute(
        text(
            "SELECT skill_id, tenant_id, reason, attempts, failed_at FROM embedding_failures"
            " ORDER BY failed_at DESC, skill_id LIMIT :limit"
        ),
        {"limit": limit},
    )
    return [Failure(r.skill_id, r.tenant_id, r.reason, r.attempts, r.failed_at, None) for r in rows]


def skill_names(conn: Connection, skill_ids: Sequence[str]) -> dict[str, str]:
    """Names of the skills row level security shows in this transaction's tenant scope."""
    rows = conn.execute(
        text("SELECT id, name FROM skills WHERE id = ANY(CAST(:ids AS text[]))"),
        {"ids": list(skill_ids)},
    )
    return {str(r.id): str(r.name) for r in rows}


@dataclass(frozen=True, slots=True)
class OldestPending:
    run_id: str
    skill_id: str
    waiting_since: datetime
    age_seconds: float


def oldest_pending_item(conn: Connection) -> OldestPending | None:
    """The item of an unfinished run that has waited longest (since its run started)."""
    row = conn.execute(
        text(
            "SELECT i.run_id, i.skill_id, r.started_at,"
            " extract(epoch FROM now() - r.started_at) AS age"
            " FROM embedding_runs r JOIN embedding_run_items i ON i.run_id = r.id"
            " WHERE r.finished_at IS NULL AND i.outcome IS NULL"
            " ORDER BY r.started_at, i.tenant_id, i.position LIMIT 1"
        )
    ).one_or_none()
    if row is None:
        return None
    return OldestPending(str(row.run_id), str(row.skill_id), row.started_at, float(row.age))
