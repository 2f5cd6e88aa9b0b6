"""Throwaway databases on the session's PostgreSQL, and rows to put in them."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Engine

from devstack.postgres import LocalPostgres

APP_SQL = Path(__file__).parent / "sql" / "everyskill_app.sql"
OWNER = "everyskill_owner"
APP_ROLE = "everyskill_app"  # the non-owner role the app and the worker log in as
TENANT_A = "default-tenant-000-0000-000000000000"
TENANT_B = "tenant-bbbb-0000-0000-000000000002"

_names = itertools.count(1)

SCHEMA_DIGEST = """
SELECT md5(string_agg(item, ',' ORDER BY item)) FROM (
  SELECT c.relname || ':' || c.relkind::text || ':' || coalesce(c.relacl::text, '') || ':'
         || c.relrowsecurity::text || ':' || coalesce((
           SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ';'
                             ORDER BY a.attnum)
           FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         ), '')
  FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace
  UNION ALL
  SELECT p.polname || ':' || p.polrelid::regclass::text || ':'
         || coalesce(pg_get_expr(p.polqual, p.polrelid), '')
  FROM pg_policy p
  UNION ALL
  SELECT 'fn:' || p.oid::regprocedure::text || ':' || md5(p.prosrc)
  FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
  UNION ALL
  SELECT 'tg:' || t.tgname || ':' || t.tgrelid::regclass::text
  FROM pg_trigger t WHERE NOT t.tgisinternal
  UNION ALL
  SELECT 'ns:' || coalesce(n.nspacl::text, '') FROM pg_namespace n WHERE n.nspname = 'public'
) AS digest(item)
"""


def create_roles(server: LocalPostgres) -> None:
    server.psql(
        f"CREATE ROLE {OWNER} LOGIN PASSWORD 'owner';"
        f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD 'app' NOSUPERUSER NOBYPASSRLS;"
    )


@dataclass
class Database:
    server: LocalPostgres
    name: str
    _engines: list[Engine] = field(default_factory=list)

    def url(self, role: str = "postgres") -> str:
        password = {OWNER: "owner", APP_ROLE: "app"}.get(role, "")
        return self.server.url(role, password, self.name)

    @property
    def admin_url(self) -> str:
        return self.url()

    @property
    def app_url(self) -> str:
        return self.url(APP_ROLE)

    def engine(self, role: str = "postgres") -> Engine:
        engine = sa.create_engine(self.url(role).replace("postgresql://", "postgresql+psycopg://"))
        self._engines.append(engine)
        return engine

    @property
    def admin(self) -> Engine:
        """A superuser engine: bypasses row level security, for arranging and checking rows."""
        if not self._engines:
            self.engine()
        return self._engines[0]

    def scalar(self, sql: str, **params: object) -> object:
        with self.admin.connect() as connection:
            return connection.execute(sa.text(sql), params).scalar()

    def rows(self, sql: str, **params: object) -> list[sa.Row[tuple[object, ...]]]:
        with self.admin.connect() as connection:
            return list(connection.execute(sa.text(sql), params))

    def execute(self, sql: str, **params: object) -> None:
        with self.admin.begin() as connection:
            connection.execute(sa.text(sql), params)

    def add_tenant(
        self, tenant_id: str, *, active: bool = True, enabled: bool = True, settings: bool = True
    ) -> None:
        """A tenant and (unless `settings=False`) its site_settings row, semantic similarity on
        unless `enabled=False`."""
        self.execute(
            "INSERT INTO tenants (id, name, slug, is_active) VALUES (:id, :id, :id, :active)",
            id=tenant_id,
            active=active,
        )
        if not settings:
            return
        self.execute(
            "INSERT INTO site_settings (id, tenant_id, semantic_similarity_enabled)"
            " VALUES (:sid, :tenant, :enabled)",
            sid=str(uuid.uuid4()),
            tenant=tenant_id,
            enabled=enabled,
        )

    def set_ollama(self, tenant_id: str, url: str, model: str = "nomic-embed-text") -> None:
        self.execute(
            "UPDATE site_settings SET ollama_url = :url, ollama_model = :model"
            " WHERE tenant_id = :tenant",
            url=url,
            model=model,
            tenant=tenant_id,
        )

    def add_skill(
        self,
        tenant_id: str,
        name: str,
        description: str = "",
        *,
        status: str = "published",
        skill_id: str | None = None,
        visibility: str = "tenant",
    ) -> str:
        skill_id = skill_id or str(uuid.uuid4())
        self.execute(
            "INSERT INTO skills (id, tenant_id, slug, name, description, content, status,"
            " visibility) VALUES (:id, :tenant, :id, :name, :description, '', :status, :vis)",
            id=skill_id,
            tenant=tenant_id,
            name=name,
            description=description,
            status=status,
            vis=visibility,
        )
        return skill_id

    def add_skills(
        self, tenant_id: str, skills: list[tuple[str, str]], *, status: str = "published"
    ) -> list[str]:
        """Many skills (name, description) in one statement; their ids in the same order."""
        ids = [str(uuid.uuid4()) for _ in skills]
        self.execute(
            "INSERT INTO skills (id, tenant_id, slug, name, description, content, status,"
            " visibility) SELECT id, :tenant, id, name, description, '', :status, 'tenant'"
            " FROM unnest(CAST(:ids AS text[]), CAST(:names AS text[]),"
            " CAST(:descriptions AS text[])) AS s(id, name, description)",
            tenant=tenant_id,
            status=status,
            ids=ids,
            names=[name for name, _ in skills],
            descriptions=[description for _, description in skills],
        )
        return ids

    def published_catalog(self, tenant_id: str, count: int) -> list[str]:
        """`count` published skills, "Catalog skill 0000" on, in one statement."""
        return self.add_skills(
            tenant_id,
            [(f"Catalog skill {i:04d}", f"Does useful thing number {i}") for i in range(count)],
        )

    def edit_skill(self, skill_id: str, **columns: str) -> None:
        assignments = ", ".join(f"{column} = :{column}" for column in columns)
        self.execute(
            f"UPDATE skills SET {assignments}, updated_at = now() WHERE id = :id",
            id=skill_id,
            **columns,
        )

    def embedding_rows(self) -> list[sa.Row[tuple[object, ...]]]:
        return self.rows(
            "SELECT id, tenant_id, skill_id, embedding::text AS embedding, model_name, dimensions,"
            " input_hash FROM skill_embeddings ORDER BY skill_id"
        )

    def reset(self, tables: list[str]) -> None:
        """Empty `tables` (a shared database between tests); waits at most a few seconds for a
        lock, so a transaction left open shows up as an error instead of a hang."""
        with self.admin.begin() as connection:
            connection.exec_driver_sql("SET LOCAL lock_timeout = '5s'")
            connection.exec_driver_sql(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")

    def schema(self) -> str:
        """A digest of what a test could change beyond rows: relations, columns, grants,
        policies, functions and triggers of the public schema."""
        return str(self.scalar(SCHEMA_DIGEST))

    def tables(self) -> list[str]:
        """The tables that hold rows, all but the migrations' own version table."""
        return [
            str(row.tablename)
            for row in self.rows(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                " AND tablename NOT LIKE '%version%' ORDER BY tablename"
            )
        ]

    def dispose(self) -> None:
        for engine in self._engines:
            engine.dispose()
        self._engines.clear()


@contextmanager
def throwaway_database(server: LocalPostgres, template: str | None = None) -> Iterator[Database]:
    name = f"test_{next(_names)}_{uuid.uuid4().hex[:6]}"
    server.psql(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    database = Database(server, name)
    try:
        yield database
    finally:
        database.dispose()
        server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def build_app_schema(database: Database) -> None:
    """The app's tables, owned by the app's owner role, as the app's migrations leave them."""
    database.server.psql(f"GRANT CREATE ON SCHEMA public TO {OWNER}", database=database.name)
    with database.admin.begin() as connection:
        connection.exec_driver_sql(APP_SQL.read_text())
