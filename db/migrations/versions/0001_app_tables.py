"""The app's tables, for a standalone install: created only where missing, never altered.

On an EverySkill database these tables, their indexes and their row level security policies
already exist (the app's drizzle migrations made them); this revision then changes nothing.
On an empty database it creates them exactly as the app defines them.

Revision ID: 0001_app_tables
Revises:
"""

from alembic import context, op
from sqlalchemy import text

revision = "0001_app_tables"
down_revision = None
branch_labels = None
depends_on = None

TENANT_MATCH = "tenant_id = current_setting('app.current_tenant_id', true)"

APP_TABLES: dict[str, str] = {
    "tenants": """
        CREATE TABLE tenants (
            id text PRIMARY KEY NOT NULL,
            name text NOT NULL,
            slug text,
            is_active boolean DEFAULT true NOT NULL,
            created_at timestamp DEFAULT now() NOT NULL
        );
    """,
    "skills": f"""
        CREATE TABLE skills (
            id text PRIMARY KEY NOT NULL,
            tenant_id text NOT NULL REFERENCES tenants(id),
            name text NOT NULL,
            description text NOT NULL DEFAULT '',
            status text DEFAULT 'draft' NOT NULL,
            visibility text DEFAULT 'tenant' NOT NULL,
            created_at timestamp DEFAULT now() NOT NULL,
            updated_at timestamp DEFAULT now() NOT NULL
        );
        CREATE INDEX skills_tenant_id_idx ON skills (tenant_id);
        CREATE INDEX skills_status_idx ON skills (status);
        ALTER TABLE skills ENABLE ROW LEVEL SECURITY;
        CREATE POLICY tenant_isolation ON skills
            USING ({TENANT_MATCH} OR visibility = 'global_approved')
            WITH CHECK ({TENANT_MATCH});
    """,
    "skill_embeddings": f"""
        CREATE TABLE skill_embeddings (
            id text PRIMARY KEY NOT NULL,
            tenant_id text NOT NULL REFERENCES tenants(id),
            skill_id text NOT NULL REFERENCES skills(id) ON DELETE CASCADE,
            embedding vector({{dimensions}}) NOT NULL,
            model_name text NOT NULL,
            dimensions integer NOT NULL,
            input_hash text NOT NULL,
            created_at timestamp DEFAULT now() NOT NULL,
            updated_at timestamp DEFAULT now() NOT NULL,
            CONSTRAINT skill_embeddings_tenant_skill_unique UNIQUE (tenant_id, skill_id)
        );
        CREATE INDEX skill_embeddings_embedding_idx ON skill_embeddings
            USING hnsw (embedding vector_cosine_ops);
        ALTER TABLE skill_embeddings ENABLE ROW LEVEL SECURITY;
        CREATE POLICY tenant_isolation ON skill_embeddings
            USING ({TENANT_MATCH}) WITH CHECK ({TENANT_MATCH});
    """,
    "site_settings": f"""
        CREATE TABLE site_settings (
            id text PRIMARY KEY DEFAULT 'default' NOT NULL,
            tenant_id text UNIQUE REFERENCES tenants(id),
            semantic_similarity_enabled boolean DEFAULT false NOT NULL,
            ollama_url text DEFAULT 'http://localhost:11434' NOT NULL,
            ollama_model text DEFAULT 'nomic-embed-text' NOT NULL,
            embedding_dimensions integer DEFAULT 768 NOT NULL,
            last_successful_connection timestamp,
            updated_at timestamp DEFAULT now() NOT NULL
        );
        ALTER TABLE site_settings ENABLE ROW LEVEL SECURITY;
        CREATE POLICY tenant_isolation ON site_settings
            USING ({TENANT_MATCH}) WITH CHECK ({TENANT_MATCH});
    """,
}


def upgrade() -> None:
    bind = op.get_bind()
    dimensions = int(context.config.attributes.get("dimensions", 768))
    missing = [
        name
        for name in APP_TABLES
        if bind.execute(text("SELECT to_regclass(:name)"), {"name": f"public.{name}"}).scalar()
        is None
    ]
    if "skill_embeddings" in missing:
        op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    for name in missing:  # dict order respects the foreign keys
        op.execute(APP_TABLES[name].replace("{dimensions}", str(dimensions)))


def downgrade() -> None:
    # The app's tables may hold the app's data: never dropped from here.
    pass
