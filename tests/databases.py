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
