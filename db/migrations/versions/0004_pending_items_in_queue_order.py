"""Run items in queue order: claiming a batch, or queuing the next chunk of jobs, reads the
next few items, not the whole run.

Revision ID: 0004_pending_items_order
Revises: 0003_run_item_claims
"""

from alembic import op

revision = "0004_pending_items_order"
down_revision = "0003_run_item_claims"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        DROP INDEX embedding_run_items_pending_idx;
        CREATE INDEX embedding_run_items_pending_idx
            ON embedding_run_items (run_id, tenant_id, position) WHERE outcome IS NULL;
        CREATE INDEX embedding_run_items_queue_order_idx
            ON embedding_run_items (run_id, tenant_id, position);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX embedding_run_items_queue_order_idx;
        DROP INDEX embedding_run_items_pending_idx;
        CREATE INDEX embedding_run_items_pending_idx ON embedding_run_items (run_id)
            WHERE outcome IS NULL;
        """
    )
