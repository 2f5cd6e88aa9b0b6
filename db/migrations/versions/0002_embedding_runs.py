"""The worker's own tables: backfill runs and their items.

Revision ID: 0002_embedding_runs
Revises: 0001_app_tables
"""

from alembic import op

revision = "0002_embedding_runs"
down_revision = "0001_app_tables"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE embedding_runs (
            id text PRIMARY KEY,
            tenant_id text,
            force boolean NOT NULL DEFAULT false,
            total integer NOT NULL DEFAULT 0,
            embedded integer NOT NULL DEFAULT 0,
            unchanged integer NOT NULL DEFAULT 0,
            failed integer NOT NULL DEFAULT 0,
            skipped integer NOT NULL DEFAULT 0,
            fanned_out boolean NOT NULL DEFAULT false,
            started_at timestamptz NOT NULL DEFAULT now(),
            finished_at timestamptz
        );
        CREATE TABLE embedding_run_items (
            run_id text NOT NULL REFERENCES embedding_runs(id) ON DELETE CASCADE,
            skill_id text NOT NULL,
            tenant_id text NOT NULL,
            position integer NOT NULL,
            outcome text,
            detail text,
            finished_at timestamptz,
            PRIMARY KEY (run_id, skill_id)
        );
        CREATE INDEX embedding_run_items_pending_idx ON embedding_run_items (run_id)
            WHERE outcome IS NULL;
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE embedding_run_items; DROP TABLE embedding_runs;")
