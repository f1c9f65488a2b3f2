"""stats_pending queue; a cheaper package index on download_records

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
    # (category, package, day) was a wide B-tree fed in random order by every load: it
    # dominated the cost of storing records. Lookups by package (packages-table changes)
    # only need equality: a hash index on PostgreSQL (a plain one on SQLite).
    with op.batch_alter_table("download_records", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_download_records_category_package_day"))
        batch_op.create_index(
            batch_op.f("ix_download_records_package"),
            ["package"],
            unique=False,
            postgresql_using="hash",
        )


def downgrade() -> None:
    with op.batch_alter_table("download_records", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_download_records_package"))
        batch_op.create_index(
            batch_op.f("ix_download_records_category_package_day"),
            ["category", "package", "day"],
            unique=False,
        )
    op.drop_table("stats_pending")
