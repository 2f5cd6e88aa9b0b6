"""The app's tables through db.catalog, as the worker's non-owner role sees them under row level
security."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import ProgrammingError

from db import catalog
from db.catalog import VectorRow, input_hash, input_hash_sql, skill_text
from db.sql import tenant_scope
from tests.databases import TENANT_A, TENANT_B, Database

VECTOR = [0.0] * 767 + [1.0]


def embedding_for(skill_id: str, text: str = "x") -> VectorRow:
    return VectorRow(skill_id, text, VECTOR, "nomic-embed-text", 768, input_hash(text))


def plant(conn: sa.Connection, tenant: str, row: VectorRow) -> set[tuple[str, str]]:
    """The row written as it is (the worker's own upsert, its text check off)."""
    return catalog.write_current(conn, tenant, [row], checked=False)


def test_upserting_the_same_skill_twice_leaves_one_row_with_our_uuid(
    db: Database, engine: sa.Engine
) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Review pull requests", "for security issues")

    with tenant_scope(engine, TENANT_A) as conn:
        plant(conn, TENANT_A, embedding_for(skill, "one"))
    first_id = db.scalar("SELECT id FROM skill_embeddings")
    with tenant_scope(engine, TENANT_A) as conn:
        plant(conn, TENANT_A, embedding_for(skill, "two"))

    rows = db.rows("SELECT id, input_hash FROM skill_embeddings")
    assert len(rows) == 1
    assert rows[0].id == first_id
    assert uuid.UUID(str(rows[0].id)).version == 4
    assert rows[0].input_hash == input_hash("two")


def test_update_site_settings_inserts_then_updates(db: Database, engine: sa.Engine) -> None:
    db.execute("INSERT INTO tenants (id, name, slug) VALUES (:t, 't', 't')", t=TENANT_A)

    with tenant_scope(engine, TENANT_A) as conn:
        created = catalog.update_site_settings(conn, TENANT_A, semantic_similarity_enabled=True)
        assert created.semantic_similarity_enabled
        assert created.ollama_model == "nomic-embed-text"
    with tenant_scope(engine, TENANT_A) as conn:
        catalog.update_site_settings(conn, TENANT_A, ollama_url="http://gpu:11434")
        settings = catalog.get_site_settings(conn, TENANT_A)

    assert settings is not None
    assert settings.ollama_url == "http://gpu:11434"
    assert settings.semantic_similarity_enabled
    assert db.scalar("SELECT count(*) FROM site_settings") == 1


def test_update_site_settings_rejects_an_unknown_column(db: Database, engine: sa.Engine) -> None:
    with (
        tenant_scope(engine, TENANT_A) as conn,
        pytest.raises(ValueError, match="no column ollama_host"),
    ):
        catalog.update_site_settings(conn, TENANT_A, ollama_host="x")


def test_a_jobs_delete_removes_the_row(db: Database, engine: sa.Engine) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Summarise meeting notes")
    with tenant_scope(engine, TENANT_A) as conn:
        plant(conn, TENANT_A, embedding_for(skill))

    with tenant_scope(engine, TENANT_A) as conn:
        catalog.delete_embeddings(conn, [skill])

    assert db.scalar("SELECT count(*) FROM skill_embeddings") == 0


def test_listing_tenants_and_published_skills(db: Database, engine: sa.Engine) -> None:
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B, active=False)
    published = db.add_skill(TENANT_A, "Draft a renewal email", "for a customer")
    db.add_skill(TENANT_A, "Half-written idea", status="draft")

    with tenant_scope(engine, TENANT_A) as conn:
        tenants = catalog.list_active_tenants(conn)
        skills = list(catalog.iter_published_skills(conn, TENANT_A))

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
    db: Database, engine: sa.Engine, name: str, description: str
) -> None:
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, name, description)

    with tenant_scope(engine, TENANT_A) as conn:
        sql_hash = conn.execute(
            sa.text(f"SELECT {input_hash_sql()} FROM skills WHERE id = :id"), {"id": skill}
        ).scalar()

    assert sql_hash == input_hash(skill_text(name, description))


def test_a_tenant_scope_neither_sees_nor_writes_another_tenants_rows(
    db: Database, engine: sa.Engine
) -> None:
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B)
    skill_a = db.add_skill(TENANT_A, "Tenant A's skill")
    skill_b = db.add_skill(TENANT_B, "Tenant B's skill")
    with tenant_scope(engine, TENANT_B) as conn:
        plant(conn, TENANT_B, embedding_for(skill_b))

    with tenant_scope(engine, TENANT_A) as conn:
        assert catalog.get_skill(conn, skill_b) is None
        assert catalog.get_skill(conn, skill_a) is not None
        assert catalog.get_stored(conn, skill_b) is None
        assert catalog.get_site_settings(conn, TENANT_B) is None
    with tenant_scope(engine, TENANT_A) as conn:  # a job's load and delete
        rows = catalog.load_tenant(conn, TENANT_A, [skill_a, skill_b])
        assert set(rows.skills) == {skill_a}
        assert rows.stored == {}
        catalog.delete_embeddings(conn, [skill_b])
    with tenant_scope(engine, TENANT_A) as conn:  # the skill is hidden: nothing is written
        assert plant(conn, TENANT_B, embedding_for(skill_b, "forged")) == set()
    with (
        pytest.raises(ProgrammingError, match="row-level security"),
        tenant_scope(engine, TENANT_A) as conn,
    ):
        conn.execute(
            sa.text(
                "INSERT INTO skill_embeddings (id, tenant_id, skill_id, embedding, model_name,"
                " dimensions, input_hash) VALUES ('forged', :t, :s, CAST(:v AS vector),"
                " 'nomic-embed-text', 768, 'forged')"
            ),
            {"t": TENANT_B, "s": skill_b, "v": str(VECTOR)},
        )

    assert db.scalar("SELECT input_hash FROM skill_embeddings WHERE skill_id = :s", s=skill_b) == (
        input_hash("x")
    )


def test_without_a_tenant_scope_the_role_sees_no_tenant_rows(
    db: Database, engine: sa.Engine
) -> None:
    db.add_tenant(TENANT_A)
    db.add_skill(TENANT_A, "Hidden without a scope")

    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM skills")).scalar() == 0


def test_a_global_skill_is_visible_to_every_tenant(db: Database, engine: sa.Engine) -> None:
    db.add_tenant(TENANT_A)
    db.add_tenant(TENANT_B)
    shared = db.add_skill(TENANT_B, "Shared skill", visibility="global_approved")

    with tenant_scope(engine, TENANT_A) as conn:
        assert catalog.get_skill(conn, shared) is not None
