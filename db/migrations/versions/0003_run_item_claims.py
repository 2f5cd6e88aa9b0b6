"""Claims on run items, so a bulk job can embed waiting neighbours in one batch.

Revision ID: 0003_run_item_claims
Revises: 0002_embedding_runs
"""

from alembic import op

revision = "0003_run_item_claims"
down_revision = "0002_embedding_runs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE embedding_run_items ADD COLUMN claimed_at timestamptz")


def downgrade() -> None:
    op.execute("ALTER TABLE embedding_run_items DROP COLUMN claimed_at")
