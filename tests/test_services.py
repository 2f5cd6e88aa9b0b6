"""The database services, as the worker's non-owner role sees them under row level security."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import ProgrammingError

from db import job_statements, services
from db.job_statements import Conn
from db.session import SessionFactory, job_transaction, scope_connection, tenant_scope
from tasks.text import input_hash, skill_text
from tests.databases import TENANT_A, TENANT_B, Database

VECTOR = [0.0] * 767 + [1.0]


def embedding_for(tenant: str, skill_id: str, text: str = "x") -> dict[str, object]:
    return {
        "tenant_id": tenant,
        "skill_id": skill_id,
        "embedding": VECTOR,
        "model_name": "nomic-embed-text",
        "dimensions": 768,
        "input_hash": input_hash(text),
    }


def test_upserting_the_same_skill_twice_leaves_one_row_with_our_uuid(
    db: Database, sessions: SessionFactory
) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Review pull requests", "for security issues")

    with tenant_scope(sessions, TENANT_A) as session:
        services.upsert_skill_embedding(session, **embedding_for(TENANT_A, skill, "one"))
    first_id = db.scalar("SELECT id FROM skill_embeddings")
    with tenant_scope(sessions, TENANT_A) as session:
        services.upsert_skill_embedding(session, **embedding_for(TENANT_A, skill, "two"))

    rows = db.rows("SELECT id, input_hash FROM skill_embeddings")
    assert len(rows) == 1
    assert rows[0].id == first_id
    assert uuid.UUID(str(rows[0].id)).version == 4
    assert rows[0].input_hash == input_hash("two")


def test_update_site_settings_inserts_then_updates(db: Database, sessions: SessionFactory) -> None:
    db.execute("INSERT INTO tenants (id, name, slug) VALUES (:t, 't', 't')", t=TENANT_A)

    with tenant_scope(sessions, TENANT_A) as session:
        created = services.update_site_settings(session, TENANT_A, semantic_similarity_enabled=True)
        assert created.semantic_similarity_enabled
        assert created.ollama_model == "nomic-embed-text"
    with tenant_scope(sessions, TENANT_A) as session:
        services.update_site_settings(session, TENANT_A, ollama_url="http://gpu:11434")
        settings = services.get_site_settings(session, TENANT_A)

    assert settings is not None
    assert settings.ollama_url == "http://gpu:11434"
    assert settings.semantic_similarity_enabled
    assert db.scalar("SELECT count(*) FROM site_settings") == 1


def test_update_site_settings_rejects_an_unknown_column(
    db: Database, sessions: SessionFactory
) -> None:
    with (
        tenant_scope(sessions, TENANT_A) as session,
        pytest.raises(ValueError, match="no column ollama_host"),
    ):
        services.update_site_settings(session, TENANT_A, ollama_host="x")


@contextmanager
def job_scope(sessions: SessionFactory, tenant_id: str) -> Iterator[Conn]:
    """A job's own transaction (psycopg's connection, db.job_statements), scoped to a tenant."""
    with job_transaction(sessions.kw["bind"]) as conn:
        scope_connection(conn, tenant_id)
        yield conn


def test_a_jobs_delete_removes_the_row(db: Database, sessions: SessionFactory) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Summarise meeting notes")
    with tenant_scope(sessions, TENANT_A) as session:
        services.upsert_skill_embedding(session, **embedding_for(TENANT_A, skill))

    with job_scope(sessions, TENANT_A) as conn:
        job_statements.delete_embeddings(conn, [skill])

    assert db.scalar("SELECT count(*) FROM skill_embeddings") == 0


def test_listing_tenants_and_published_skills(db: Database, sessions: SessionFactory) -> None:
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B, active=False)
    published = db.add_skill(TENANT_A, "Draft a renewal email", "for a customer")
    db.add_skill(TENANT_A, "Half-written idea", status="draft")

    with tenant_scope(sessions, TENANT_A) as session:
        tenants = services.list_active_tenants(session)
        skills = list(services.iter_published_skills(session, TENANT_A))

    assert tenants == [TENANT_A]
    assert [skill.id for skill in skills] == [published]


@pytest.mark.parametrize(
    ("name", "description"),
    [
        ("Übersetzung ins Deutsche", "Technische Dokumentation übersetzen"),
        ("丁寧な返信", "Polite replies 🚀"),
        ("Icon metaphors", ""),
    ],
)
def test_the_database_computes_the_same_input_hash_as_python(
    db: Database, sessions: SessionFactory, name: str, description: str
) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, name, description)

    with tenant_scope(sessions, TENANT_A) as session:
        sql_hash = session.execute(
            sa.text(f"SELECT {services.SQL_INPUT_HASH} FROM skills WHERE id = :id"), {"id": skill}
        ).scalar()

    assert sql_hash == input_hash(skill_text(name, description))


def test_a_tenant_scope_neither_sees_nor_writes_another_tenants_rows(
    db: Database, sessions: SessionFactory
) -> None:
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B)
    skill_a = db.add_skill(TENANT_A, "Tenant A's skill")
    skill_b = db.add_skill(TENANT_B, "Tenant B's skill")
    with tenant_scope(sessions, TENANT_B) as session:
        services.upsert_skill_embedding(session, **embedding_for(TENANT_B, skill_b))

    with tenant_scope(sessions, TENANT_A) as session:
        assert services.get_skill(session, skill_b) is None
        assert services.get_skill(session, skill_a) is not None
        assert services.get_skill_embedding(session, skill_b) is None
        assert services.get_site_settings(session, TENANT_B) is None
    with job_scope(sessions, TENANT_A) as conn:  # a job's load and delete, on psycopg alone
        rows = job_statements.load_tenant(conn, TENANT_A, [skill_a, skill_b])
        assert set(rows.skills) == {skill_a}
        assert rows.stored == {}
        job_statements.delete_embeddings(conn, [skill_b])
    with (
        pytest.raises(ProgrammingError, match="row-level security"),
        tenant_scope(sessions, TENANT_A) as session,
    ):
        services.upsert_skill_embedding(session, **embedding_for(TENANT_B, skill_b, "forged"))

    assert db.scalar("SELECT input_hash FROM skill_embeddings WHERE skill_id = :s", s=skill_b) == (
        input_hash("x")
    )


def test_without_a_tenant_scope_the_role_sees_no_tenant_rows(
    db: Database, sessions: SessionFactory
) -> None:
    db.add_tenant(TENANT_A)
    db.add_skill(TENANT_A, "Hidden without a scope")

    with sessions.begin() as session:
        assert session.execute(sa.text("SELECT count(*) FROM skills")).scalar() == 0


def test_a_global_skill_is_visible_to_every_tenant(db: Database, sessions: SessionFactory) -> None:
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B)
    shared = db.add_skill(TENANT_B, "Shared skill", visibility="global_approved")

    with tenant_scope(sessions, TENANT_A) as session:
        assert services.get_skill(session, shared) is not None
