"""The app's tables as the worker uses them: tenants, skills, site_settings, skill_embeddings.

The skill's text and its hash are a contract with the app (its search embeds queries the same
way, and its earlier backfill wrote rows this worker must recognise as current): the Python
form and the SQL form stand side by side here, and everything else derives from them. Callers
pass a Connection in a transaction scoped to the tenant (db.sql); each statement exists once.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, text

from db.sql import rowcount, scope_to_tenant

PUBLISHED = "published"


def skill_text(name: str, description: str | None) -> str:
    """What is embedded for a skill: `f"{name} {description}"`, as the app embeds it."""
    return f"{name} {description or ''}"


def input_hash(embedded: str) -> str:
    """sha256 hex of the UTF-8 bytes of the text embedded."""
    return hashlib.sha256(embedded.encode("utf-8")).hexdigest()


def skill_text_sql(skills: str = "skills") -> str:
    """skill_text in SQL, over the `skills` row named so (a test holds the two forms equal)."""
    return f"{skills}.name || ' ' || coalesce({skills}.description, '')"


def input_hash_sql(skills: str = "skills") -> str:
    """input_hash in SQL: stale rows are found without sending any text out of the database."""
    return f"encode(sha256(convert_to({skill_text_sql(skills)}, 'UTF8')), 'hex')"


@dataclass(frozen=True, slots=True)
class SkillRecord:
    id: str
    tenant_id: str
    name: str
    description: str | None
    status: str


@dataclass(frozen=True, slots=True)
class SettingsRecord:
    """The columns of a tenant's `site_settings` row that configure its embeddings."""

    semantic_similarity_enabled: bool
    ollama_url: str | None
    ollama_model: str | None
    embedding_dimensions: int | None


@dataclass(frozen=True, slots=True)
class StoredEmbedding:
    skill_id: str
    input_hash: str
    model_name: str
    dimensions: int
    embedding: str  # pgvector's text form, `[0.1,0.2,...]`
    updated_at: datetime | None = None


# --- tenants and skills ---------------------------------------------------------------------

_TENANTS = text("SELECT id FROM tenants WHERE is_active ORDER BY id")
_SKILLS = text(
    "SELECT id, tenant_id, name, description, status FROM skills"
    " WHERE id = ANY(CAST(:ids AS text[]))"
)
_PUBLISHED_SKILLS = text(
    "SELECT id, tenant_id, name, description, status FROM skills"
    f" WHERE tenant_id = :tenant AND status = '{PUBLISHED}' ORDER BY id"
).execution_options(yield_per=1000)


def list_active_tenants(conn: Connection) -> list[str]:
    return [str(tenant) for tenant in conn.execute(_TENANTS).scalars()]


def get_skills(conn: Connection, skill_ids: Sequence[str]) -> list[SkillRecord]:
    """The skills among `skill_ids` that row level security shows in this scope."""
    return [SkillRecord(*row) for row in conn.execute(_SKILLS, {"ids": list(skill_ids)})]


def get_skill(conn: Connection, skill_id: str) -> SkillRecord | None:
    found = get_skills(conn, [skill_id])
    return found[0] if found else None


def find_tenant(conn: Connection, skill_id: str, default_tenant: str) -> str | None:
    """The active tenant a skill belongs to, looking in `default_tenant` first: row level
    security shows one tenant's skills at a time, so the transaction is scoped to each in turn
    (it serves no other tenant's rows after this)."""
    tenants = list_active_tenants(conn)
    for tenant in [default_tenant, *(t for t in tenants if t != default_tenant)]:
        scope_to_tenant(conn, tenant)
        skill = get_skill(conn, skill_id)
        if skill is not None:
            return skill.tenant_id
    return None


def iter_published_skills(conn: Connection, tenant_id: str) -> Iterator[SkillRecord]:
    """The tenant's published skills, streamed from a server-side cursor."""
    result = conn.execute(_PUBLISHED_SKILLS, {"tenant": tenant_id})
    for row in result:
        yield SkillRecord(*row)


# --- site_settings ----------------------------------------------------------------------------

SETTINGS_COLUMNS = ("semantic_similarity_enabled", "ollama_url", "ollama_model",
                    "embedding_dimensions")  # fmt: skip
_SETTINGS = text(f"SELECT {', '.join(SETTINGS_COLUMNS)} FROM site_settings WHERE tenant_id = :t")


def get_site_settings(conn: Connection, tenant_id: str) -> SettingsRecord | None:
    row = conn.execute(_SETTINGS, {"t": tenant_id}).one_or_none()
    return SettingsRecord(*row) if row is not None else None


