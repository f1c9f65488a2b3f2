"""Monthly and yearly statistics from the download records; the data version.

Work to do is queued in ``stats_pending`` (category, package, year, month) by whoever changes
records or the packages table, in that same transaction. :func:`apply_pending` recomputes
exactly those package months, the years they belong to, and the category totals of those
months and years, then clears the queue, bumps the data version and advances ValidThru —
all inside the caller's transaction.

Counts: ``downloads`` = sum of record counts, ``ips`` = distinct ``ip_hash`` over the period
(a year's ``ips`` is distinct over the year, not a sum of months). Only packages present in
the packages table for that category count, only from the category's first year on, and a
row exists only where downloads > 0.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    SmallInteger,
    Table,
    and_,
    case,
    cast,
    delete,
    extract,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    tuple_,
)
from sqlalchemy.orm import Session

from ..categories import BY_PREFIX
from ..config import Settings
from . import db
from .models import CategoryStat, DownloadRecord, Package, PackageStat, StatsPending

log = logging.getLogger(__name__)

# Above this many packages in one (category, period), recompute the whole category period
# in one statement: the category total scans it anyway, and matching every row against a
# long list of names costs more than it saves. Few names: a late file, a packages change.
FULL_CATEGORY_AT = 20
_CHUNK = 500  # bind parameters per IN list


@dataclass
class RecomputeResult:
    """What :func:`apply_pending` did."""

    months: int = 0  # (category, year, month) periods recomputed, years not included
    years: int = 0
    valid_thru: dt.date | None = None
    data_version: int | None = None


def period(year: int, month: int) -> tuple[dt.date, dt.date]:
    """[first day, first day after) of a month, or of the year for month 0."""
    if month == 0:
        return dt.date(year, 1, 1), dt.date(year + 1, 1, 1)
    start = dt.date(year, month, 1)
    end = dt.date(year + (month == 12), month % 12 + 1, 1)
    return start, end


def insert_ignore(session: Session, table: Table, rows: list[dict]) -> None:
    """INSERT … ON CONFLICT DO NOTHING on PostgreSQL and SQLite."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = dialect_insert(table).on_conflict_do_nothing()
    for i in range(0, len(rows), 5000):
        session.execute(stmt, rows[i : i + 5000])


def queue(session: Session, keys: Iterable[tuple[str, str, int, int]]) -> int:
    """Queue (category, package, year, month) for recompute; returns how many were given."""
    rows = [{"category": c, "package": p, "year": y, "month": m} for c, p, y, m in set(keys)]
    insert_ignore(session, StatsPending.__table__, rows)
    return len(rows)


def _recompute_period(
    session: Session, year: int, month: int, cats: dict[str, set[str] | None]
) -> None:
    """Replace the package rows and the category totals of one period (month 0: the year)
    for several categories: all packages of a category (None) or only the names given.
    One statement serves every category that is recomputed whole."""
    r, p, ps, cs = DownloadRecord, Package, PackageStat, CategoryStat
    start, end = period(year, month)
    known = and_(p.package == r.package, p.category == r.category)

    def per_client(keys: list[Any], *where: Any) -> Any:
        # Downloads per (keys…, client) of the period: distinct clients are then rows, counted
        # by a hash aggregate (COUNT(DISTINCT …) would sort every record of the period).
        return (
            select(*keys, r.ip_hash, func.sum(r.downloads).label("n"))
            .join(p, known)
            .where(r.day >= start, r.day < end, *where)
            .group_by(*keys, r.ip_hash)
            .subquery()
        )

    def by_package(*where: Any) -> Any:
        # Grouped by the package's row id, named after: hashing (category, package) text
        # for every record made the aggregate about twice as slow.
        x = per_client([p.id.label("pid")], *where)
        counts = (
            select(x.c.pid, func.count().label("ips"), func.sum(x.c.n).label("n"))
            .group_by(x.c.pid)
            .subquery()
        )
        named = p.__table__.alias("named")
        return select(
            named.c.category, named.c.package, literal(year), literal(month), counts.c.ips,
            counts.c.n,
        ).join_from(counts, named, named.c.id == counts.c.pid)  # fmt: skip

    cols = ["category", "package", "year", "month", "ips", "downloads"]
    this = (ps.year == year, ps.month == month)
    whole = sorted(c for c, names in cats.items() if names is None)
    if whole:
        session.execute(delete(ps).where(*this, ps.category.in_(whole)))
        session.execute(insert(ps).from_select(cols, by_package(r.category.in_(whole))))
    for cat, packages in sorted(cats.items()):
        if packages is None:
            continue
        names = sorted(packages)
        for i in range(0, len(names), _CHUNK):
            chunk = names[i : i + _CHUNK]
            session.execute(delete(ps).where(*this, ps.category == cat, ps.package.in_(chunk)))
            session.execute(
                insert(ps).from_select(cols, by_package(r.category == cat, r.package.in_(chunk)))
            )
    # A category total is distinct over all its known packages: never a sum of packages.
    x = per_client([r.category], r.category.in_(sorted(cats)))
    totals = session.execute(
        select(x.c.category, func.count(), func.sum(x.c.n)).group_by(x.c.category)
    ).all()
    session.execute(
        delete(cs).where(cs.year == year, cs.month == month, cs.category.in_(sorted(cats)))
    )
    rows = [
        {"category": c, "year": year, "month": month, "ips": ips, "downloads": int(n)}
        for c, ips, n in totals
        if n
    ]
    if rows:
        session.execute(insert(cs), rows)


