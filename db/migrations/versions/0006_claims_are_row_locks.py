"""Claims on run items are row locks held by the batch's transaction, not a timestamp: drop
`claimed_at`, which nothing reads any more.

Revision ID: 0006_claims_are_row_locks
Revises: 0005_failures
"""

from alembic import op

revision = "0006_claims_are_row_locks"
down_revision = "0005_failures"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE embedding_run_items DROP COLUMN claimed_at")


def downgrade() -> None:
    op.execute("ALTER TABLE embedding_run_items ADD COLUMN claimed_at timestamptz")
