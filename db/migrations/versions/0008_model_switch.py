"""A model switch: what it is, its staging run, and the new model's vectors kept aside until the
swap (the app's tables keep their schema).

- `embedding_runs` gets `kind` ('backfill' or 'switch') and, for a switch, `model`.
- `embedding_switches`: one row per tenant whose switch is under way (staging, or queued behind
  another tenant's); the swap deletes it in the transaction that writes the new vectors.
- `staged_embeddings`: the new model's vector per skill, as `skill_embeddings` will hold it.
  Its `embedding` has no declared size: the switch's preflight holds it to the app's column.

Revision ID: 0008_model_switch
Revises: 0007_runs_count_the_catalog
"""

from alembic import op

revision = "0008_model_switch"
down_revision = "0007_runs_count_the_catalog"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE embedding_runs
            ADD COLUMN kind text NOT NULL DEFAULT 'backfill',
            ADD COLUMN model text;
        CREATE TABLE embedding_switches (
            tenant_id text PRIMARY KEY,
            model text NOT NULL,
            dimensions integer NOT NULL,
            from_model text NOT NULL,
            run_id text REFERENCES embedding_runs(id) ON DELETE SET NULL,
            position integer NOT NULL DEFAULT 0,
            requested_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE staged_embeddings (
            tenant_id text NOT NULL,
            skill_id text NOT NULL,
            embedding vector NOT NULL,
            model_name text NOT NULL,
            dimensions integer NOT NULL,
            input_hash text NOT NULL,
            staged_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, skill_id)
        );
        """
    )


def downgrade() -> None:
    op.execute(
        """
        DROP TABLE staged_embeddings;
        DROP TABLE embedding_switches;
        ALTER TABLE embedding_runs DROP COLUMN model, DROP COLUMN kind;
        """
    )
