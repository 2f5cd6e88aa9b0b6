"""An embedding job's reads and writes, one statement each where the job waits on the database.

A lone app job is mostly round trips: its load (settings, skills, stored rows, a switch under
way) is one statement, and its write two: the locks, then the re-read, the upsert and the
failures cleared. Callers pass a psycopg connection in a transaction already scoped to the
tenant (row level security): `db.session.job_transaction` for a job's own, or the connection
of a session (`db.session.driver`). psycopg alone, not SQLAlchemy's ORM: on an idle worker
the ORM's work around a statement cost more than the statement (bench.app_job_steps).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from psycopg import Connection
from psycopg.rows import namedtuple_row

from db.models import PUBLISHED
from db.services import SKILL_LOCKS, SkillRecord, skill_lock_keys
from db.staging import Switch

Conn = Connection[Any]


@dataclass(frozen=True, slots=True)
class SettingsRecord:
    """The columns of the tenant's `site_settings` row that configure its embeddings."""

    semantic_similarity_enabled: bool
    ollama_url: str | None
    ollama_model: str | None
    embedding_dimensions: int | None


@dataclass(frozen=True, slots=True)
class TenantRows:
    settings: SettingsRecord | None  # None: the tenant has no site_settings row
    switch: Switch | None  # its row in embedding_switches, if any
    skills: dict[str, SkillRecord]  # those of the ids row level security shows
    stored: dict[str, tuple[str, str, int]]  # skill id -> (input_hash, model_name, dimensions)


# Outer joins from a one-row relation: a row even without settings, switch or skills. Every
# join matches at most one row per skill (unique tenant_id; unique (tenant_id, skill_id)).
LOAD_SQL = """
    SELECT st.tenant_id IS NOT NULL AS has_settings, st.semantic_similarity_enabled,
           st.ollama_url, st.ollama_model, st.embedding_dimensions,
           sw.tenant_id IS NOT NULL AS has_switch, sw.model AS switch_model,
           sw.dimensions AS switch_dimensions, sw.from_model, sw.run_id, sw.position,
           s.id, s.tenant_id AS skill_tenant, s.name, s.description, s.status,
           e.input_hash, e.model_name, e.dimensions
    FROM (SELECT 1) AS one
    LEFT JOIN site_settings st ON st.tenant_id = %(tenant)s
    LEFT JOIN embedding_switches sw ON sw.tenant_id = %(tenant)s
    LEFT JOIN skills s ON s.id = ANY(CAST(%(ids)s AS text[]))
    LEFT JOIN skill_embeddings e ON e.skill_id = s.id AND e.tenant_id = %(tenant)s
    """


def load_tenant(conn: Conn, tenant_id: str, skill_ids: Sequence[str]) -> TenantRows:
    """What deciding the skills needs, in one statement: the tenant's settings and switch, the
    skills, and their stored embeddings' hash, model and size."""
    with conn.cursor(row_factory=namedtuple_row) as cursor:
        rows: list[Any] = cursor.execute(
            LOAD_SQL, {"tenant": tenant_id, "ids": list(skill_ids)}
        ).fetchall()
    first = rows[0]
    settings = None
    if first.has_settings:
        settings = SettingsRecord(
            first.semantic_similarity_enabled,
            first.ollama_url,
            first.ollama_model,
            first.embedding_dimensions,
        )
    skills: dict[str, SkillRecord] = {}
    stored: dict[str, tuple[str, str, int]] = {}
    for row in rows:
        if row.id is None:
            continue
        skills[row.id] = SkillRecord(row.id, row.skill_tenant, row.name, row.description,
                                     row.status)  # fmt: skip
        if row.input_hash is not None:
            stored[row.id] = (row.input_hash, row.model_name, row.dimensions)
    return TenantRows(settings, _switch(tenant_id, first), skills, stored)


@dataclass(frozen=True, slots=True)
class Locked:
    model: str | None  # site_settings.ollama_model, held FOR SHARE; None: no row (or no value)
    switch: Switch | None  # as this statement's snapshot shows it, before any lock wait


# The skills' advisory locks (db.services.lock_skills says why advisory) first, in FROM; the
# settings row FOR SHARE after, in the select list, evaluated once FROM has its row (a test
# holds the order). So a writer never holds the settings row while it waits for a skill's
# lock, which a staged write may hold while it waits for the switch row a swap holds, the swap
# waiting for the settings row: a cycle PostgreSQL would break by failing one of them.
LOCK_SQL = f"""
    SELECT locked.n,
           (SELECT ollama_model FROM site_settings WHERE tenant_id = %(tenant)s FOR SHARE)
               AS live_model,
           sw.tenant_id IS NOT NULL AS has_switch, sw.model AS switch_model,
           sw.dimensions AS switch_dimensions, sw.from_model, sw.run_id, sw.position
    FROM ({SKILL_LOCKS}) AS locked
    LEFT JOIN embedding_switches sw ON sw.tenant_id = %(tenant)s
    """


