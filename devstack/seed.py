"""Catalogs of any size, made inside PostgreSQL: tenants, their settings, and skills.

`seed_catalog` is one `INSERT ... SELECT` over `generate_series`, so 200,000 skills take
seconds and no list of them is ever held in Python. Names and descriptions have realistic
lengths (names about 35-60 characters, descriptions about 300), as the app's catalog does.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

TENANT = "default-tenant-000-0000-000000000000"
MODEL = "nomic-embed-text"

# Words for names and descriptions of realistic length.
_VERBS = ["Review", "Draft", "Migrate", "Audit", "Debug", "Plan", "Summarise", "Refactor"]
_TOPICS = [
    "Kubernetes rollout", "quarterly OKR", "PostgreSQL index", "incident postmortem",
    "customer onboarding", "React component", "GDPR data request", "Terraform module",
    "sales pipeline", "API rate limit", "release notes", "on-call handover",
]  # fmt: skip
_THINGS = ["checklist", "playbook", "assistant", "template", "guide", "reviewer"]
_SENTENCES = [
    "Walks through each step with the questions a senior engineer would ask.",
    "Produces a short summary, a list of risks and the owners who should sign off.",
    "Reads the attached context first and refuses to guess when something is missing.",
    "Formats the result as Markdown with headings the team already uses in its wiki.",
    "Flags anything that touches production data, billing or personal information.",
    "Keeps the tone neutral and cites the source of every number it reports.",
]


def _array(words: list[str]) -> str:
    return "ARRAY[" + ", ".join("'" + word.replace("'", "''") + "'" for word in words) + "]"


def _pick(words: list[str], step: int) -> str:
    return f"({_array(words)})[1 + (i / {step}) % {len(words)}]"


# The skills' rows: the first :published of the series are published, the rest drafts; skill
# i belongs to tenant i mod the tenants' count. `current` also writes each published skill a
# current embedding (the input hash of db.catalog, a constant vector) in the same statement.
_SKILLS = f"""
    INSERT INTO skills (id, tenant_id, name, description, status, visibility)
    SELECT gen_random_uuid()::text,
           (CAST(:tenants AS text[]))[1 + i % cardinality(CAST(:tenants AS text[]))],
           :label || ' ' || {_pick(_VERBS, 1)} || ' ' || {_pick(_TOPICS, 7)} || ' '
               || {_pick(_THINGS, 3)} || ' #' || i,
           {_pick(_SENTENCES, 1)} || ' ' || {_pick(_SENTENCES, 5)} || ' '
               || {_pick(_SENTENCES, 11)} || ' ' || {_pick(_SENTENCES, 13)}
               || ' Variant ' || i || '.',
           CASE WHEN i <= :published THEN 'published' ELSE 'draft' END,
           'tenant'
    FROM generate_series(1, :rows) AS i
    RETURNING id, tenant_id, name, description, status
"""
_CURRENT = f"""
    WITH seeded AS ({_SKILLS})
    INSERT INTO skill_embeddings (id, tenant_id, skill_id, embedding, model_name, dimensions,
                                  input_hash)
    SELECT gen_random_uuid()::text, tenant_id, id, array_fill(0.01, ARRAY[768])::vector,
           '{MODEL}', 768, encode(sha256(convert_to(name || ' ' || description, 'UTF8')), 'hex')
    FROM seeded WHERE status = 'published'
    RETURNING skill_id
"""
_PUBLISHED = f"WITH seeded AS ({_SKILLS}) SELECT id FROM seeded WHERE status = 'published'"


def tenant_ids(count: int) -> list[str]:
    """The default tenant first, then `count - 1` others."""
    return [TENANT] + [f"bench-tenant-{n:03d}-0000-000000000000" for n in range(1, count)]


def add_tenants(
    engine: sa.Engine,
    tenants: Sequence[str] = (TENANT,),
    *,
    settings: bool = True,
    ollama_url: str | None = None,
) -> None:
    """The tenants, each with a settings row (semantic search on) unless `settings` is False;
    `ollama_url` pins their Ollama (None leaves the column's default: the worker's own)."""
    with engine.begin() as connection:
        for tenant in tenants:
            connection.execute(
                sa.text(
                    "INSERT INTO tenants (id, name, slug) VALUES (:t, :t, :t)"
                    " ON CONFLICT DO NOTHING"
                ),
                {"t": tenant},
            )
            if not settings:
                continue
            connection.execute(
                sa.text(
                    "INSERT INTO site_settings (id, tenant_id, semantic_similarity_enabled)"
                    " VALUES (:t, :t, true) ON CONFLICT (tenant_id) DO NOTHING"
                ),
                {"t": tenant},
            )
            if ollama_url is not None:
                connection.execute(
                    sa.text("UPDATE site_settings SET ollama_url = :url WHERE tenant_id = :t"),
                    {"t": tenant, "url": ollama_url},
                )


def seed_catalog(
    engine: sa.Engine,
    skills: int,
    tenants: Sequence[str] = (TENANT,),
    *,
    drafts: bool = True,
    current: bool = False,
    label: str = "Skill",
) -> list[str]:
    """`skills` published skills spread over `tenants` (which must exist), plus one draft for
    every 19 of them unless `drafts` is False, in one statement. With `current`, each published
    skill also gets a current embedding (drop the HNSW index first for large catalogs: see
    `drop_vector_index`). Returns the ids of the published skills."""
    rows = skills + (skills // 19 if drafts else 0)
    parameters = {"tenants": list(tenants), "published": skills, "rows": rows, "label": label}
    with engine.begin() as connection:
        result = connection.execute(sa.text(_CURRENT if current else _PUBLISHED), parameters)
        return [str(row[0]) for row in result]


def clear(engine: sa.Engine, *, catalog: bool = True) -> None:
    """No embeddings and no runs; with `catalog`, no skills either (tenants stay)."""
    tables = "skills, skill_embeddings" if catalog else "skill_embeddings"
    with engine.begin() as connection:
        connection.exec_driver_sql(f"TRUNCATE {tables}, embedding_runs CASCADE")


def drop_vector_index(engine: sa.Engine) -> None:
    """The app's HNSW index goes: seeding vectors into it would take minutes at scale."""
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX IF EXISTS skill_embeddings_embedding_idx")


def analyze(engine: sa.Engine) -> None:
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
