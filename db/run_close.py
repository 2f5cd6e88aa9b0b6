"""The end of a run, read from the catalog: which of its skills are still published and current.

Counted in the tenant's scope (row level security), in the transaction that records the run's
last outcome, whose lock on the run's row makes the count and the close one step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from sqlalchemy import Connection, text

from db.catalog import PUBLISHED, input_hash_sql

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
    others: int = 0  # published, current, and never an item of the run (current at its start)
    arrived: list[str] = field(default_factory=list)  # published, not current, not an item


# Whether the skill's stored row (`e`, LEFT JOINed) is current for the tenant's model and size.
_CURRENT = (
    f"coalesce(e.input_hash = {input_hash_sql()} AND e.model_name = :model"
    " AND e.dimensions = :dimensions, false)"
)


def run_tenants(conn: Connection, run_id: str) -> list[str]:
    """The tenants the run covers: named when it started (runs before migration 0009 list them
    only through their items)."""
    row = conn.execute(
        text(
            "SELECT coalesce(tenants, ARRAY(SELECT DISTINCT tenant_id FROM embedding_run_items"
            " WHERE run_id = :id)) AS tenants FROM embedding_runs WHERE id = :id"
        ),
        {"id": run_id},
    ).one_or_none()
    return sorted(set(row.tenants)) if row is not None else []


# Where a kind of run writes its vectors: the live rows (a backfill), or a switch's staged ones.
VECTOR_TABLES = ("skill_embeddings", "staged_embeddings")


def _check_vectors(vectors: str) -> None:
    # Its name goes into the statement's text: only a known table may.
    if vectors not in VECTOR_TABLES:
        raise ValueError(f"no table of vectors {vectors!r}")


def tally(
    conn: Connection,
    run_id: str,
    tenant_id: str,
    *,
    model: str,
    dimensions: int,
    vectors: str = "skill_embeddings",
) -> Tally:
    """The run's items of one tenant against the catalog now, current when their row in
    `vectors` (one of VECTOR_TABLES) is, and the tenant's skills outside them; the
    transaction is in the tenant's scope."""
    items = tally_items(conn, run_id, tenant_id, model=model, dimensions=dimensions,
                        vectors=vectors)  # fmt: skip
    others, arrived = outside_items(
        conn, run_id, tenant_id, model=model, dimensions=dimensions, vectors=vectors
    )
    return replace(items, others=others, arrived=arrived)


def tally_items(
    conn: Connection,
    run_id: str,
    tenant_id: str,
    *,
    model: str,
    dimensions: int,
    vectors: str = "skill_embeddings",
) -> Tally:
    """The run's items of one tenant against the catalog now (`others` and `arrived` left
    empty): in the recording transaction, which holds the last batch's writes."""
    _check_vectors(vectors)
    row = conn.execute(
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
            LEFT JOIN {vectors} e
                ON e.skill_id = i.skill_id AND e.tenant_id = i.tenant_id
            CROSS JOIN LATERAL (SELECT
                coalesce(skills.status = '{PUBLISHED}', false) AS published,
                {_CURRENT} AS current) AS now
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


def outside_items(
    conn: Connection,
    run_id: str,
    tenant_id: str,
    *,
    model: str,
    dimensions: int,
    vectors: str = "skill_embeddings",
) -> tuple[int, list[str]]:
    """The tenant's published skills the run never listed: how many are current (those current
    at its start), and the ids of those that are not (published since). One pass over the
    tenant's catalog, the same as the run's start made; it reads none of the run's items, so
    it needs none of the recording transaction's writes and may run on a connection of its own."""
    _check_vectors(vectors)
    rest = conn.execute(
        text(
            f"""
            SELECT count(*) FILTER (WHERE current) AS current,
                   coalesce(array_agg(skills.id) FILTER (WHERE NOT current), '{{}}') AS arrived
            FROM skills
            LEFT JOIN {vectors} e
                ON e.skill_id = skills.id AND e.tenant_id = skills.tenant_id
            CROSS JOIN LATERAL (SELECT
                {_CURRENT} AS current) AS now
            WHERE skills.tenant_id = :tenant AND skills.status = '{PUBLISHED}'
              AND NOT EXISTS (SELECT 1 FROM embedding_run_items i
                              WHERE i.run_id = :run AND i.skill_id = skills.id)
            """
        ),
        {"run": run_id, "tenant": tenant_id, "model": model, "dimensions": dimensions},
    ).one()
    return int(rest.current), [str(skill_id) for skill_id in rest.arrived]


def reopen(
    conn: Connection,
    run_id: str,
    skill_ids: Sequence[str],
    arrived: Sequence[tuple[str, str]],
    others: int,
) -> None:
    """Hand items back to be claimed again, list the skills that `arrived` (tenant, skill) as
    new items, and count the run anew: its items' outcomes, plus `others` current skills that
    are no item of it."""
    conn.execute(
        text(
            "UPDATE embedding_run_items SET outcome = NULL, detail = NULL, finished_at = NULL"
            " WHERE run_id = :run AND skill_id = ANY(:ids)"
        ),
        {"run": run_id, "ids": list(skill_ids)},
    )
    if arrived:
        conn.execute(
            text(
                """
                INSERT INTO embedding_run_items (run_id, skill_id, tenant_id, position)
                SELECT :run, a.skill_id, a.tenant_id,
                       coalesce((SELECT max(position) FROM embedding_run_items
                                 WHERE run_id = :run AND tenant_id = a.tenant_id), 0)
                       + row_number() OVER (PARTITION BY a.tenant_id ORDER BY a.skill_id)
                FROM unnest(CAST(:tenants AS text[]), CAST(:skills AS text[]))
                    AS a(tenant_id, skill_id)
                ON CONFLICT DO NOTHING
                """
            ),
            {
                "run": run_id,
                "tenants": [tenant for tenant, _ in arrived],
                "skills": [skill for _, skill in arrived],
            },
        )
    conn.execute(
        text(
            """
            UPDATE embedding_runs r SET embedded = c.embedded, unchanged = c.unchanged + :others,
                   failed = c.failed, skipped = c.skipped, total = c.items + :others
            FROM (SELECT count(*) FILTER (WHERE outcome = 'embedded') AS embedded,
                         count(*) FILTER (WHERE outcome = 'unchanged') AS unchanged,
                         count(*) FILTER (WHERE outcome = 'failed') AS failed,
                         count(*) FILTER (WHERE outcome NOT IN ('embedded', 'unchanged', 'failed'))
                           AS skipped,
                         count(*) AS items
                  FROM embedding_run_items WHERE run_id = :run) c
            WHERE r.id = :run
            """
        ),
        {"run": run_id, "others": others},
    )
