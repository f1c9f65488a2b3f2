"""download_records: cheaper to load (no FK check per row, BRIN indexes on PostgreSQL)

Revision ID: 0003
Revises: 0002

Loading records dominated the ETL's cost in PostgreSQL: the per-row foreign-key check and
the B-tree on package. Records and their ledger row are always written and removed in one
transaction by the ETL, so the foreign key guarded nothing the code does not. ``object_id``
and ``day`` grow with the load order, which BRIN indexes summarize at almost no insert cost
(re-ingest deletes by object, months are read by day range). A packages-table change now
reads the records of its packages with one sequential scan; that is rare.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("download_records", schema=None) as batch_op:
        batch_op.drop_constraint(
            "fk_download_records_object_id_ingested_objects", type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_download_records_package"))
        batch_op.drop_index(batch_op.f("ix_download_records_object_id"))
        batch_op.drop_index(batch_op.f("ix_download_records_day"))
        batch_op.create_index(
            batch_op.f("ix_download_records_object_id"), ["object_id"], postgresql_using="brin"
        )
        batch_op.create_index(
            batch_op.f("ix_download_records_day"), ["day"], postgresql_using="brin"
        )


def downgrade() -> None:
    with op.batch_alter_table("download_records", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_download_records_day"))
        batch_op.drop_index(batch_op.f("ix_download_records_object_id"))
        batch_op.create_index(batch_op.f("ix_download_records_day"), ["day"])
        batch_op.create_index(batch_op.f("ix_download_records_object_id"), ["object_id"])
        batch_op.create_index(
            batch_op.f("ix_download_records_package"), ["package"], postgresql_using="hash"
        )
        batch_op.create_foreign_key(
            "fk_download_records_object_id_ingested_objects",
            "ingested_objects",
            ["object_id"],
            ["id"],
            ondelete="CASCADE",
        )
