"""The end of a run, read from the catalog: which of its skills are still published and current.

Counted in the tenant's scope (row level security), in the transaction that records the run's
last outcome, whose lock on the run's row makes the count and the close one step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.models import PUBLISHED
from db.services import SQL_INPUT_HASH

# An item of a still-published skill, neither current nor failed, goes back to be embedded
# again when its outcome is one of these (edited after its batch, or published again); other
# outcomes (`disabled`) would only come back the same.
REDO = ("embedded", "unchanged", "superseded", "removed", "deleted")


@dataclass(frozen=True, slots=True)
class Tally:
    embedded: int  # still published, current, embedded by the run
    unchanged: int  # still published, current otherwise (already, or by a newer job)
    failed: int  # still published, not current, failed
    skipped: int  # still published, not current, for a reason that is no failure (disabled)
    unpublished: int
    deleted: int
    redo: list[str]  # still published, not current any more: to embed again


def run_tenants(session: Session, run_id: str) -> list[str]:
    rows = session.execute(
        text("SELECT DISTINCT tenant_id FROM embedding_run_items WHERE run_id = :id"),
        {"id": run_id},
    )
    return sorted(str(row.tenant_id) for row in rows)


def tally(session: Session, run_id: str, tenant_id: str, *, model: str, dimensions: int) -> Tally:
    """The run's items of one tenant against the catalog now; the session is in its scope."""
    row = session.execute(
        text(
            f"""
            SELECT
              count(*) FILTER (WHERE skills.id IS NULL) AS deleted,
              count(*) FILTER (WHERE skills.status <> '{PUBLISHED}') AS unpublished,
              count(*) FILTER (WHERE published AND current AND i.outcome = 'embedded')
                AS embedded,
              count(*) FILTER (WHERE published AND current
                               AND i.outcome IS DISTINCT FROM 'embedded') AS unchanged,
              count(*) FILTER (WHERE published AND NOT current AND i.outcome = 'failed')
                AS failed,
              count(*) FILTER (WHERE published AND NOT current
                               AND i.outcome <> 'failed' AND NOT i.outcome = ANY(:redo))
                AS skipped,
              coalesce(array_agg(i.skill_id) FILTER (WHERE published AND NOT current
                                                     AND i.outcome = ANY(:redo)), '{{}}') AS redo
            FROM embedding_run_items i
            LEFT JOIN skills ON skills.id = i.skill_id AND skills.tenant_id = i.tenant_id
            LEFT JOIN skill_embeddings e
                ON e.skill_id = i.skill_id AND e.tenant_id = i.tenant_id
            CROSS JOIN LATERAL (SELECT
                coalesce(skills.status = '{PUBLISHED}', false) AS published,
                coalesce(e.input_hash = {SQL_INPUT_HASH} AND e.model_name = :model
                         AND e.dimensions = :dimensions, false) AS current) AS now
            WHERE i.run_id = :run AND i.tenant_id = :tenant
            """
        ),
        {
            "run": run_id,
            "tenant": tenant_id,
            "model": model,
            "dimensions": dimensions,
            "redo": list(REDO),
        },
    ).one()
    return Tally(
        embedded=int(row.embedded),
        unchanged=int(row.unchanged),
        failed=int(row.failed),
        skipped=int(row.skipped),
        unpublished=int(row.unpublished),
        deleted=int(row.deleted),
        redo=[str(skill_id) for skill_id in row.redo],
    )


def reopen(session: Session, run_id: str, skill_ids: Sequence[str]) -> None:
    """Hand items back to be claimed again, and count the run's outcomes anew from its items."""
    session.execute(
        text(
            "UPDATE embedding_run_items SET outcome = NULL, detail = NULL, finished_at = NULL"
            " WHERE run_id = :run AND skill_id = ANY(:ids)"
        ),
        {"run": run_id, "ids": list(skill_ids)},
    )
    session.execute(
        text(
            """
            UPDATE embedding_runs r SET embedded = c.embedded, unchanged = c.unchanged,
                   failed = c.failed, skipped = c.skipped
            FROM (SELECT count(*) FILTER (WHERE outcome = 'embedded') AS embedded,
                         count(*) FILTER (WHERE outcome = 'unchanged') AS unchanged,
                         count(*) FILTER (WHERE outcome = 'failed') AS failed,
                         count(*) FILTER (WHERE outcome NOT IN ('embedded', 'unchanged', 'failed'))
                           AS skipped
                  FROM embedding_run_items WHERE run_id = :run) c
            WHERE r.id = :run
            """
        ),
        {"run": run_id},
    )
