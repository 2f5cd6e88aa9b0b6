"""A run lists every published skill of its tenants, those already current included (recorded
`unchanged`, `needed_work` false, no job queued), so that its summary can tell, at the end,
which of its skills are still published and current; and it counts those that left the catalog.

Revision ID: 0007_runs_count_the_catalog
Revises: 0006_claims_are_row_locks
"""

from alembic import op

revision = "0007_runs_count_the_catalog"
down_revision = "0006_claims_are_row_locks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE embedding_run_items ADD COLUMN needed_work boolean NOT NULL DEFAULT true;
        ALTER TABLE embedding_runs ADD COLUMN unpublished integer NOT NULL DEFAULT 0;
        ALTER TABLE embedding_runs ADD COLUMN deleted integer NOT NULL DEFAULT 0;
        """
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE embedding_runs DROP COLUMN deleted;
        ALTER TABLE embedding_runs DROP COLUMN unpublished;
        ALTER TABLE embedding_run_items DROP COLUMN needed_work;
        """
    )
