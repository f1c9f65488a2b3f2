"""seen-sets: the daily run adds the new day's clients instead of recounting the year

Revision ID: 0005
Revises: 0004

New tables (see ``store/models.py`` and docs/ETL.md, "Incremental statistics"):

* ``stats_seen``: one row per (year, known package, client hash) with the months the client
  downloaded the package in, as bits; ``stats_seen_category`` the same per category;
* ``stats_seen_packages``: the packages rows the seen-sets hold;
* ``record_months``: where each (category, package) has records, known or not;
* ``ingested_objects.counted_at``: the ``ingested_at`` whose records are counted.

Backfill: the seen-sets and record months from every stored record, every ledger row counted,
``meta.seen_version`` = the data version. The statistics themselves are left as they are (they
were computed from the same records; months still queued in ``stats_pending`` stay queued).

Expand-only, no schema floor. The release before this one ignores the new tables and column:
it keeps storing records and recomputing the months they touch from the records, as before,
and leaves the seen-sets behind. This release notices (its ledger rows have no ``counted_at``
and the data version moved past ``meta.seen_version``; packages rows it added are not in
``stats_seen_packages``) and recounts those years from the records on its next run.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# As in categories.py when this revision was written: nothing before these years is counted.
_COUNTED = (
    "(p.category = 'workflows' AND {year} >= 2015 OR p.category <> 'workflows' AND {year} >= 2009)"
)
_UNCOUNTED = "counted_at IS NULL OR counted_at <> ingested_at"


def _bit_or(expr: str, postgresql: bool) -> str:
    if postgresql:
        return f"bit_or({expr})"
    # SQLite has no bit_or: OR of 12 month bits = sum of each bit's max.
    return " + ".join(f"max(({expr}) & {1 << i})" for i in range(12))


def upgrade() -> None:
    op.create_table(
        "stats_seen",
        sa.Column("ip_hash", sa.BigInteger(), nullable=False),
        sa.Column("package_id", sa.Integer(), nullable=False),
        sa.Column("year", sa.SmallInteger(), nullable=False),
        sa.Column("months", sa.SmallInteger(), nullable=False),
        sa.PrimaryKeyConstraint("year", "package_id", "ip_hash", name=op.f("pk_stats_seen")),
    )
    op.create_table(
        "stats_seen_category",
        sa.Column("ip_hash", sa.BigInteger(), nullable=False),
        sa.Column("year", sa.SmallInteger(), nullable=False),
        sa.Column("months", sa.SmallInteger(), nullable=False),
        sa.Column("category", sa.String(length=16), nullable=False),
        sa.PrimaryKeyConstraint("year", "category", "ip_hash", name=op.f("pk_stats_seen_category")),
    )
    op.create_table(
        "stats_seen_packages",
        sa.Column("package_id", sa.Integer(), nullable=False),
        sa.Column("category", sa.String(length=16), nullable=False),
        sa.Column("package", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("package_id", name=op.f("pk_stats_seen_packages")),
    )
    op.create_table(
        "record_months",
        sa.Column("category", sa.String(length=16), nullable=False),
        sa.Column("package", sa.String(length=200), nullable=False),
        sa.Column("year", sa.SmallInteger(), nullable=False),
        sa.Column("month", sa.SmallInteger(), nullable=False),
        sa.Column("first_day", sa.Date(), nullable=False),
        sa.Column("last_day", sa.Date(), nullable=False),
        sa.PrimaryKeyConstraint(
            "category", "package", "year", "month", name=op.f("pk_record_months")
        ),
    )
    with op.batch_alter_table("ingested_objects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("counted_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_ingested_objects_uncounted",
        "ingested_objects",
        ["id"],
        postgresql_where=sa.text(_UNCOUNTED),
        sqlite_where=sa.text(_UNCOUNTED),
    )
    postgresql = op.get_bind().dialect.name == "postgresql"
    if postgresql:
        # A client's row is rewritten when it comes back in a new month: room on its page
        # keeps that a HOT update (no new index entry).
        op.execute("ALTER TABLE stats_seen SET (fillfactor = 90)")
        op.execute("ALTER TABLE stats_seen_category SET (fillfactor = 90)")
        year, month = "extract(year FROM r.day)::int", "extract(month FROM r.day)::int"
    else:
        year = "CAST(strftime('%Y', r.day) AS INTEGER)"
        month = "CAST(strftime('%m', r.day) AS INTEGER)"
    _backfill(postgresql, year, month)


def _backfill(postgresql: bool, year: str, month: str) -> None:
    op.execute(
        f"""
        INSERT INTO record_months (category, package, year, month, first_day, last_day)
        SELECT r.category, r.package, {year}, {month}, min(r.day), max(r.day)
        FROM download_records r
        GROUP BY r.category, r.package, {year}, {month}
        """
    )
    op.execute(
        f"""
        INSERT INTO stats_seen (ip_hash, package_id, year, months)
        SELECT r.ip_hash, p.id, {year}, {_bit_or(f"1 << ({month} - 1)", postgresql)}
        FROM download_records r
        JOIN packages p ON p.package = r.package AND p.category = r.category
        WHERE {_COUNTED.format(year=year)}
        GROUP BY {year}, p.id, r.ip_hash
        ORDER BY {year}, p.id, r.ip_hash
        """
    )
    op.execute(
        f"""
        INSERT INTO stats_seen_category (ip_hash, year, months, category)
        SELECT s.ip_hash, s.year, {_bit_or("s.months", postgresql)}, p.category
        FROM stats_seen s JOIN packages p ON p.id = s.package_id
        GROUP BY s.year, p.category, s.ip_hash
        ORDER BY s.year, p.category, s.ip_hash
        """
    )
    op.execute(
        "INSERT INTO stats_seen_packages (package_id, category, package) "
        "SELECT id, category, package FROM packages"
    )
    op.execute("UPDATE ingested_objects SET counted_at = ingested_at")
    op.execute(
        "INSERT INTO meta (key, value) SELECT 'seen_version', "
        "coalesce((SELECT value FROM meta WHERE key = 'data_version'), '0')"
    )


def downgrade() -> None:
    op.execute("DELETE FROM meta WHERE key = 'seen_version'")
    op.drop_index("ix_ingested_objects_uncounted", table_name="ingested_objects")
    with op.batch_alter_table("ingested_objects", schema=None) as batch_op:
        batch_op.drop_column("counted_at")
    op.drop_table("record_months")
    op.drop_table("stats_seen_packages")
    op.drop_table("stats_seen_category")
    op.drop_table("stats_seen")
