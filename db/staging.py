"""A model switch in SQL: the switch under way per tenant, its staged vectors, and the swap.

The staged vectors live in the worker's own `staged_embeddings`; live search reads only
`skill_embeddings`, which the swap rewrites for the whole tenant in one transaction, with the
tenant's `site_settings.ollama_model`. Callers pass a conn scoped to the tenant where the
app's tables are read (row level security); the worker's own tables have no policy.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, text

from db.catalog import PUBLISHED, UPSERT_CONFLICT, input_hash_sql
from db.runs import SWITCH
from db.sql import rowcount


@dataclass(frozen=True, slots=True)
class Switch:
    tenant_id: str
    model: str
    dimensions: int
    from_model: str
    run_id: str | None  # None: queued behind another tenant's switch
    position: int


SWITCH_COLUMNS = "tenant_id, model, dimensions, from_model, run_id, position"


def get_switch(conn: Connection, tenant_id: str, *, lock: str = "") -> Switch | None:
    """The tenant's switch under way; `lock` "FOR SHARE" or "FOR UPDATE" holds it (the swap
    takes it FOR UPDATE, so a writer holding it FOR SHARE never writes across a swap)."""
    row = conn.execute(
        text(f"SELECT {SWITCH_COLUMNS} FROM embedding_switches WHERE tenant_id = :t {lock}"),
        {"t": tenant_id},
    ).one_or_none()
    return Switch(*row) if row else None


def list_switches(conn: Connection) -> list[Switch]:
    rows = conn.execute(
        text(f"SELECT {SWITCH_COLUMNS} FROM embedding_switches ORDER BY position, tenant_id")
    )
    return [Switch(*row) for row in rows]


def add_switch(
    conn: Connection, tenant_id: str, *, model: str, dimensions: int, from_model: str, position: int
) -> bool:
    """Record the tenant's switch; False when one is under way already."""
    result = conn.execute(
        text(
            "INSERT INTO embedding_switches (tenant_id, model, dimensions, from_model, position)"
            " VALUES (:t, :m, :d, :f, :p) ON CONFLICT (tenant_id) DO NOTHING"
        ),
        {"t": tenant_id, "m": model, "d": dimensions, "f": from_model, "p": position},
    )
    return rowcount(result) == 1


def start_run(conn: Connection, switch: Switch, run_id: str) -> bool:
    """Make `run_id` the switch's staging run, unless another process did it first."""
    conn.execute(
        text(
            "INSERT INTO embedding_runs (id, tenant_id, force, kind, model)"
            " VALUES (:id, :t, false, :kind, :m)"
        ),
        {"id": run_id, "t": switch.tenant_id, "kind": SWITCH, "m": switch.model},
    )
    result = conn.execute(
        text(
            "UPDATE embedding_switches SET run_id = :run WHERE tenant_id = :t"
            " AND run_id IS NOT DISTINCT FROM :old"
        ),
        {"run": run_id, "t": switch.tenant_id, "old": switch.run_id},
    )
    return rowcount(result) == 1


# Published skills of the tenant and their staged vector of the switch's model, if current.
STAGED_JOIN = f"""
    FROM skills
    LEFT JOIN staged_embeddings st
        ON st.tenant_id = skills.tenant_id AND st.skill_id = skills.id
       AND st.model_name = :model AND st.input_hash = {input_hash_sql()}
    WHERE skills.tenant_id = :tenant_id AND skills.status = '{PUBLISHED}'
"""


def add_staging_items(conn: Connection, run_id: str, tenant_id: str, model: str) -> tuple[int, int]:
    """The tenant's published skills without a current staged vector, as the run's items;
    (published, queued). In the tenant's scope, selected in SQL."""
    queued = rowcount(
        conn.execute(
            text(
                "INSERT INTO embedding_run_items (run_id, skill_id, tenant_id, position)"
                " SELECT :run_id, skills.id, :tenant_id, row_number() OVER (ORDER BY skills.id)"
                f" {STAGED_JOIN} AND st.skill_id IS NULL"
            ),
            {"run_id": run_id, "tenant_id": tenant_id, "model": model},
        )
    )
    published = int(
        conn.execute(
            text(f"SELECT count(*) {STAGED_JOIN}"), {"tenant_id": tenant_id, "model": model}
        ).scalar_one()
    )
    conn.execute(
        text("UPDATE embedding_runs SET total = :total, unchanged = :current WHERE id = :id"),
        {"total": published, "current": published - queued, "id": run_id},
    )
    return published, queued


