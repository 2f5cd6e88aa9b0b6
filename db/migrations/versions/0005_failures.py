"""Failures an operator can list: attempts on run items, and a row per skill whose job outside
any run failed (cleared once the skill is embedded).

Revision ID: 0005_failures
Revises: 0004_pending_items_order
"""

from alembic import op

revision = "0005_failures"
down_revision = "0004_pending_items_order"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE embedding_run_items ADD COLUMN attempts integer;
        CREATE TABLE embedding_failures (
            skill_id text PRIMARY KEY,
            tenant_id text,
            reason text NOT NULL,
            attempts integer NOT NULL DEFAULT 1,
            failed_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX embedding_failures_failed_at_idx ON embedding_failures (failed_at DESC);
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP TABLE embedding_failures; ALTER TABLE embedding_run_items DROP COLUMN attempts;"
    )
