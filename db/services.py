"""Reads and writes of the app's tables; callers pass a session already scoped to the tenant."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from pgvector.sqlalchemy import Vector
from sqlalchemy import ColumnElement, Row, Text, bindparam, cast, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.models import PUBLISHED, SiteSettings, Skill, SkillEmbedding, Tenant

# `f"{name} {description}"` and its sha256, computed by the database itself (tasks.text is the
# Python twin; a test holds them equal), so stale rows are found without sending text out.
SQL_INPUT_HASH = (
    "encode(sha256(convert_to(skills.name || ' ' || coalesce(skills.description, ''), 'UTF8')),"
    " 'hex')"
)


@dataclass(frozen=True, slots=True)
class SkillRecord:
    id: str
    tenant_id: str
    name: str
    description: str | None
    status: str


def get_skill(session: Session, skill_id: str) -> SkillRecord | None:
    row = session.execute(
        select(Skill.id, Skill.tenant_id, Skill.name, Skill.description, Skill.status).where(
            Skill.id == skill_id
        )
    ).one_or_none()
    return SkillRecord(*row) if row else None


def get_skills(session: Session, skill_ids: Sequence[str]) -> list[SkillRecord]:
    rows = session.execute(
        select(Skill.id, Skill.tenant_id, Skill.name, Skill.description, Skill.status).where(
            Skill.id.in_(skill_ids)
        )
    )
    return [SkillRecord(*row) for row in rows]


def lock_skills(session: Session, tenant_id: str, skill_ids: Sequence[str]) -> None:
    """Serialise writers of these skills' embeddings until the transaction ends.

    Advisory locks, not SELECT ... FOR UPDATE: the worker's role may lack UPDATE on `skills`.
    Taken in sorted order in one statement, so two writers never wait on each other in a cycle.
    """
    session.connection().exec_driver_sql(
        SKILL_LOCKS, {"keys": skill_lock_keys(tenant_id, skill_ids)}
    )


# Takes the advisory locks of %(keys)s (skill_lock_keys), in their order; one row, `n`. In
# psycopg's parameter style: db.job_statements runs it on psycopg's connection.
SKILL_LOCKS = (
    "SELECT count(pg_advisory_xact_lock(hashtextextended(key, 0))) AS n"
    " FROM unnest(CAST(%(keys)s AS text[])) AS key"
)


def skill_lock_keys(tenant_id: str, skill_ids: Sequence[str]) -> list[str]:
    """The advisory lock keys of these skills' embeddings, sorted (see lock_skills)."""
    return sorted(f"{tenant_id}/{skill_id}" for skill_id in set(skill_ids))


def get_site_settings(session: Session, tenant_id: str) -> SiteSettings | None:
    return session.scalars(select(SiteSettings).where(SiteSettings.tenant_id == tenant_id)).first()


def update_site_settings(session: Session, tenant_id: str, **values: Any) -> SiteSettings:
    """Insert the tenant's settings row or update the given columns of it."""
    allowed = set(SiteSettings.__table__.columns.keys()) - {"id", "tenant_id"}
    unknown = set(values) - allowed
    if unknown:
        raise ValueError(f"site_settings has no column {', '.join(sorted(unknown))}")
    statement = insert(SiteSettings).values(id=str(uuid.uuid4()), tenant_id=tenant_id, **values)
    statement = statement.on_conflict_do_update(
        index_elements=[SiteSettings.tenant_id],
        set_={**{key: statement.excluded[key] for key in values}, "updated_at": func.now()},
    )
    session.execute(statement)
    settings = get_site_settings(session, tenant_id)
    assert settings is not None
    session.refresh(settings)
    return settings


def get_skill_embedding(session: Session, skill_id: str) -> SkillEmbedding | None:
    return session.scalars(
        select(SkillEmbedding).where(SkillEmbedding.skill_id == skill_id)
    ).first()


def upsert_skill_embedding(
    session: Session,
    *,
    tenant_id: str,
    skill_id: str,
    embedding: Sequence[float],
    model_name: str,
    dimensions: int,
    input_hash: str,
) -> None:
    """One row per (tenant, skill): insert with a new UUID, or replace the vector in place."""
    upsert_skill_embeddings(
        session,
        [
            {
                "tenant_id": tenant_id,
                "skill_id": skill_id,
                "embedding": embedding,
                "model_name": model_name,
                "dimensions": dimensions,
                "input_hash": input_hash,
            }
        ],
    )