@dataclass(frozen=True, slots=True)
class StagedCount:
    published: int
    staged: int  # published skills with a staged vector of their current text

    @property
    def missing(self) -> int:
        return self.published - self.staged


def staged_count(conn: Connection, tenant_id: str, model: str) -> StagedCount:
    row = conn.execute(
        text(f"SELECT count(*), count(st.skill_id) {STAGED_JOIN}"),
        {"tenant_id": tenant_id, "model": model},
    ).one()
    return StagedCount(int(row[0]), int(row[1]))


def get_staged(conn: Connection, tenant_id: str, skill_ids: Sequence[str]) -> dict[str, str]:
    """skill_id -> `model_name` + ' ' + `input_hash` of the staged rows among `skill_ids`."""
    rows = conn.execute(
        text(
            "SELECT skill_id, model_name, input_hash FROM staged_embeddings"
            " WHERE tenant_id = :t AND skill_id = ANY(CAST(:ids AS text[]))"
        ),
        {"t": tenant_id, "ids": list(skill_ids)},
    )
    return {str(r.skill_id): f"{r.model_name} {r.input_hash}" for r in rows}


def upsert_staged(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Each row: tenant_id, skill_id, embedding, model_name, dimensions, input_hash; one
    statement over arrays, whatever the row count."""
    if not rows:
        return
    conn.execute(
        _UPSERT_STAGED,
        {
            "tenants": [row["tenant_id"] for row in rows],
            "skills": [row["skill_id"] for row in rows],
            # pgvector's text input is JSON's array syntax: orjson writes it in C.
            "embeddings": [orjson.dumps(list(row["embedding"])).decode() for row in rows],
            "models": [row["model_name"] for row in rows],
            "dimensions": [row["dimensions"] for row in rows],
            "hashes": [row["input_hash"] for row in rows],
        },
    )


_UPSERT_STAGED = text(
    """
    INSERT INTO staged_embeddings (tenant_id, skill_id, embedding, model_name, dimensions,
                                   input_hash)
    SELECT tenant_id, skill_id, CAST(embedding AS vector), model_name, dimensions, input_hash
    FROM unnest(CAST(:tenants AS text[]), CAST(:skills AS text[]), CAST(:embeddings AS text[]),
                CAST(:models AS text[]), CAST(:dimensions AS int[]), CAST(:hashes AS text[]))
         AS v(tenant_id, skill_id, embedding, model_name, dimensions, input_hash)
    ON CONFLICT (tenant_id, skill_id) DO UPDATE SET
        embedding = EXCLUDED.embedding, model_name = EXCLUDED.model_name,
        dimensions = EXCLUDED.dimensions, input_hash = EXCLUDED.input_hash, staged_at = now()
    """
)


def delete_staged(conn: Connection, tenant_id: str, skill_ids: Sequence[str]) -> None:
    conn.execute(
        text(
            "DELETE FROM staged_embeddings WHERE tenant_id = :t"
            " AND skill_id = ANY(CAST(:ids AS text[]))"
        ),
        {"t": tenant_id, "ids": list(skill_ids)},
    )


def drop_switch(conn: Connection, tenant_id: str) -> Switch | None:
    """Cancel: the switch and its staged rows go, its run closes; nothing live changes."""
    switch = get_switch(conn, tenant_id, lock="FOR UPDATE")
    if switch is None:
        return None
    if switch.run_id is not None:
        close_run(conn, switch.run_id, "cancelled")
    conn.execute(text("DELETE FROM staged_embeddings WHERE tenant_id = :t"), {"t": tenant_id})
    conn.execute(text("DELETE FROM embedding_switches WHERE tenant_id = :t"), {"t": tenant_id})
    return switch


def close_run(conn: Connection, run_id: str, detail: str) -> None:
    """Finish the run; its free items get an outcome (their jobs then end at once). Items a batch
    holds are left to it: it finds the switch gone and stages nothing."""
    skipped = rowcount(
        conn.execute(
            text(
                "UPDATE embedding_run_items SET outcome = 'skipped', detail = :detail,"
                " finished_at = now() WHERE run_id = :id AND skill_id IN ("
                "   SELECT skill_id FROM embedding_run_items WHERE run_id = :id"
                "   AND outcome IS NULL FOR UPDATE SKIP LOCKED)"
            ),
            {"id": run_id, "detail": detail},
        )
    )
    conn.execute(
        text(
            "UPDATE embedding_runs SET skipped = skipped + :n,"
            " finished_at = coalesce(finished_at, now()) WHERE id = :id"
        ),
        {"id": run_id, "n": skipped},
    )


@dataclass(frozen=True, slots=True)
class Swapped:
    switch: Switch
    vectors: int  # rows written with the new model
    removed: int  # rows of skills no longer published (they had the old model)


def swap(conn: Connection, tenant_id: str) -> Swapped | StagedCount | None:
    """In the caller's transaction, scoped to the tenant: the staged vectors, the model name and
    size into `skill_embeddings`, the model into `site_settings`, the staging gone.

    None when no switch is under way (another process swapped or cancelled it); the count
    when a published skill has no staged vector of its current text (nothing is written).
    """
    switch = get_switch(conn, tenant_id, lock="FOR UPDATE")
    if switch is None:
        return None
    # Before any row: writers of live vectors hold this row FOR SHARE (tasks.embedding), so one
    # that embedded with the old model finishes first, or waits and finds the model changed.
    conn.execute(
        text("SELECT id FROM site_settings WHERE tenant_id = :t FOR UPDATE"), {"t": tenant_id}
    )
    count = staged_count(conn, tenant_id, switch.model)
    if count.missing:
        return count
    params = {"tenant_id": tenant_id, "model": switch.model}
    written = rowcount(
        conn.execute(
            text(
                "INSERT INTO skill_embeddings (id, tenant_id, skill_id, embedding, model_name,"
                "   dimensions, input_hash, created_at, updated_at)"
                " SELECT CAST(gen_random_uuid() AS text), st.tenant_id, st.skill_id, st.embedding,"
                "   st.model_name, st.dimensions, st.input_hash, now(), now()"
                f" {STAGED_JOIN} AND st.skill_id IS NOT NULL {UPSERT_CONFLICT}"
            ),
            params,
        )
    )
    # What was not rewritten belongs to skills no longer published: it holds the old model.
    removed = rowcount(
        conn.execute(
            text(
                "DELETE FROM skill_embeddings WHERE tenant_id = :tenant_id AND model_name <> :model"
            ),
            params,
        )
    )
    conn.execute(
        text(
            "UPDATE site_settings SET ollama_model = :model, embedding_dimensions = :dims,"
            " updated_at = now() WHERE tenant_id = :tenant_id"
        ),
        {**params, "dims": switch.dimensions},
    )
    conn.execute(text("DELETE FROM staged_embeddings WHERE tenant_id = :t"), {"t": tenant_id})
    conn.execute(text("DELETE FROM embedding_switches WHERE tenant_id = :t"), {"t": tenant_id})
    return Swapped(switch, written, removed)


def failed_items(conn: Connection, run_id: str, limit: int = 20) -> list[tuple[str, str]]:
    """(skill_id, detail) of the run's failed items."""
    rows = conn.execute(
        text(
            "SELECT skill_id, coalesce(detail, '') FROM embedding_run_items"
            " WHERE run_id = :id AND outcome = 'failed' ORDER BY position LIMIT :n"
        ),
        {"id": run_id, "n": limit},
    )
    return [(str(r[0]), str(r[1])) for r in rows]


def new_run_id() -> str:
    return str(uuid.uuid4())
