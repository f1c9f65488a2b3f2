"""stats_pending: months whose statistics must be recomputed (written with the records)

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The ETL writes a row here in the same transaction as an object's records, and deletes
    # it in the same transaction as the recomputed statistics: a run killed in between
    # leaves the work to the next run instead of losing it.
    op.create_table(
        "stats_pending",
        sa.Column("category", sa.String(length=16), nullable=False),
        sa.Column("package", sa.String(length=200), nullable=False),
        sa.Column("year", sa.SmallInteger(), nullable=False),
        sa.Column("month", sa.SmallInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "category", "package", "year", "month", name=op.f("pk_stats_pending")
        ),
    )


def downgrade() -> None:
    op.drop_table("stats_pending")
