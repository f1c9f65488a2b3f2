"""download_records: no surrogate id (half the cost of loading records on PostgreSQL)

Revision ID: 0004
Revises: 0003

Nothing reads or references ``download_records.id``: records are selected by day and
package and deleted by object. Its sequence and unique B-tree were about half of what
PostgreSQL spent on COPY of a day's records (888,000 rows: 3.2 s with it, 1.6 s without).
A record is identified by (object_id, category, package, day, ip_hash), unique by
construction (an object's counts are aggregated per client and day before they are stored).

Compatible with the release before it: that code never names the column (COPY and INSERT
list their columns), so a rollback after this migration keeps working (no schema floor).
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # On PostgreSQL both are catalogue changes only: no rewrite of the table.
    with op.batch_alter_table("download_records", schema=None) as batch_op:
        batch_op.drop_constraint("pk_download_records", type_="primary")
        batch_op.drop_column("id")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE download_records ADD COLUMN id BIGSERIAL")
        op.create_primary_key("pk_download_records", "download_records", ["id"])
        return
    with op.batch_alter_table("download_records", schema=None, recreate="always") as batch_op:
        batch_op.add_column(sa.Column("id", sa.Integer(), nullable=True))
    op.execute("UPDATE download_records SET id = rowid")
    with op.batch_alter_table("download_records", schema=None, recreate="always") as batch_op:
        batch_op.alter_column("id", nullable=False)
        batch_op.create_primary_key("pk_download_records", ["id"])