def update_site_settings(conn: Connection, tenant_id: str, **values: Any) -> SettingsRecord:
    """Insert the tenant's settings row or update the given columns of it."""
    unknown = set(values) - set(SETTINGS_COLUMNS)
    if unknown:
        raise ValueError(f"site_settings has no column {', '.join(sorted(unknown))}")
    columns = sorted(values)
    names = "".join(f", {c}" for c in columns)
    placeholders = "".join(f", :{c}" for c in columns)
    updates = "".join(f"{c} = EXCLUDED.{c}, " for c in columns)
    conn.execute(
        text(
            f"INSERT INTO site_settings (id, tenant_id{names}) VALUES (:id, :t{placeholders})"
            f" ON CONFLICT (tenant_id) DO UPDATE SET {updates}updated_at = now()"
        ),
        {"id": str(uuid.uuid4()), "t": tenant_id, **values},
    )
    settings = get_site_settings(conn, tenant_id)
    assert settings is not None
    return settings


# --- skill_embeddings -------------------------------------------------------------------------

# What deciding a job's skills needs, in one statement: the tenant's settings, the skills, and
# their stored rows' hash, model and size. Outer joins from a one-row relation: a row even
# without settings or skills; each join matches at most one row per skill.
_LOAD = text(
    """
    SELECT st.tenant_id IS NOT NULL AS has_settings, st.semantic_similarity_enabled,
           st.ollama_url, st.ollama_model, st.embedding_dimensions,
           s.id, s.tenant_id AS skill_tenant, s.name, s.description, s.status,
           e.input_hash, e.model_name, e.dimensions
    FROM (SELECT 1) AS one
    LEFT JOIN site_settings st ON st.tenant_id = :tenant
    LEFT JOIN skills s ON s.id = ANY(CAST(:ids AS text[]))
    LEFT JOIN skill_embeddings e ON e.skill_id = s.id AND e.tenant_id = :tenant
    """
)


@dataclass(frozen=True, slots=True)
class TenantRows:
    settings: SettingsRecord | None  # None: the tenant has no site_settings row
    skills: dict[str, SkillRecord]  # those of the ids row level security shows
    stored: dict[str, tuple[str, str, int]]  # skill id -> (input_hash, model_name, dimensions)


def load_tenant(conn: Connection, tenant_id: str, skill_ids: Sequence[str]) -> TenantRows:
    rows = conn.execute(_LOAD, {"tenant": tenant_id, "ids": list(skill_ids)}).all()
    first = rows[0]
    settings = None
    if first.has_settings:
        settings = SettingsRecord(first.semantic_similarity_enabled, first.ollama_url,
                                  first.ollama_model, first.embedding_dimensions)  # fmt: skip
    skills: dict[str, SkillRecord] = {}
    stored: dict[str, tuple[str, str, int]] = {}
    for row in rows:
        if row.id is None:
            continue
        skills[row.id] = SkillRecord(row.id, row.skill_tenant, row.name, row.description,
                                     row.status)  # fmt: skip
        if row.input_hash is not None:
            stored[row.id] = (row.input_hash, row.model_name, row.dimensions)
    return TenantRows(settings, skills, stored)


def skill_lock_keys(tenant_id: str, skill_ids: Sequence[str]) -> list[str]:
    """The advisory lock keys of these skills' embeddings, sorted (one order for every writer)."""
    return sorted(f"{tenant_id}/{skill_id}" for skill_id in set(skill_ids))


# The skills' advisory locks first, in FROM (advisory: the worker's role may lack UPDATE on
# `skills`; sorted, in one statement, so two writers never wait on each other in a cycle); the
# settings row FOR SHARE after, in the select list, evaluated once FROM has its row (a test
# holds the order). A model switch's swap takes the settings row FOR UPDATE first, so a live
# write either precedes the swap or waits for it and sees the new model: one that embedded with
# the old model then writes nothing. A writer never holds the settings row while it waits for a
# skill's lock, which a staged write may hold while it waits behind a swap.
_SKILL_LOCKS = (
    "SELECT count(pg_advisory_xact_lock(hashtextextended(key, 0))) AS n"
    " FROM unnest(CAST(:keys AS text[])) AS key"
)
_LOCK = text(
    f"""
    SELECT locked.n,
           (SELECT ollama_model FROM site_settings WHERE tenant_id = :tenant FOR SHARE)
               AS live_model
    FROM ({_SKILL_LOCKS}) AS locked
    """
)
_LOCK_SKILLS = text(_SKILL_LOCKS)


def lock_for_write(conn: Connection, tenant_id: str, skill_ids: Sequence[str]) -> str | None:
    """Until the transaction ends: the skills' advisory locks and the tenant's settings row held
    FOR SHARE. The tenant's model now (None: no row, or no value).

    A read of the skills must be a later statement: READ COMMITTED takes a statement's snapshot
    at its start, and an edit committed while this one waited must be seen.
    """
    row = conn.execute(
        _LOCK, {"tenant": tenant_id, "keys": skill_lock_keys(tenant_id, skill_ids)}
    ).one()
    return None if row.live_model is None else str(row.live_model)