def _recompute_year(session: Session, year: int, months: list[int], cats: list[str]) -> None:
    """PostgreSQL: replace the package rows and category totals of a year and of the given
    months of it, for whole categories, from ONE pass over the year's records: grouping sets
    count the clients per (package or category) and (month or year) together."""
    r, p, ps, cs = DownloadRecord, Package, PackageStat, CategoryStat
    start, end = period(year, 0)
    day_month = cast(extract("month", r.day), SmallInteger)
    # Months not recomputed share one group (-1), dropped below: they cost no extra memory.
    month = case((day_month.in_(months), day_month), else_=-1) if months else literal(-1)
    # Grouped by integers, not names: the package's row id and a category number. Hashing
    # and comparing (category, package) text made the aggregate twice as slow.
    cat_no = case({c: i for i, c in enumerate(cats)}, value=p.category)
    per_client = (
        select(
            p.id.label("pid"),
            cat_no.label("cat"),
            r.ip_hash,
            month.label("month"),
            func.sum(r.downloads).label("n"),
        )
        .join(p, and_(p.package == r.package, p.category == r.category))
        .where(r.day >= start, r.day < end, r.category.in_(cats))
        .group_by(
            func.grouping_sets(
                tuple_(p.id, r.ip_hash, month),
                tuple_(p.id, r.ip_hash),
                tuple_(cat_no, r.ip_hash, month),
                tuple_(cat_no, r.ip_hash),
            )
        )
        .subquery()
    )
    x = per_client.c
    # pid NULL: a category total; month NULL: the year (records have neither NULL).
    rows = session.execute(
        select(x.pid, x.cat, x.month, func.count(), func.sum(x.n))
        .where(or_(x.month.is_(None), x.month != -1))
        .group_by(x.pid, x.cat, x.month)
    ).all()
    names = {
        pid: (cat, pkg)
        for pid, cat, pkg in session.execute(
            select(p.id, p.category, p.package).where(p.category.in_(cats))
        )
    }
    periods = [*months, 0]
    session.execute(delete(ps).where(ps.year == year, ps.month.in_(periods), ps.category.in_(cats)))
    session.execute(delete(cs).where(cs.year == year, cs.month.in_(periods), cs.category.in_(cats)))
    pkg_rows, cat_rows = [], []
    for pid, cat, m, ips, n in rows:
        if not n:
            continue
        row = {"year": year, "month": m or 0, "ips": ips, "downloads": int(n)}
        if pid is None:
            cat_rows.append({**row, "category": cats[cat]})
        else:
            category, package = names[pid]
            pkg_rows.append({**row, "category": category, "package": package})
    if pkg_rows:
        session.execute(insert(ps), pkg_rows)
    if cat_rows:
        session.execute(insert(cs), cat_rows)


def _one_pass_pays(year: int, months: list[int], valid_thru: dt.date | None) -> bool:
    """Whether one pass over the year beats a pass over the year plus one per month: when
    the touched months hold at least half of the year's months that have data (early in
    the year, or a backlog). Measured: 1.1-1.3 s instead of 1.6-1.8 s for the day of bench-etl;
    about even, within the noise, for a month of a 24-million-record year."""
    newest = max(months, default=0)
    if valid_thru is not None and valid_thru.year >= year:
        newest = max(newest, 12 if valid_thru.year > year else valid_thru.month)
    return 2 * len(months) >= newest