def upsert_skill_embeddings(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Many rows in one statement; each needs tenant_id, skill_id, embedding, model, dims, hash.

    Written as SQL over arrays (one parameter per column, whatever the row count): the ORM's
    multi-row insert compiles anew for every size of batch and costs a lone app job more
    than its own write.
    """
    if not rows:
        return
    session.execute(
        UPSERT_EMBEDDINGS,
        {
            "ids": [str(uuid.uuid4()) for _ in rows],
            "tenants": [row["tenant_id"] for row in rows],
            "skills": [row["skill_id"] for row in rows],
            # pgvector's text input, `[0.1,0.2,...]`, is JSON's array syntax: orjson writes it
            # in C, where pgvector's own adapter formats each float in Python.
            "embeddings": [orjson.dumps(row["embedding"]).decode() for row in rows],
            "models": [row["model_name"] for row in rows],
            "dimensions": [row["dimensions"] for row in rows],
            "hashes": [row["input_hash"] for row in rows],
        },
    )


UPSERT_EMBEDDINGS = text(
    """
    INSERT INTO skill_embeddings
        (id, tenant_id, skill_id, embedding, model_name, dimensions, input_hash)
    SELECT id, tenant_id, skill_id, CAST(embedding AS vector), model_name, dimensions, input_hash
    FROM unnest(CAST(:ids AS text[]), CAST(:tenants AS text[]), CAST(:skills AS text[]),
                CAST(:embeddings AS text[]), CAST(:models AS text[]), CAST(:dimensions AS int[]),
                CAST(:hashes AS text[]))
         AS v(id, tenant_id, skill_id, embedding, model_name, dimensions, input_hash)
    ON CONFLICT ON CONSTRAINT skill_embeddings_tenant_skill_unique DO UPDATE SET
        embedding = EXCLUDED.embedding, model_name = EXCLUDED.model_name,
        dimensions = EXCLUDED.dimensions, input_hash = EXCLUDED.input_hash, updated_at = now()
    """
)


def vector_literal(vector: Sequence[float]) -> ColumnElement[Any]:
    """The vector as pgvector's text input, `[0.1,0.2,...]`, which is JSON's array syntax:
    orjson writes it in C, where pgvector's own adapter formats each float in Python."""
    return cast(bindparam(None, orjson.dumps(vector).decode(), type_=Text), Vector())


def list_active_tenants(session: Session) -> list[str]:
    return list(session.scalars(select(Tenant.id).where(Tenant.is_active).order_by(Tenant.id)))


def iter_published_skills(session: Session, tenant_id: str) -> Iterator[SkillRecord]:
    """The tenant's published skills, streamed from a server-side cursor."""
    result = session.execute(
        select(Skill.id, Skill.tenant_id, Skill.name, Skill.description, Skill.status)
        .where(Skill.tenant_id == tenant_id, Skill.status == PUBLISHED)
        .order_by(Skill.id)
        .execution_options(yield_per=1000)
    )
    for row in result:
        yield SkillRecord(*row)


NEEDS_WORK_SQL = f"""
    SELECT skills.id AS skill_id
    FROM skills
    LEFT JOIN skill_embeddings e
        ON e.skill_id = skills.id AND e.tenant_id = skills.tenant_id
    WHERE skills.tenant_id = :tenant_id
      AND skills.status = '{PUBLISHED}'
      AND (:force
           OR e.id IS NULL
           OR e.model_name <> :model
           OR e.dimensions <> :dimensions
           OR e.input_hash <> {SQL_INPUT_HASH})
"""


NOT_IN_A_RUN_SQL = """
      AND NOT EXISTS (
        SELECT 1 FROM embedding_run_items i JOIN embedding_runs r ON r.id = i.run_id
        WHERE i.skill_id = skills.id AND i.outcome IS NULL AND r.finished_at IS NULL)
"""


def skills_needing_embedding(
    session: Session,
    tenant_id: str,
    *,
    model: str,
    dimensions: int,
    force: bool = False,
    exclude_pending_runs: bool = False,
) -> Iterator[str]:
    """Ids of the tenant's published skills with no row, a stale hash, or another model/size."""
    sql = NEEDS_WORK_SQL + (NOT_IN_A_RUN_SQL if exclude_pending_runs else "")
    result = session.execute(
        text(sql + " ORDER BY skills.id").execution_options(yield_per=2000),
        {"tenant_id": tenant_id, "model": model, "dimensions": dimensions, "force": force},
    )
    for row in result:
        yield str(row.skill_id)


def remove_unpublished_embeddings(session: Session, tenant_id: str) -> int:
    """Delete rows whose skill is no longer published; the count removed."""
    result = session.execute(
        text(
            """
            DELETE FROM skill_embeddings e USING skills
            WHERE e.skill_id = skills.id AND e.tenant_id = :tenant_id
              AND skills.status <> :published
            """
        ),
        {"tenant_id": tenant_id, "published": PUBLISHED},
    )
    return int(getattr(result, "rowcount", 0))


@dataclass(frozen=True, slots=True)
class Coverage:
    tenant_id: str
    published: int
    embedded: int
    stale: int
    missing: int


def coverage(session: Session, tenant_id: str, *, model: str, dimensions: int) -> Coverage:
    """How many of the tenant's published skills have a current, a stale or no embedding."""
    row: Row[Any] = session.execute(
        text(
            f"""
            SELECT count(*) AS published,
                   count(e.id) FILTER (WHERE e.input_hash = {SQL_INPUT_HASH}
                       AND e.model_name = :model AND e.dimensions = :dimensions) AS embedded,
                   count(e.id) AS with_row
            FROM skills
            LEFT JOIN skill_embeddings e
                ON e.skill_id = skills.id AND e.tenant_id = skills.tenant_id
            WHERE skills.tenant_id = :tenant_id AND skills.status = '{PUBLISHED}'
            """
        ),
        {"tenant_id": tenant_id, "model": model, "dimensions": dimensions},
    ).one()
    return Coverage(
        tenant_id=tenant_id,
        published=row.published,
        embedded=row.embedded,
        stale=row.with_row - row.embedded,
        missing=row.published - row.with_row,
    )


@dataclass(frozen=True, slots=True)
class Hit:
    name: str
    distance: float
    model_name: str


def nearest_skills(
    session: Session, tenant_id: str, query: Sequence[float], *, limit: int
) -> list[Hit]:
    """The tenant's skills nearest to `query` by cosine distance, as the app's search ranks."""
    rows = session.execute(
        select(
            Skill.name,
            SkillEmbedding.embedding.cosine_distance(vector_literal(query)).label("distance"),
            SkillEmbedding.model_name,
        )
        .join(Skill, Skill.id == SkillEmbedding.skill_id)
        .where(SkillEmbedding.tenant_id == tenant_id)
        .order_by("distance")
        .limit(limit)
    )
    return [Hit(str(r.name), float(r.distance), str(r.model_name)) for r in rows]
