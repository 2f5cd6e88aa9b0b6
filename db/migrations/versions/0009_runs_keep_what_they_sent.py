"""A run keeps only the items it sent (or will send), and names its tenants.

A backfill over a catalog that is mostly current used to write one `unchanged` item per
skill, so its summary could count them at the end; on a large catalog that was most of the
run's cost and most of the worker's tables. The run now records its tenants, and its close
counts the tenants' current skills straight from the catalog. Finished runs are pruned after
RUN_RETENTION_DAYS (an index on `finished_at` keeps that cheap).

Revision ID: 0009_runs_keep_what_they_sent
Revises: 0008_model_switch
"""

from alembic import op

revision = "0009_runs_keep_what_they_sent"
down_revision = "0008_model_switch"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE embedding_runs ADD COLUMN tenants text[];
        CREATE INDEX embedding_runs_finished_idx ON embedding_runs (finished_at);
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP INDEX embedding_runs_finished_idx;
        ALTER TABLE embedding_runs DROP COLUMN tenants;
        """
    )