def apply_pending(session: Session) -> RecomputeResult:
    """Recompute everything queued in ``stats_pending`` and clear the queue; bump the data
    version and advance ValidThru. Runs in the caller's transaction."""
    res = RecomputeResult()
    rows = session.execute(
        select(StatsPending.category, StatsPending.package, StatsPending.year, StatsPending.month)
    ).all()
    if rows:
        touched: dict[tuple[int, int], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for cat, pkg, year, month in rows:
            cat_def = BY_PREFIX.get(cat)
            if cat_def is None or year < cat_def.first_year or not 1 <= month <= 12:
                continue  # nothing before the first year is counted, nor reported
            touched[(year, month)][cat].add(pkg)
            touched[(year, 0)][cat].add(pkg)
        t0 = time.monotonic()
        if session.get_bind().dialect.name == "postgresql":
            # Fresh rows have no planner statistics yet (autovacuum runs later): without them
            # PostgreSQL may pick a nested loop over the whole month. ANALYZE samples a fixed
            # number of rows, so it costs the same on any table size.
            session.execute(text("ANALYZE download_records, packages"))
        postgresql = session.get_bind().dialect.name == "postgresql"
        valid_thru = db.get_valid_thru(session)
        for (year, month), cats in sorted(touched.items()):
            work = {c: None if len(n) > FULL_CATEGORY_AT else n for c, n in cats.items()}
            year_cats = touched[(year, 0)]
            if (
                postgresql
                and all(len(n) > FULL_CATEGORY_AT for n in year_cats.values())
                and _one_pass_pays(year, [m for y, m in touched if y == year and m], valid_thru)
            ):
                if month == 0:  # the year and its months at once, when the year comes
                    months = sorted(m for y, m in touched if y == year and m)
                    _recompute_year(session, year, months, sorted(year_cats))
            else:
                _recompute_period(session, year, month, work)
            if month:
                res.months += len(cats)
            else:
                res.years += len(cats)
        session.execute(delete(StatsPending))
        res.data_version = db.bump_data_version(session)
        log.debug(
            "recomputed %d months and %d years in %.1fs",
            res.months,
            res.years,
            time.monotonic() - t0,
        )
    before = db.get_valid_thru(session)
    q = select(func.max(DownloadRecord.day))
    if before is not None:  # only newer records matter (a short range scan, not the table)
        q = q.where(DownloadRecord.day > before)
    newest = session.scalar(q)
    if newest is not None:
        if isinstance(newest, str):  # SQLite through a bare aggregate
            newest = dt.date.fromisoformat(newest)
        res.valid_thru = db.advance_valid_thru(session, newest)
        if res.valid_thru != before and res.data_version is None:
            res.data_version = db.bump_data_version(session)
    else:
        res.valid_thru = before
    return res


def months_of_packages(
    session: Session, pairs: Iterable[tuple[str, str]]
) -> list[tuple[str, str, int, int]]:
    """Every (category, package, year, month) from the first to the last record of each pair."""
    r = DownloadRecord
    out: list[tuple[str, str, int, int]] = []
    by_cat: dict[str, list[str]] = defaultdict(list)
    for cat, pkg in set(pairs):
        by_cat[cat].append(pkg)
    for cat, names in by_cat.items():
        names.sort()
        for i in range(0, len(names), _CHUNK):
            chunk = names[i : i + _CHUNK]
            for pkg, lo, hi in session.execute(
                select(r.package, func.min(r.day), func.max(r.day))
                .where(r.category == cat, r.package.in_(chunk))
                .group_by(r.package)
            ):
                lo = dt.date.fromisoformat(lo) if isinstance(lo, str) else lo
                hi = dt.date.fromisoformat(hi) if isinstance(hi, str) else hi
                y, m = lo.year, lo.month
                while (y, m) <= (hi.year, hi.month):
                    out.append((cat, pkg, y, m))
                    y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def recompute_packages(session: Session, packages: Iterable[tuple[str, str]]) -> None:
    """Recompute every month and year of the given (category, package) pairs, and the
    category totals of those months and years (a packages-table change). Runs in the
    caller's transaction; always bumps the data version (the pages show the releases, and
    the category files list the packages of the table)."""
    pairs = set(packages)
    if not pairs:
        return
    # A package with no records (or no longer known) must not keep rows either.
    ps = PackageStat
    by_cat: dict[str, list[str]] = defaultdict(list)
    for cat, pkg in pairs:
        by_cat[cat].append(pkg)
    for cat, names in by_cat.items():  # in chunks: a seed touches thousands of packages
        names.sort()
        for i in range(0, len(names), _CHUNK):
            chunk = names[i : i + _CHUNK]
            session.execute(delete(ps).where(ps.category == cat, ps.package.in_(chunk)))
    queue(session, months_of_packages(session, pairs))
    if apply_pending(session).data_version is None:
        db.bump_data_version(session)


def rebuild(settings: Settings) -> str:
    """Recompute all statistics from the stored records (one transaction)."""
    t0 = time.monotonic()
    with db.session_factory(settings.database_url).begin() as session:
        session.execute(delete(PackageStat))
        session.execute(delete(CategoryStat))
        pairs = session.execute(
            select(DownloadRecord.category, DownloadRecord.package).distinct()
        ).all()
        queue(session, months_of_packages(session, [(c, p) for c, p in pairs]))
        res = apply_pending(session)
        if res.data_version is None:
            res.data_version = db.bump_data_version(session)
    line = (
        f"stats rebuild: {res.months} months and {res.years} years recomputed, "
        f"ValidThru {res.valid_thru or '-'}, data version {res.data_version}, "
        f"{time.monotonic() - t0:.1f}s"
    )
    return line
