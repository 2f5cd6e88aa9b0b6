"""`python -m worker migrate` on an empty database and on the app's own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from db import migrate
from db.sql import make_engine
from tests.databases import APP_ROLE, OWNER, Database

APP_TABLES = ("tenants", "skills", "skill_embeddings", "site_settings")

# Everything PostgreSQL knows about a table: columns, constraints, indexes, policies, RLS, owner.
CATALOG_SQL = """
SELECT 'table' AS kind, c.relname AS name,
       format('owner=%s rls=%s force=%s', pg_get_userbyid(c.relowner), c.relrowsecurity,
              c.relforcerowsecurity) AS definition
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname = ANY(:tables)
UNION ALL
SELECT 'column', c.relname || '.' || a.attname,
       format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull || ' default=' ||
       coalesce(pg_get_expr(d.adbin, d.adrelid), '')
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE c.relname = ANY(:tables) AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint', conrelid::regclass || '.' || conname, pg_get_constraintdef(oid)
FROM pg_constraint WHERE conrelid::regclass::text = ANY(:tables)
UNION ALL
SELECT 'index', indexname, indexdef FROM pg_indexes WHERE tablename = ANY(:tables)
UNION ALL
SELECT 'policy', tablename || '.' || policyname,
       format('%s %s %s using=%s check=%s', permissive, roles, cmd, qual, with_check)
FROM pg_policies WHERE tablename = ANY(:tables)
UNION ALL
SELECT 'grant', table_name || '.' || grantee,
       string_agg(privilege_type, ',' ORDER BY privilege_type)
FROM information_schema.role_table_grants WHERE table_name = ANY(:tables)
GROUP BY table_name, grantee
ORDER BY 1, 2, 3
"""


def catalog(database: Database, tables: tuple[str, ...] = APP_TABLES) -> list[tuple[object, ...]]:
    return [tuple(row) for row in database.rows(CATALOG_SQL, tables=list(tables))]


def run_migrate(database: Database, role: str = "postgres", **env: str) -> None:
    engine = make_engine(database.url(role).replace("postgresql://", "postgresql+psycopg://"))
    try:
        migrate.upgrade(engine, dimensions=int(env.get("dimensions", 768)))
    finally:
        engine.dispose()


def test_migrate_on_an_empty_database_creates_the_app_schema(empty_db: Database) -> None:
    run_migrate(empty_db)

    assert empty_db.scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    columns = {(row[1], row[2].split(" ")[0]) for row in catalog(empty_db) if row[0] == "column"}
    assert ("skill_embeddings.embedding", "vector(768)") in columns
    assert ("skill_embeddings.id", "text") in columns
    assert ("site_settings.semantic_similarity_enabled", "boolean") in columns
    assert ("skills.status", "text") in columns
    indexes = " ".join(str(row[2]) for row in catalog(empty_db) if row[0] == "index")
    assert "USING hnsw (embedding vector_cosine_ops)" in indexes
    assert "UNIQUE" in indexes
    assert "(tenant_id, skill_id)" in indexes
    policies = {row[1] for row in catalog(empty_db) if row[0] == "policy"}
    assert policies == {
        "skills.tenant_isolation",
        "skill_embeddings.tenant_isolation",
        "site_settings.tenant_isolation",
    }
    rls = {row[1]: row[2] for row in catalog(empty_db) if row[0] == "table"}
    assert "rls=t " in str(rls["skill_embeddings"])
    assert empty_db.scalar("SELECT version_num FROM embedder_alembic_version") == (
        migrate.head_revision()
    )


def test_migrate_on_the_apps_database_changes_none_of_the_apps_objects(app_db: Database) -> None:
    before = catalog(app_db, (*APP_TABLES, "users"))
    drizzle_before = app_db.rows('SELECT * FROM drizzle."__drizzle_migrations"')

    run_migrate(app_db, OWNER)

    assert catalog(app_db, (*APP_TABLES, "users")) == before
    assert app_db.rows('SELECT * FROM drizzle."__drizzle_migrations"') == drizzle_before
    # What the worker owns is there, and the app's role can use it.
    assert app_db.scalar("SELECT to_regclass('public.embedding_runs')") == "embedding_runs"
    assert app_db.scalar(
        "SELECT has_table_privilege(:role, 'embedding_run_items', 'INSERT')", role=APP_ROLE
    )


def test_migrate_twice_is_a_no_op(empty_db: Database) -> None:
    run_migrate(empty_db)
    before = catalog(empty_db, (*APP_TABLES, "embedding_runs", "embedding_run_items"))

    run_migrate(empty_db)

    assert catalog(empty_db, (*APP_TABLES, "embedding_runs", "embedding_run_items")) == before
    assert empty_db.scalar("SELECT count(*) FROM embedder_alembic_version") == 1


def test_embedding_dimensions_chooses_the_vector_size(empty_db: Database) -> None:
    run_migrate(empty_db, dimensions="384")

    assert (
        empty_db.scalar(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'skill_embeddings'::regclass AND attname = 'embedding'"
        )
        == "vector(384)"
    )


def test_python_m_worker_migrate_reports_what_it_did(empty_db: Database) -> None:
    env = {**os.environ, "DATABASE_URL": empty_db.admin_url}
    first = subprocess.run(
        [sys.executable, "-m", "worker", "migrate"], env=env, capture_output=True, text=True
    )
    second = subprocess.run(
        [sys.executable, "-m", "worker", "migrate"], env=env, capture_output=True, text=True
    )

    assert first.returncode == 0, first.stderr
    assert f"Migrated empty -> {migrate.head_revision()}" in first.stdout
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mysql://user@host/db", "DATABASE_URL is invalid: expected postgresql://"),
        ("postgresql://user@host:port/db", "DATABASE_URL is invalid: the port is not a number"),
        ("postgres://user@host:5432", "DATABASE_URL is invalid: it names no database"),
        ("", "DATABASE_URL is invalid"),
    ],
)
def test_a_malformed_database_url_gives_one_clear_line(value: str, expected: str) -> None:
    env = {**os.environ, "DATABASE_URL": value}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "migrate"], env=env, capture_output=True, text=True
    )

    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {expected}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_a_missing_database_url_names_the_variable() -> None:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "migrate"], env=env, capture_output=True, text=True
    )

    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: DATABASE_URL is not set: export DATABASE_URL=... "
        "(see the README's configuration table)"
    )


def test_an_unreachable_database_gives_one_clear_line() -> None:
    env = {**os.environ, "DATABASE_URL": "postgresql://u:secret@127.0.0.1:9/db"}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "migrate"], env=env, capture_output=True, text=True
    )

    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach PostgreSQL")
    assert "secret" not in result.stderr
    assert "Traceback" not in result.stderr