def lock_skills(conn: Connection, tenant_id: str, skill_ids: Sequence[str]) -> None:
    """The skills' advisory locks alone, until the transaction ends (a staged write: an edit's
    job and a switch's batch never cross)."""
    conn.execute(_LOCK_SKILLS, {"keys": skill_lock_keys(tenant_id, skill_ids)})


# The one way a row of skill_embeddings is replaced, whatever writes it (a job's vectors from
# Ollama, or a switch's staged ones at its swap): one row per (tenant, skill), the vector, model,
# size and hash replaced in place.
UPSERT_CONFLICT = """
    ON CONFLICT ON CONSTRAINT skill_embeddings_tenant_skill_unique DO UPDATE SET
        embedding = EXCLUDED.embedding, model_name = EXCLUDED.model_name,
        dimensions = EXCLUDED.dimensions, input_hash = EXCLUDED.input_hash, updated_at = now()
"""

# The vectors a job fetched, for skills still published whose text is still the one embedded
# (`:checked`; false only where a caller plants rows as they are, a test or a bench). The skills
# are read by this statement, which starts after lock_for_write returned: an edit committed
# before is seen, and its skill's row is not written (superseded). Failures outside runs go with
# the rows written: the skill is embedded now.
_WRITE = text(
    f"""
    WITH written AS (
        INSERT INTO skill_embeddings
            (id, tenant_id, skill_id, embedding, model_name, dimensions, input_hash)
        SELECT v.id, s.tenant_id, s.id, CAST(v.embedding AS vector), v.model_name,
               v.dimensions, v.input_hash
        FROM unnest(CAST(:ids AS text[]), CAST(:skills AS text[]), CAST(:texts AS text[]),
                    CAST(:embeddings AS text[]), CAST(:models AS text[]),
                    CAST(:dimensions AS int[]), CAST(:hashes AS text[]))
             AS v(id, skill_id, text, embedding, model_name, dimensions, input_hash)
        JOIN skills s ON s.id = v.skill_id
        WHERE s.tenant_id = :tenant
          AND (NOT :checked OR (s.status = '{PUBLISHED}' AND {skill_text_sql("s")} = v.text))
        {UPSERT_CONFLICT}
        RETURNING skill_id, input_hash
    ), cleared AS (
        DELETE FROM embedding_failures WHERE skill_id IN (SELECT skill_id FROM written)
    )
    SELECT skill_id, input_hash FROM written
    """
)


@dataclass(frozen=True, slots=True)
class VectorRow:
    skill_id: str
    text: str  # what was embedded: the row is written only if the skill still has it
    embedding: Sequence[float]
    model_name: str
    dimensions: int
    input_hash: str


