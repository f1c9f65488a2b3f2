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
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
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

    __table_args__ = (Index(None, "name_hour"),)


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


class Meta(Base):
    """Small key/value facts: ``valid_thru`` (ISO date) and ``data_version`` (integer)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