def lock_for_write(conn: Conn, tenant_id: str, skill_ids: Sequence[str]) -> Locked:
    """Until the transaction ends: the skills' advisory locks, and the tenant's settings row
    held FOR SHARE (a model switch's swap updates it first, so this write waits for the swap
    or precedes it). The model it holds now, and the tenant's switch.

    A read of the skills must be a later statement: READ COMMITTED takes a statement's
    snapshot at its start, and an edit committed while this one waited must be seen.
    """
    with conn.cursor(row_factory=namedtuple_row) as cursor:
        row: Any = cursor.execute(
            LOCK_SQL, {"tenant": tenant_id, "keys": skill_lock_keys(tenant_id, skill_ids)}
        ).fetchone()
    assert row is not None  # FROM is one aggregate row
    model = None if row.live_model is None else str(row.live_model)
    return Locked(model, _switch(tenant_id, row))


def _switch(tenant_id: str, row: Any) -> Switch | None:
    if not row.has_switch:
        return None
    return Switch(tenant_id, row.switch_model, row.switch_dimensions, row.from_model, row.run_id,
                  row.position)  # fmt: skip


@dataclass(frozen=True, slots=True)
class VectorRow:
    skill_id: str
    text: str  # what was embedded: the row is written only if the skill still has it
    embedding: Sequence[float]
    model_name: str
    dimensions: int
    input_hash: str


# The skills are read by this statement, which starts after lock_for_write returned: an edit
# that committed before is seen, and its skill's row is not written (superseded). Failures
# go with the rows written: the skill is embedded now. `text` is skill_text (tasks.text).
WRITE_SQL = f"""
    WITH written AS (
        INSERT INTO skill_embeddings
            (id, tenant_id, skill_id, embedding, model_name, dimensions, input_hash)
        SELECT v.id, s.tenant_id, s.id, CAST(v.embedding AS vector), v.model_name,
               v.dimensions, v.input_hash
        FROM unnest(CAST(%(ids)s AS text[]), CAST(%(skills)s AS text[]),
                    CAST(%(texts)s AS text[]), CAST(%(embeddings)s AS text[]),
                    CAST(%(models)s AS text[]), CAST(%(dimensions)s AS int[]),
                    CAST(%(hashes)s AS text[]))
             AS v(id, skill_id, text, embedding, model_name, dimensions, input_hash)
        JOIN skills s ON s.id = v.skill_id
        WHERE s.tenant_id = %(tenant)s AND s.status = '{PUBLISHED}'
          AND s.name || ' ' || coalesce(s.description, '') = v.text
        ON CONFLICT ON CONSTRAINT skill_embeddings_tenant_skill_unique DO UPDATE SET
            embedding = EXCLUDED.embedding, model_name = EXCLUDED.model_name,
            dimensions = EXCLUDED.dimensions, input_hash = EXCLUDED.input_hash,
            updated_at = now()
        RETURNING skill_id, input_hash
    ), cleared AS (
        DELETE FROM embedding_failures WHERE skill_id IN (SELECT skill_id FROM written)
    )
    SELECT skill_id, input_hash FROM written
    """


def write_current(conn: Conn, tenant_id: str, rows: Sequence[VectorRow]) -> set[tuple[str, str]]:
    """Upsert the rows whose skill is still published with the text embedded, and clear those
    skills' failures; (skill id, input hash) of each row written.

    One row per skill and text: one statement cannot upsert the same key twice (two texts of
    one skill are fine: at most one is still the skill's).
    """
    if not rows:
        return set()
    result = conn.execute(
        WRITE_SQL,
        {
            "tenant": tenant_id,
            "ids": [str(uuid.uuid4()) for _ in rows],
            "skills": [row.skill_id for row in rows],
            "texts": [row.text for row in rows],
            # pgvector's text input is JSON's array syntax: orjson writes it in C.
            "embeddings": [orjson.dumps(row.embedding).decode() for row in rows],
            "models": [row.model_name for row in rows],
            "dimensions": [row.dimensions for row in rows],
            "hashes": [row.input_hash for row in rows],
        },
    )
    return {(str(skill_id), str(hashed)) for skill_id, hashed in result}


def delete_embeddings(conn: Conn, skill_ids: Sequence[str]) -> None:
    """Remove these skills' rows (the skills left `published`)."""
    conn.execute(
        "DELETE FROM skill_embeddings WHERE skill_id = ANY(CAST(%s AS text[]))", (list(skill_ids),)
    )