def write_current(
    conn: Connection, tenant_id: str, rows: Sequence[VectorRow], *, checked: bool = True
) -> set[tuple[str, str]]:
    """Upsert the rows whose skill is still published with the text embedded (all of them,
    unchecked), and clear those skills' failures; (skill id, input hash) of each row written.

    One row per skill and text: one statement cannot upsert the same key twice (two texts of
    one skill are fine: at most one is still the skill's).
    """
    if not rows:
        return set()
    result = conn.execute(
        _WRITE,
        {
            "tenant": tenant_id,
            "checked": checked,
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


_DELETE = text("DELETE FROM skill_embeddings WHERE skill_id = ANY(CAST(:ids AS text[]))")


def delete_embeddings(conn: Connection, skill_ids: Sequence[str]) -> None:
    """Remove these skills' rows (the skills left `published`)."""
    conn.execute(_DELETE, {"ids": list(skill_ids)})


_STORED = text(
    "SELECT skill_id, input_hash, model_name, dimensions, CAST(embedding AS text), updated_at"
    " FROM skill_embeddings WHERE skill_id = :id"
)


def get_stored(conn: Connection, skill_id: str) -> StoredEmbedding | None:
    """The skill's row as stored (its vector in pgvector's text form)."""
    row = conn.execute(_STORED, {"id": skill_id}).one_or_none()
    return StoredEmbedding(*row) if row is not None else None


# Whether a published skill (`skills`, its row `e` LEFT JOINed) needs a vector: no row, a stale
# hash, another model or size; all of them when forced.
NEEDS_WORK = f"""(:force OR e.id IS NULL OR e.model_name <> :model OR e.dimensions <> :dimensions
                  OR e.input_hash <> {input_hash_sql()})"""
_PUBLISHED_WITH_ROWS = f"""
    FROM skills
    LEFT JOIN skill_embeddings e
        ON e.skill_id = skills.id AND e.tenant_id = skills.tenant_id
    WHERE skills.tenant_id = :tenant_id AND skills.status = '{PUBLISHED}'
"""
# The tenant's published skills, each with whether it needs work: one pass over the catalog.
PUBLISHED_SQL = f"SELECT skills.id AS skill_id, {NEEDS_WORK} AS needs_work {_PUBLISHED_WITH_ROWS}"
NEEDS_WORK_SQL = f"SELECT skills.id AS skill_id {_PUBLISHED_WITH_ROWS} AND {NEEDS_WORK}"


@dataclass(frozen=True, slots=True)
class Survey:
    published: int
    needing: list[str]  # the published skills that need work, by id


_SURVEY = text(
    f"""
    SELECT count(*) AS published,
           coalesce(array_agg(p.skill_id ORDER BY p.skill_id) FILTER (WHERE p.needs_work), '{{}}')
               AS needing
    FROM ({PUBLISHED_SQL}) AS p
    """
)


def survey(conn: Connection, tenant_id: str, *, model: str, dimensions: int, force: bool) -> Survey:
    """The tenant's published skills, counted, and those that need work, in one pass."""
    row = conn.execute(
        _SURVEY, {"tenant_id": tenant_id, "model": model, "dimensions": dimensions, "force": force}
    ).one()
    return Survey(int(row.published), [str(skill_id) for skill_id in row.needing])


# A skill that is a pending item of an open run is that run's to embed.
_NOT_IN_A_RUN = """
      AND NOT EXISTS (
        SELECT 1 FROM embedding_run_items i JOIN embedding_runs r ON r.id = i.run_id
        WHERE i.skill_id = skills.id AND i.outcome IS NULL AND r.finished_at IS NULL)
"""
_NEEDING = text(NEEDS_WORK_SQL + _NOT_IN_A_RUN + " ORDER BY skills.id").execution_options(
    yield_per=2000
)


def skills_needing_embedding(
    conn: Connection, tenant_id: str, *, model: str, dimensions: int
) -> Iterator[str]:
    """Ids of the tenant's published skills with no row, a stale hash, or another model or
    size, and in no open run's hands; streamed."""
    result = conn.execute(
        _NEEDING, {"tenant_id": tenant_id, "model": model, "dimensions": dimensions, "force": False}
    )
    for row in result:
        yield str(row.skill_id)


_REMOVE_UNPUBLISHED = text(
    f"""
    DELETE FROM skill_embeddings e USING skills
    WHERE e.skill_id = skills.id AND e.tenant_id = :tenant_id AND skills.status <> '{PUBLISHED}'
    """
)


def remove_unpublished_embeddings(conn: Connection, tenant_id: str) -> int:
    """Delete rows whose skill is no longer published; the count removed."""
    return rowcount(conn.execute(_REMOVE_UNPUBLISHED, {"tenant_id": tenant_id}))


@dataclass(frozen=True, slots=True)
class Coverage:
    tenant_id: str
    published: int
    embedded: int
    stale: int
    missing: int


_COVERAGE = text(
    f"""
    SELECT count(*) AS published,
           count(e.id) FILTER (WHERE e.input_hash = {input_hash_sql()}
               AND e.model_name = :model AND e.dimensions = :dimensions) AS embedded,
           count(e.id) AS with_row
    FROM skills
    LEFT JOIN skill_embeddings e ON e.skill_id = skills.id AND e.tenant_id = skills.tenant_id
    WHERE skills.tenant_id = :tenant_id AND skills.status = '{PUBLISHED}'
    """
)


def coverage(conn: Connection, tenant_id: str, *, model: str, dimensions: int) -> Coverage:
    """How many of the tenant's published skills have a current, a stale or no embedding."""
    row = conn.execute(
        _COVERAGE, {"tenant_id": tenant_id, "model": model, "dimensions": dimensions}
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


_NEAREST = text(
    """
    SELECT s.name, e.embedding <=> CAST(:query AS vector) AS distance, e.model_name
    FROM skill_embeddings e JOIN skills s ON s.id = e.skill_id
    WHERE e.tenant_id = :tenant ORDER BY distance LIMIT :limit
    """
)


def nearest_skills(
    conn: Connection, tenant_id: str, query: Sequence[float], *, limit: int
) -> list[Hit]:
    """The tenant's skills nearest to `query` by cosine distance, as the app's search ranks."""
    rows = conn.execute(
        _NEAREST, {"query": orjson.dumps(list(query)).decode(), "tenant": tenant_id, "limit": limit}
    )
    return [Hit(str(r.name), float(r.distance), str(r.model_name)) for r in rows]
