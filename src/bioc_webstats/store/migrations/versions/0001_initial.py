"""initial schema

Revision ID: 0001
Revises: -
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "category_stats",
        sa.Column("category", sa.String(length=16), nullable=False),
        sa.Column("year", sa.SmallInteger(), nullable=False),
        sa.Column("month", sa.SmallInteger(), nullable=False),
        sa.Column("ips", sa.BigInteger(), nullable=False),
        sa.Column("downloads", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("category", "year", "month", name=op.f("pk_category_stats")),
    )
    op.create_table(
        "ingested_objects",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("etag", sa.String(length=200), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("name_hour", sa.DateTime(), nullable=False),
        sa.Column("lines_read", sa.BigInteger(), nullable=False),
        sa.Column("accepted", sa.BigInteger(), nullable=False),
        sa.Column("rejected", sa.BigInteger(), nullable=False),
        sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingested_objects")),
        sa.UniqueConstraint("key", name=op.f("uq_ingested_objects_key")),
    )
    with op.batch_alter_table("ingested_objects", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ingested_objects_name_hour"), ["name_hour"], unique=False
        )

    op.create_table(
        "meta",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_meta")),
    )
    op.create_table(
        "package_stats",
        sa.Column("category", sa.String(length=16), nullable=False),
        sa.Column("package", sa.String(length=200), nullable=False),
        sa.Column("year", sa.SmallInteger(), nullable=False),
        sa.Column("month", sa.SmallInteger(), nullable=False),
        sa.Column("ips", sa.BigInteger(), nullable=False),
        sa.Column("downloads", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "category", "package", "year", "month", name=op.f("pk_package_stats")
        ),
    )
    with op.batch_alter_table("package_stats", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_package_stats_category_year_month"),
            ["category", "year", "month"],
            unique=False,
        )

    op.create_table(
        "packages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("package", sa.String(length=200), nullable=False),
        sa.Column("category", sa.String(length=16), nullable=False),
        sa.Column("first_release", sa.String(length=16), nullable=True),
        sa.Column("last_release", sa.String(length=16), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_packages")),
        sa.UniqueConstraint("package", "category", name=op.f("uq_packages_package_category")),
    )
    op.create_table(
        "download_records",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column(
            "object_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("category", sa.String(length=16), nullable=False),
        sa.Column("package", sa.String(length=200), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("ip_hash", sa.BigInteger(), nullable=False),
        sa.Column("downloads", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["object_id"],
            ["ingested_objects.id"],
            name=op.f("fk_download_records_object_id_ingested_objects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_download_records")),
    )
    with op.batch_alter_table("download_records", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_download_records_category_package_day"),
            ["category", "package", "day"],
            unique=False,
        )
        batch_op.create_index(batch_op.f("ix_download_records_day"), ["day"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_download_records_object_id"), ["object_id"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("download_records", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_download_records_object_id"))
        batch_op.drop_index(batch_op.f("ix_download_records_day"))
        batch_op.drop_index(batch_op.f("ix_download_records_category_package_day"))

    op.drop_table("download_records")
    op.drop_table("packages")
    with op.batch_alter_table("package_stats", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_package_stats_category_year_month"))

    op.drop_table("package_stats")
    op.drop_table("meta")
    with op.batch_alter_table("ingested_objects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ingested_objects_name_hour"))

    op.drop_table("ingested_objects")
    op.drop_table("category_stats")
