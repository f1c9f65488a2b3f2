"""The tables, in SQLAlchemy 2.0 style. Alembic migrations are the one source of the schema:
a change here needs a new revision under ``migrations/versions``."""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Date,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Package(Base):
    """One row per (package, category) ever released."""

    __tablename__ = "packages"
    __table_args__ = (UniqueConstraint("package", "category"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    package: Mapped[str] = mapped_column(String(200))
    category: Mapped[str] = mapped_column(String(16))
    first_release: Mapped[str | None] = mapped_column(String(16))
    last_release: Mapped[str | None] = mapped_column(String(16))  # None while in devel


class IngestedObject(Base):
    """The ledger: one row per log object whose records are stored (same transaction)."""

    __tablename__ = "ingested_objects"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(Text, unique=True)
    etag: Mapped[str | None] = mapped_column(String(200))
    size: Mapped[int] = mapped_column(BigInteger)
    name_hour: Mapped[dt.datetime] = mapped_column(DateTime)  # the hour in the object's name, UTC
    lines_read: Mapped[int] = mapped_column(BigInteger, default=0)
    accepted: Mapped[int] = mapped_column(BigInteger, default=0)
    rejected: Mapped[int] = mapped_column(BigInteger, default=0)
    ingested_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    # The ingested_at whose records the seen-sets and statistics hold (revision 0005). NULL or
    # another value: stored (or replaced) and not yet counted; apply_pending counts it. A writer
    # that never sets it (the release before 0005) is noticed the same way.
    counted_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index(None, "name_hour"),
        Index(
            "ix_ingested_objects_uncounted",
            "id",
            postgresql_where=text("counted_at IS NULL OR counted_at <> ingested_at"),
            sqlite_where=text("counted_at IS NULL OR counted_at <> ingested_at"),
        ),
    )


class DownloadRecord(Base):
    """Counted downloads of one object, aggregated per (category, package, day, client).

    ``ip_hash`` is a keyed hash (HMAC) of the client address, never the address itself.
    Unknown packages are kept here too; only the statistics filter on the packages table.
    """

    __tablename__ = "download_records"

    # No surrogate key (revision 0004): the ORM identifies a record by its natural key.
    # The ledger row of the object (no foreign key since revision 0003: the ETL writes and
    # removes records with their ledger row in one transaction).
    object_id: Mapped[int] = mapped_column(BigId)
    category: Mapped[str] = mapped_column(String(16))
    package: Mapped[str] = mapped_column(String(200))
    day: Mapped[dt.date] = mapped_column(Date)
    ip_hash: Mapped[int] = mapped_column(BigInteger)
    downloads: Mapped[int] = mapped_column(Integer)

    __table_args__ = (
        Index(None, "object_id", postgresql_using="brin"),  # revision 0003
        Index(None, "day", postgresql_using="brin"),
    )
    __mapper_args__: ClassVar[dict[str, Any]] = {
        "primary_key": ["object_id", "category", "package", "day", "ip_hash"]
    }


class PackageStat(Base):
    """Distinct IPs and downloads of a known package; ``month`` 0 is the whole year."""

    __tablename__ = "package_stats"

    category: Mapped[str] = mapped_column(String(16), primary_key=True)
    package: Mapped[str] = mapped_column(String(200), primary_key=True)
    year: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    month: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    ips: Mapped[int] = mapped_column(BigInteger)
    downloads: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index(None, "category", "year", "month"),)


class CategoryStat(Base):
    """Category totals over its known packages; ``month`` 0 is the whole year."""

    __tablename__ = "category_stats"

    category: Mapped[str] = mapped_column(String(16), primary_key=True)
    year: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    month: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    ips: Mapped[int] = mapped_column(BigInteger)
    downloads: Mapped[int] = mapped_column(BigInteger)


class StatsPending(Base):
    """(category, package, year, month) whose statistics must be recomputed.

    Written in the transaction that stores or removes records, cleared in the transaction
    that recomputes the statistics (revision 0002)."""

    __tablename__ = "stats_pending"

    category: Mapped[str] = mapped_column(String(16), primary_key=True)
    package: Mapped[str] = mapped_column(String(200), primary_key=True)
    year: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    month: Mapped[int] = mapped_column(SmallInteger, primary_key=True)


class SeenClient(Base):
    """The seen-set of a package's year (revision 0005): one row per (year, package, client)
    with the months the client downloaded it in (bit m-1 for month m). Lets the daily run add
    a day's new clients to the distinct counts of a month and a year without reading the
    year's records. Known packages only, from the category's first year on."""

    __tablename__ = "stats_seen"

    # Column order packs a row into 16 bytes (40 with the tuple header); key order keeps a
    # year together.
    ip_hash: Mapped[int] = mapped_column(BigInteger)
    package_id: Mapped[int] = mapped_column(Integer)  # packages.id
    year: Mapped[int] = mapped_column(SmallInteger)
    months: Mapped[int] = mapped_column(SmallInteger)

    __table_args__ = (PrimaryKeyConstraint("year", "package_id", "ip_hash"),)


class SeenCategoryClient(Base):
    """The seen-set of a category's year: one row per (year, category, client) over the
    category's known packages, months as in :class:`SeenClient` (revision 0005)."""

    __tablename__ = "stats_seen_category"

    ip_hash: Mapped[int] = mapped_column(BigInteger)
    year: Mapped[int] = mapped_column(SmallInteger)
    months: Mapped[int] = mapped_column(SmallInteger)
    category: Mapped[str] = mapped_column(String(16))

    __table_args__ = (PrimaryKeyConstraint("year", "category", "ip_hash"),)


class SeenPackage(Base):
    """The packages rows whose clients the seen-sets hold (revision 0005): a packages row not
    here was added since (by this release or an older one) and is counted from its records; a
    row here and gone from packages is taken out."""

    __tablename__ = "stats_seen_packages"

    package_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    category: Mapped[str] = mapped_column(String(16))
    package: Mapped[str] = mapped_column(String(200))


class RecordMonth(Base):
    """The (category, package, year, month) that hold records, known package or not, and the
    first and last day of them (revision 0005). Only ever widened (a re-ingest that removes
    records leaves it wider than needed, which is harmless): a package added to the packages
    table finds its records by day range instead of reading every record ever stored."""

    __tablename__ = "record_months"

    category: Mapped[str] = mapped_column(String(16), primary_key=True)
    package: Mapped[str] = mapped_column(String(200), primary_key=True)
    year: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    month: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    first_day: Mapped[dt.date] = mapped_column(Date)
    last_day: Mapped[dt.date] = mapped_column(Date)


class Meta(Base):
    """Small key/value facts: ``valid_thru`` (ISO date) and ``data_version`` (integer)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
