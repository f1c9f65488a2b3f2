"""Monthly and yearly statistics from the download records; the data version.

Counts: ``downloads`` = sum of record counts, ``ips`` = distinct ``ip_hash`` over the period
(a year's ``ips`` is distinct over the year, not a sum of months). Only packages present in
the packages table for that category count, only from the category's first year on, a
category total is distinct over the category's known packages, and a row exists only where
downloads > 0.

How they are kept (docs/ETL.md, "Incremental statistics"). The seen-sets hold, per year, every
(known package, client) — ``stats_seen`` — and every (category, client) —
``stats_seen_category`` — with the months the client was seen in, as bits. New records are
counted by adding their clients to the sets: a client the set did not hold for that month
(that year) adds one to the month's (the year's) distinct IPs; downloads are sums. The cost
follows the new records, not the year. A set cannot forget a client (it does not know whether
the client has other records), so whatever removes or replaces records has those packages'
years recounted from the records, sets included; a packages row added later is counted from
its records (found through ``record_months``, not by reading every record).

The contract for whoever writes download records (the log ETL, the legacy import, …):

1. In the transaction that stores an object's (a unit's) records: call
   :func:`lock_for_records` first, then write its ledger row (``ingested_objects``) and its
   records. Leave ``counted_at`` NULL: a ledger row whose ``counted_at`` differs from its
   ``ingested_at`` is not counted yet, and :func:`apply_pending` counts its records — once.
2. When records are replaced or removed (a re-ingest): same lock, give the ledger row a new
   ``ingested_at``, and :func:`queue` the (category, package, year, month) of the old and of
   the new records in that transaction: those packages' years are recounted from the records.
3. Later, in one transaction: :func:`apply_pending`. It counts what is not counted yet,
   recounts what is queued, marks the ledger rows counted, clears the queue, bumps the data
   version and advances ValidThru: all of it or, if the process dies first, none of it (the
   next call does it).

Packages-table changes: :func:`recompute_packages` in the transaction of the change.

Every data version this module writes is also stored as ``meta.seen_version``: a data version
that moved past it was written by something that does not keep the seen-sets (the release
before them, after a rollback), and the years of the records it stored are recounted from the
records.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, bindparam, delete, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ..categories import CATEGORIES
from ..config import Settings
from . import db
from .models import (
    CategoryStat,
    DownloadRecord,
    IngestedObject,
    Package,
    PackageStat,
    RecordMonth,
    SeenPackage,
    StatsPending,
)

log = logging.getLogger(__name__)

SEEN_VERSION = "seen_version"  # meta: the data version the seen-sets agree with
# pg_advisory_xact_lock key: record writers share it, counting takes it alone, so no object
# commits while apply_pending decides what is new.
LOCK_KEY = 0x5EE7_5E75
FIRST_YEAR = {c.prefix: c.first_year for c in CATEGORIES}
_CHUNK = 500  # bind parameters per IN list
# A year whose new downloads outnumber its counted ones (and this many) is recounted whole
# from the records rather than incremented: a bulk load (history import, backlog, a year's
# first day) is read once in order instead of probing the sets key by key.
BULK_MIN = 1_000_000


@dataclass
class RecomputeResult:
    """What :func:`apply_pending` did."""

    months: int = 0  # (category, year, month) periods whose statistics changed
    years: int = 0  # (category, year) whose year figures changed
    valid_thru: dt.date | None = None
    data_version: int | None = None


def period(year: int, month: int) -> tuple[dt.date, dt.date]:
    """[first day, first day after) of a month, or of the year for month 0."""
    if month == 0:
        return dt.date(year, 1, 1), dt.date(year + 1, 1, 1)
    start = dt.date(year, month, 1)
    end = dt.date(year + (month == 12), month % 12 + 1, 1)
    return start, end


def _dialect_insert(session: Session) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert


def insert_ignore(session: Session, table: Table, rows: list[dict]) -> None:
    """INSERT … ON CONFLICT DO NOTHING on PostgreSQL and SQLite."""
    if not rows:
        return
    stmt = _dialect_insert(session)(table).on_conflict_do_nothing()
    for i in range(0, len(rows), 5000):
        session.execute(stmt, rows[i : i + 5000])


def queue(session: Session, keys: Iterable[tuple[str, str, int, int]]) -> int:
    """Queue (category, package, year, month) to be recounted from the records (records
    replaced or removed); returns how many were given."""
    rows = [{"category": c, "package": p, "year": y, "month": m} for c, p, y, m in set(keys)]
    insert_ignore(session, StatsPending.__table__, rows)
    return len(rows)


def queue_object(session: Session, object_id: int) -> None:
    """Queue the (category, package, year, month) of one ingested object's records, in the
    database (a hostile object's months need not fit in this process's memory)."""
    pg = _pg(session)
    session.execute(
        text(
            "INSERT INTO stats_pending (category, package, year, month) "
            f"SELECT DISTINCT r.category, r.package, {_year(pg)}, {_month(pg)} "
            "FROM download_records r WHERE r.object_id = :id ON CONFLICT DO NOTHING"
        ),
        {"id": object_id},
    )


def lock_for_records(session: Session) -> None:
    """First statement of a transaction that stores or removes download records (see the
    module docstring): such transactions run side by side, never during a count."""
    if _pg(session):
        session.execute(text("SELECT pg_advisory_xact_lock_shared(:k)"), {"k": LOCK_KEY})


def _lock_counting(session: Session) -> None:
    # SQLite: one writer at a time anyway, and a transaction reads one snapshot.
    if _pg(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
        # These statements are short or one-off: compiling them costs more than it saves.
        session.execute(text("SET LOCAL jit = off"))
        # A day's new records (about a million) aggregate in memory instead of spilling to
        # disk in batches.
        session.execute(text("SET LOCAL work_mem = '64MB'"))


def _bump(session: Session) -> int:
    version = db.bump_data_version(session)
    db.set_meta(session, SEEN_VERSION, str(version))
    return version


# --- SQL that differs between PostgreSQL and SQLite --------------------------------------------


def _pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _analyze(session: Session) -> None:
    """ANALYZE of records, packages and seen-sets (PostgreSQL), as the schema owner: the
    ETL's login does not own the tables (revision 0006's ``webstats_analyze``)."""
    session.execute(text("SELECT webstats_analyze()"))


def _year(pg: bool, col: str = "r.day") -> str:
    return f"extract(year FROM {col})::int" if pg else f"CAST(strftime('%Y', {col}) AS INTEGER)"


def _month(pg: bool, col: str = "r.day") -> str:
    return f"extract(month FROM {col})::int" if pg else f"CAST(strftime('%m', {col}) AS INTEGER)"


def _bit_or(pg: bool, expr: str) -> str:
    if pg:
        return f"bit_or({expr})"
    # SQLite has no bit_or: the OR of 12 month bits is the sum of each bit's max.
    return " + ".join(f"max(({expr}) & {1 << i})" for i in range(12))


def _order(pg: bool, cols: str) -> str:
    # PostgreSQL: keys in index order touch each B-tree page once (4x fewer page reads and
    # writes for a day of new clients than in hash order). SQLite: tiny data, and an ORDER BY
    # before ON CONFLICT reads as ambiguous there.
    return f" ORDER BY {cols}" if pg else ""


def _month_counts() -> str:
    """count(*) and, per month, the number of rows with that month's bit."""
    parts = [f"count(*) FILTER (WHERE (months & {1 << (m - 1)}) <> 0)" for m in range(1, 13)]
    return ", ".join(["count(*)", *parts])


def _counted_rule(params: dict[str, Any], col: str = "r") -> str:
    """SQL: the record (alias ``col``) is on or after its category's first year."""
    ors = []
    for i, (cat, year) in enumerate(sorted(FIRST_YEAR.items())):
        params[f"fc{i}"], params[f"fd{i}"] = cat, dt.date(year, 1, 1)
        ors.append(f"({col}.category = :fc{i} AND {col}.day >= :fd{i})")
    return "(" + " OR ".join(ors) + ")"


def _counted_categories(year: int) -> list[str]:
    return sorted(c for c, first in FIRST_YEAR.items() if year >= first)


def _expanding(sql: str, *names: str) -> Any:
    return text(sql).bindparams(*(bindparam(n, expanding=True) for n in names))


# --- the seen-sets: add one month's clients ----------------------------------------------------

_TARGETS = {  # table: (insert columns, conflict key, group column returned)
    "stats_seen": (
        "(ip_hash, package_id, year, months)", "(year, package_id, ip_hash)", "package_id"
    ),
    "stats_seen_category": (
        "(ip_hash, year, months, category)", "(year, category, ip_hash)", "category"
    ),
}  # fmt: skip


def _add_month(
    session: Session, table: str, source: str, params: dict[str, Any], bit: int, *expanding: str
) -> dict[Any, tuple[int, int]]:
    """Add clients to a seen-set for ONE month (``bit``); ``source`` selects the insert
    columns with ``:bit`` as months, each key once. Returns per package id / category: (clients
    new to the month, clients new to the year).

    One month per statement, so RETURNING tells both: a returned row is a client new to the
    month (the update only happens without the bit); it is new to the year when the bit is all
    its row holds (an inserted row: an updated one held another month before)."""
    cols, key, group = _TARGETS[table]
    upsert = (
        f"INSERT INTO {table} {cols} {source} ON CONFLICT {key} DO UPDATE "
        f"SET months = {table}.months | excluded.months "
        f"WHERE ({table}.months & excluded.months) = 0 RETURNING {group}, months"
    )
    params = {**params, "bit": bit}
    if _pg(session):
        sql = (
            f"WITH up AS ({upsert}) SELECT {group}, count(*), "
            f"count(*) FILTER (WHERE months = :bit) FROM up GROUP BY {group}"
        )
        return {g: (m, y) for g, m, y in session.execute(_expanding(sql, *expanding), params)}
    out: dict[Any, list[int]] = defaultdict(lambda: [0, 0])
    for g, months in session.execute(_expanding(upsert, *expanding), params):
        out[g][0] += 1
        out[g][1] += months == bit
    return {g: (m, y) for g, (m, y) in out.items()}


def _add_stats(session: Session, model: type, rows: list[dict]) -> None:
    """Add ips and downloads to statistics rows (insert the rows that do not exist yet)."""
    if not rows:
        return
    table = model.__table__
    stmt = _dialect_insert(session)(table)
    keys = [c.name for c in table.primary_key.columns]
    stmt = stmt.on_conflict_do_update(
        index_elements=keys,
        set_={
            "ips": table.c.ips + stmt.excluded.ips,
            "downloads": table.c.downloads + stmt.excluded.downloads,
        },
    )
    for i in range(0, len(rows), 5000):
        session.execute(stmt, rows[i : i + 5000])


# --- what to do ---------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What one :func:`apply_pending` does, decided before anything is written."""

    objects: list[tuple[int, dt.datetime, dt.datetime | None]]  # not counted: id, hour, counted_at
    packages: dict[int, tuple[str, str]]  # packages rows: id -> (category, package)
    new: dict[int, tuple[str, str]]  # packages rows the seen-sets do not hold
    gone: dict[int, tuple[str, str]]  # rows the seen-sets hold that are gone from packages
    queued: bool = False  # stats_pending had rows
    full_years: set[int] = field(default_factory=set)  # recount every package and category
    recount: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))  # year: ids
    merge: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))  # year: ids
    gone_years: dict[int, set[int]] = field(default_factory=dict)
    years: set[int] = field(default_factory=set)  # years of the new records
    newest: Any = None  # the latest day of the new records
    oldest: Any = None  # no later than the earliest day of the new records
    categories: set[tuple[str, int]] = field(default_factory=set)  # (category, year) recounted
    periods: set[tuple[str, int, int]] = field(default_factory=set)  # changed, for the result

    @property
    def anything(self) -> bool:
        return bool(self.objects or self.new or self.gone or self.queued)


# The records of the ledger rows not counted yet. The id range lets the BRIN index on object_id
# find them (new objects have the newest ids).
_NEW_FROM = "download_records r JOIN ingested_objects o ON o.id = r.object_id"
_NEW_WHERE = (
    "r.object_id BETWEEN :lo AND :hi AND (o.counted_at IS NULL OR o.counted_at <> o.ingested_at)"
)


@contextlib.contextmanager
def _hashed(session: Session, pg: bool) -> Iterator[None]:
    """Statements over the new records: hash joins and hash aggregates, whatever the estimate.
    Fresh records have no planner statistics yet; PostgreSQL, estimating one row, looped
    over packages for each of a million records (a minute) or sorted them on disk (7 s)."""
    if not pg:
        yield
        return
    names = ("enable_nestloop", "enable_mergejoin", "enable_sort")
    for name in names:
        session.execute(text(f"SET LOCAL {name} = off"))
    yield
    for name in names:
        session.execute(text(f"SET LOCAL {name} = on"))


def _object_range(plan: _Plan) -> dict[str, int]:
    ids = [i for i, _, _ in plan.objects]
    return {"lo": min(ids), "hi": max(ids)}


def _widen_record_months(session: Session, pg: bool, plan: _Plan) -> None:
    """record_months from the records not counted yet (known packages or not). Also sets the
    plan's years, oldest and newest day of the new records (from the widened ranges: no later
    than the oldest, and the newest — ranges only widen up to days counted before, which
    ValidThru holds already)."""
    least, greatest = ("least", "greatest") if pg else ("min", "max")
    upsert = (
        "INSERT INTO record_months (category, package, year, month, first_day, last_day) "
        f"SELECT r.category, r.package, {_year(pg)}, {_month(pg)}, min(r.day), max(r.day) "
        "FROM (SELECT DISTINCT r.category, r.package, r.day "
        f"FROM {_NEW_FROM} WHERE {_NEW_WHERE}) r "
        "GROUP BY 1, 2, 3, 4 "
        "ON CONFLICT (category, package, year, month) DO UPDATE SET "
        f"first_day = {least}(record_months.first_day, excluded.first_day), "
        f"last_day = {greatest}(record_months.last_day, excluded.last_day) "
        "RETURNING year, first_day, last_day"
    )
    # One row per year back, not per package-month (a hostile day of a million unknown
    # names made a million rows, 600 MB here); SQLite has no INSERT in a WITH: its rows are
    # folded as they come.
    if pg:
        upsert = (
            f"WITH up AS ({upsert}) SELECT year, min(first_day), max(last_day) FROM up GROUP BY 1"
        )
    years: dict[int, tuple[dt.date, dt.date]] = {}
    with _hashed(session, pg):
        for y, a, b in session.execute(text(upsert), _object_range(plan)):
            a, b = _date(a), _date(b)
            lo, hi = years.get(y, (a, b))
            years[y] = (min(lo, a), max(hi, b))
    plan.years = set(years)
    plan.oldest = min((a for a, _ in years.values()), default=None)
    plan.newest = max((b for _, b in years.values()), default=None)


def _record_years(
    session: Session, pairs: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], dict[int, tuple[dt.date, dt.date]]]:
    """(category, package) -> {year: (first day, last day)} of its records, from record_months."""
    rm = RecordMonth
    out: dict[tuple[str, str], dict[int, tuple[dt.date, dt.date]]] = defaultdict(dict)
    by_cat: dict[str, list[str]] = defaultdict(list)
    for cat, pkg in set(pairs):
        by_cat[cat].append(pkg)
    for cat, names in sorted(by_cat.items()):
        names.sort()
        for i in range(0, len(names), _CHUNK):
            q = (
                select(rm.package, rm.year, func.min(rm.first_day), func.max(rm.last_day))
                .where(rm.category == cat, rm.package.in_(names[i : i + _CHUNK]))
                .group_by(rm.package, rm.year)
            )
            for pkg, year, lo, hi in session.execute(q):
                out[(cat, pkg)][year] = (_date(lo), _date(hi))
    return out


def _date(value: Any) -> dt.date:
    return dt.date.fromisoformat(value) if isinstance(value, str) else value


def _through(newest: Any, bound: dt.date | None = None) -> dt.date:
    """ValidThru for records up to ``newest``: never a day that is not over yet (``bound``:
    the last complete day when the caller's run began, if it began earlier)."""
    return min(_date(newest), bound or db.last_complete_day())


def _plan(session: Session, pg: bool) -> _Plan:
    io = IngestedObject
    objects = [
        (i, h, c)
        for i, h, c in session.execute(
            select(io.id, io.name_hour, io.counted_at).where(
                text("counted_at IS NULL OR counted_at <> ingested_at")
            )
        )
    ]
    packages = {i: (c, p) for i, c, p in session.execute(select(Package.id, Package.category,
                                                                 Package.package))}  # fmt: skip
    sp = SeenPackage
    tracked = {
        i: (c, p) for i, c, p in session.execute(select(sp.package_id, sp.category, sp.package))
    }
    plan = _Plan(
        objects=objects,
        packages=packages,
        new={i: v for i, v in packages.items() if tracked.get(i) != v},
        gone={i: v for i, v in tracked.items() if packages.get(i) != v},
    )
    queued = session.execute(
        select(StatsPending.category, StatsPending.package, StatsPending.year).distinct()
    ).all()
    plan.queued = bool(queued)
    if objects:
        _widen_record_months(session, pg, plan)
    foreign = db.get_meta(session, SEEN_VERSION) != str(db.get_data_version(session))
    if foreign and objects:
        # Something that does not keep the seen-sets changed the statistics (the release
        # before them): the statistics may hold these records already. Recount their years.
        years = set(plan.years)
        for _, hour, counted_at in objects:
            if counted_at is not None:  # replaced: its old records were within 48 h of the hour
                early, late = hour - dt.timedelta(hours=48), hour + dt.timedelta(hours=49)
                years |= {early.year, late.year}
        plan.full_years = {y for y in years if y >= min(FIRST_YEAR.values())}
        log.warning(
            "statistics were changed by a release that does not keep the seen-sets "
            "(data version %s, seen-sets at %s): recounting %s from the records",
            db.get_data_version(session),
            db.get_meta(session, SEEN_VERSION),
            ", ".join(map(str, sorted(plan.full_years))) or "nothing",
        )
    elif objects:
        plan.full_years = _bulk_years(session, objects)
    for y in plan.full_years:
        plan.categories |= {(c, y) for c in _counted_categories(y)}
    by_name = {v: i for i, v in packages.items()}
    for cat, pkg, year in queued:
        pid = by_name.get((cat, pkg))
        if pid is None or year < FIRST_YEAR.get(cat, 10_000) or year in plan.full_years:
            continue  # unknown: nothing counted; before the first year: nothing counted
        plan.recount[year].add(pid)
        plan.categories.add((cat, year))
    years = _record_years(session, [*plan.new.values(), *plan.gone.values()])
    for pid, (cat, pkg) in plan.gone.items():
        plan.gone_years[pid] = set(years.get((cat, pkg), {}))
        plan.categories |= {(cat, y) for y in plan.gone_years[pid] if y >= FIRST_YEAR[cat]}
    for pid, (cat, pkg) in plan.new.items():
        for y in years.get((cat, pkg), {}):
            if y < FIRST_YEAR[cat] or y in plan.full_years:
                continue
            plan.recount[y].add(pid)
            if foreign:  # the category totals may hold it already
                plan.categories.add((cat, y))
            else:
                plan.merge[y].add(pid)
    for y, pids in plan.merge.items():
        pids -= {i for i in pids if (packages[i][0], y) in plan.categories}
    return plan


def _bulk_years(session: Session, objects: list[tuple[int, dt.datetime, Any]]) -> set[int]:
    """Years where the new downloads (the ledger's counts, by the year of the object's hour)
    exceed both BULK_MIN and the year's counted downloads."""
    ids = [i for i, _, _ in objects]
    io = IngestedObject
    new: dict[int, int] = defaultdict(int)
    for i in range(0, len(ids), _CHUNK):
        for hour, n in session.execute(
            select(io.name_hour, io.accepted).where(io.id.in_(ids[i : i + _CHUNK]))
        ):
            new[hour.year] += n or 0
    big = {y for y, n in new.items() if n > BULK_MIN}
    if not big:
        return set()
    cs = CategoryStat
    have = dict(
        session.execute(
            select(cs.year, func.sum(cs.downloads))
            .where(cs.month == 0, cs.year.in_(sorted(big)))
            .group_by(cs.year)
        ).all()
    )
    return {y for y in big if new[y] > (have.get(y) or 0) and y >= min(FIRST_YEAR.values())}


# --- doing it -----------------------------------------------------------------------------------


def apply_pending(session: Session, through: dt.date | None = None) -> RecomputeResult:
    """Count the records not counted yet, recount what is queued and what a packages-table
    change needs, clear the queue, bump the data version, advance ValidThru (to ``through``
    at most: the last day the caller's run listed). Runs in the caller's transaction (see the
    module docstring)."""
    _lock_counting(session)
    pg = _pg(session)
    res = RecomputeResult()
    t0 = time.monotonic()
    plan = _plan(session, pg)
    if plan.anything:
        if pg and (plan.full_years or plan.recount or plan.categories):
            # Fresh records have no planner statistics yet; ANALYZE samples a fixed number of
            # rows. The daily increment does not need it (it reads by object id).
            _analyze(session)
        _take_out_gone(session, plan)
        for year in sorted(plan.full_years):
            _recount_packages(session, pg, plan, year, None)
        for year, pids in sorted(plan.recount.items()):
            if year not in plan.full_years:
                _recount_packages(session, pg, plan, year, pids)
        if plan.objects and not plan.years <= plan.full_years:
            _count_new(session, pg, plan)
        for year, pids in sorted(plan.merge.items()):
            if pids:
                _merge_into_categories(session, pg, plan, year, pids)
        for cat, year in sorted(plan.categories):
            _recount_category(session, pg, plan, cat, year)
        _finish(session, plan)
        res.months = sum(m != 0 for _, _, m in plan.periods)
        res.years = len({(c, y) for c, y, _ in plan.periods})
        res.data_version = _bump(session)
        log.debug(
            "counted %d objects, recounted %d package-years, %d new and %d gone packages, "
            "%d months changed, in %.1fs",
            len(plan.objects),
            sum(map(len, plan.recount.values())),
            len(plan.new),
            len(plan.gone),
            res.months,
            time.monotonic() - t0,
        )
    before = db.get_valid_thru(session)
    if plan.objects:  # records come with their ledger row: the new ones are all there is
        newest = plan.newest
    elif not plan.queued:
        # Nothing stored since the last count, which advanced ValidThru in its transaction:
        # no record can be newer. (A scan here cost 0.8 s after a bulk load: fresh BRIN
        # ranges are not summarized yet.)
        newest = None
    else:  # months queued by a release before 0005, which advanced ValidThru when it counted
        q = select(func.max(DownloadRecord.day))
        if before is not None:  # only newer records matter (a short range scan)
            q = q.where(DownloadRecord.day > before)
        newest = session.scalar(q)
    if newest is not None:
        res.valid_thru = db.advance_valid_thru(session, _through(newest, through))
        if res.valid_thru != before and res.data_version is None:
            res.data_version = _bump(session)
    else:
        res.valid_thru = before
    return res


def _finish(session: Session, plan: _Plan) -> None:
    """The ledger rows counted, the seen-sets' packages in line with the table, queue empty."""
    ids = sorted(i for i, _, _ in plan.objects)
    for i in range(0, len(ids), _CHUNK):
        session.execute(
            _expanding("UPDATE ingested_objects SET counted_at = ingested_at WHERE id IN :ids",
                       "ids"),
            {"ids": ids[i : i + _CHUNK]},
        )  # fmt: skip

    sp = SeenPackage
    gone = sorted(plan.gone)
    for i in range(0, len(gone), _CHUNK):
        session.execute(delete(sp).where(sp.package_id.in_(gone[i : i + _CHUNK])))
    rows = [{"package_id": i, "category": c, "package": p} for i, (c, p) in plan.new.items()]
    for i in range(0, len(rows), 5000):
        session.execute(sp.__table__.insert(), rows[i : i + 5000])
    session.execute(delete(StatsPending))


def _take_out_gone(session: Session, plan: _Plan) -> None:
    """Packages rows removed (or changed) since the seen-sets took them: their clients leave
    the sets, their statistics go; their categories' years are recounted (planned)."""
    ps = PackageStat
    known = set(plan.packages.values())
    for pid, (cat, pkg) in sorted(plan.gone.items()):
        for year in sorted(plan.gone_years[pid]):
            session.execute(
                text("DELETE FROM stats_seen WHERE year = :y AND package_id = :p"),
                {"y": year, "p": pid},
            )
        if (cat, pkg) not in known:  # else a new row of that name is recounted
            session.execute(delete(ps).where(ps.category == cat, ps.package == pkg))


def _recount_packages(
    session: Session,
    pg: bool,
    plan: _Plan,
    year: int,
    pids: set[int] | None,
    known: dict[int, dict[int, int]] | None = None,
) -> None:
    """Seen-set rows and statistics of a year's packages (all: None) from the records;
    ``known``: their downloads per month if already summed (the rebuild)."""
    cats = _counted_categories(year)
    params: dict[str, Any] = {"y": year, "cats": cats}
    where = "p.category IN :cats"
    expanding = ["cats"]
    if pids is None:
        lo, hi = period(year, 0)
        hi -= dt.timedelta(days=1)
        session.execute(text("DELETE FROM stats_seen WHERE year = :y"), params)
        session.execute(delete(PackageStat).where(PackageStat.year == year))
    else:
        names = {plan.packages[i] for i in pids}
        ranges = [r[year] for r in _record_years(session, names).values() if year in r]
        lo = min((a for a, _ in ranges), default=None)
        hi = max((b for _, b in ranges), default=None)
        ps = PackageStat
        ids = sorted(pids)
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            session.execute(
                _expanding("DELETE FROM stats_seen WHERE year = :y AND package_id IN :ids", "ids"),
                {"y": year, "ids": chunk},
            )
            by_cat: dict[str, list[str]] = defaultdict(list)
            for pid in chunk:
                by_cat[plan.packages[pid][0]].append(plan.packages[pid][1])
            for cat, pkgs in by_cat.items():
                session.execute(
                    delete(ps).where(ps.year == year, ps.category == cat, ps.package.in_(pkgs))
                )
        where += " AND p.id IN :ids"
        params["ids"] = ids
        expanding.append("ids")
    if lo is None:
        return  # no records that year
    params.update(lo=lo, hi=hi)
    src = (
        "FROM download_records r JOIN packages p "
        "ON p.package = r.package AND p.category = r.category "
        f"WHERE r.day >= :lo AND r.day <= :hi AND {where}"
    )
    grouped = (
        f"SELECT r.ip_hash, p.id, :y, {_bit_or(pg, f'1 << ({_month(pg)} - 1)')} {src} "
        f"GROUP BY p.id, r.ip_hash{_order(pg, 'p.id, r.ip_hash')}"
    )
    insert = "INSERT INTO stats_seen (ip_hash, package_id, year, months) "
    if pg:
        # PostgreSQL (before 17) runs no INSERT … SELECT in parallel, a CREATE TABLE AS it
        # does: grouped by two processes first, then inserted in the order grouped. A year of 5.5 M
        # records (bench-history): 4.6 + 3.3 s instead of 10.7 s.
        session.execute(text("DROP TABLE IF EXISTS stats_grouped"))
        session.execute(
            _expanding(f"CREATE TEMP TABLE stats_grouped AS {grouped}", *expanding), params
        )
        session.execute(text(f"{insert}SELECT * FROM stats_grouped"))
        session.execute(text("DROP TABLE stats_grouped"))
    else:
        session.execute(_expanding(insert + grouped, *expanding), params)
    seen_where = "year = :y" + (" AND package_id IN :ids" if pids is not None else "")
    ips = {
        pid: counts
        for pid, *counts in session.execute(
            _expanding(
                f"SELECT package_id, {_month_counts()} FROM stats_seen WHERE {seen_where} "
                "GROUP BY package_id",
                *(["ids"] if pids is not None else []),
            ),
            params,
        )
    }
    downloads: dict[int, dict[int, int]] = defaultdict(dict)
    if known is not None:
        downloads.update(known)
    else:
        for pid, month, n in session.execute(
            _expanding(f"SELECT p.id, {_month(pg)}, sum(r.downloads) {src} GROUP BY 1, 2",
                       *expanding),
            params,
        ):  # fmt: skip
            downloads[pid][month] = int(n)
    rows = []
    for pid, months in downloads.items():
        if pid not in ips:  # its category does not count that year
            continue
        cat, pkg = plan.packages[pid]
        counts = ips[pid]
        for month, n in [*months.items(), (0, sum(months.values()))]:
            rows.append(
                {"category": cat, "package": pkg, "year": year, "month": month,
                 "ips": counts[month], "downloads": n}
            )  # fmt: skip
            plan.periods.add((cat, year, month))
    for i in range(0, len(rows), 5000):
        session.execute(PackageStat.__table__.insert(), rows[i : i + 5000])


def _recount_category(session: Session, pg: bool, plan: _Plan, cat: str, year: int) -> None:
    """A category's seen-set and totals of a year from its packages' seen-sets and rows."""
    params = {"y": year, "c": cat}
    session.execute(
        text("DELETE FROM stats_seen_category WHERE year = :y AND category = :c"), params
    )
    if pg:  # sorted, then grouped: 11 s instead of 18 s hashed (bench-daily's bioc year)
        session.execute(text("SET LOCAL enable_hashagg = off"))
    session.execute(
        text(
            "INSERT INTO stats_seen_category (ip_hash, year, months, category) "
            f"SELECT s.ip_hash, :y, {_bit_or(pg, 's.months')}, :c FROM stats_seen s "
            "WHERE s.year = :y AND s.package_id IN (SELECT id FROM packages WHERE category = :c) "
            f"GROUP BY s.ip_hash{_order(pg, 's.ip_hash')}"
        ),
        params,
    )
    if pg:
        session.execute(text("SET LOCAL enable_hashagg = on"))
    counts = session.execute(
        text(
            f"SELECT {_month_counts()} FROM stats_seen_category WHERE year = :y AND category = :c"
        ),
        params,
    ).one()
    ps, cs = PackageStat, CategoryStat
    session.execute(delete(cs).where(cs.year == year, cs.category == cat))
    rows = []
    for month, n in session.execute(
        select(ps.month, func.sum(ps.downloads))
        .where(ps.year == year, ps.category == cat)
        .group_by(ps.month)
    ):
        if n:
            rows.append(
                {"category": cat, "year": year, "month": month, "ips": counts[month],
                 "downloads": int(n)}
            )  # fmt: skip
            plan.periods.add((cat, year, month))
    if rows:
        session.execute(cs.__table__.insert(), rows)


def _count_new(session: Session, pg: bool, plan: _Plan) -> None:
    """Add the records not counted yet to the seen-sets and the statistics (the daily run).
    Years and packages recounted from the records in this same call are left out."""
    session.execute(text("DROP TABLE IF EXISTS stats_new"))
    # One row per (package, month, client) of the new records: read once, used three times.
    session.execute(
        text(
            "CREATE TEMP TABLE stats_new (package_id INTEGER, category VARCHAR(16), "
            "year INTEGER, month INTEGER, ip_hash BIGINT, n BIGINT)"
        )
    )
    params: dict[str, Any] = {}
    rule = ""
    if plan.oldest is None or plan.oldest.year < max(FIRST_YEAR.values()):
        rule = f"AND {_counted_rule(params)} "  # (else every new record is in a counted year)
    # Years recounted whole are not read here at all (a history import's year: 12 s of 30).
    for n, year in enumerate(sorted(plan.full_years & plan.years)):
        lo, hi = period(year, 0)
        rule += f"AND NOT (r.day >= :full_lo{n} AND r.day < :full_hi{n}) "
        params.update({f"full_lo{n}": lo, f"full_hi{n}": hi})
    # Grouped by the month as one value (computed once per row), split into year and month
    # once per group.
    month = "date_trunc('month', r.day)" if pg else "substr(r.day, 1, 7)"
    year_of, month_of = (_year(pg, "x.m"), _month(pg, "x.m")) if pg else (
        "CAST(substr(x.m, 1, 4) AS INTEGER)", "CAST(substr(x.m, 6, 2) AS INTEGER)")  # fmt: skip
    with _hashed(session, pg):
        session.execute(
            text(
                "INSERT INTO stats_new (package_id, category, year, month, ip_hash, n) "
                f"SELECT x.package_id, x.category, {year_of}, {month_of}, x.ip_hash, x.n "
                f"FROM (SELECT p.id AS package_id, min(p.category) AS category, {month} AS m, "
                f"r.ip_hash, sum(r.downloads) AS n FROM {_NEW_FROM} JOIN packages p "
                f"ON p.package = r.package AND p.category = r.category WHERE {_NEW_WHERE} "
                f"{rule}GROUP BY p.id, 3, r.ip_hash) x"
            ),
            {**params, **_object_range(plan)},
        )
    for year, pids in sorted(plan.recount.items()):
        ids = sorted(pids)
        for i in range(0, len(ids), _CHUNK):
            session.execute(
                _expanding("DELETE FROM stats_new WHERE year = :y AND package_id IN :ids", "ids"),
                {"y": year, "ids": ids[i : i + _CHUNK]},
            )
    downloads: dict[tuple[int, int, int], int] = {
        (pid, y, m): int(n)
        for pid, y, m, n in session.execute(
            text("SELECT package_id, year, month, sum(n) FROM stats_new GROUP BY 1, 2, 3")
        )
    }
    pkg_new: dict[tuple[int, int, int], tuple[int, int]] = {}
    cat_new: dict[tuple[str, int, int], tuple[int, int]] = {}
    for year, month in sorted({(y, m) for _, y, m in downloads}):
        bit = 1 << (month - 1)
        p = {"y": year, "m": month}
        for pid, counts in _add_month(
            session,
            "stats_seen",
            "SELECT ip_hash, package_id, year, :bit FROM stats_new WHERE year = :y AND month = :m"
            + _order(pg, "package_id, ip_hash"),
            p,
            bit,
        ).items():
            pkg_new[(pid, year, month)] = counts
        cats = [c for c in _counted_categories(year) if (c, year) not in plan.categories]
        if not cats:
            continue
        for cat, counts in _add_month(
            session,
            "stats_seen_category",
            "SELECT ip_hash, year, :bit, category FROM stats_new WHERE year = :y AND month = :m "
            "AND category IN :cats GROUP BY category, ip_hash, year"
            + _order(pg, "category, ip_hash"),
            {**p, "cats": cats},
            bit,
            "cats",
        ).items():
            cat_new[(cat, year, month)] = counts
    session.execute(text("DROP TABLE stats_new"))
    pkg_rows: dict[tuple[str, str, int, int], list[int]] = defaultdict(lambda: [0, 0])
    cat_rows: dict[tuple[str, int, int], list[int]] = defaultdict(lambda: [0, 0])
    for (pid, year, month), n in downloads.items():
        cat, pkg = plan.packages[pid]
        month_new, year_new = pkg_new.get((pid, year, month), (0, 0))
        for key, ips in (((cat, pkg, year, month), month_new), ((cat, pkg, year, 0), year_new)):
            pkg_rows[key][0] += ips
            pkg_rows[key][1] += n
        plan.periods.add((cat, year, month))
        if (cat, year) not in plan.categories:  # else recounted whole below
            cat_rows[(cat, year, month)][1] += n
            cat_rows[(cat, year, 0)][1] += n
    for (cat, year, month), (month_new, year_new) in cat_new.items():
        cat_rows[(cat, year, month)][0] += month_new
        cat_rows[(cat, year, 0)][0] += year_new
    _add_stats(
        session,
        PackageStat,
        [{"category": c, "package": p, "year": y, "month": m, "ips": i, "downloads": n}
         for (c, p, y, m), (i, n) in pkg_rows.items()],
    )  # fmt: skip
    _add_stats(
        session,
        CategoryStat,
        [{"category": c, "year": y, "month": m, "ips": i, "downloads": n}
         for (c, y, m), (i, n) in cat_rows.items()],
    )  # fmt: skip


def _merge_into_categories(
    session: Session, pg: bool, plan: _Plan, year: int, pids: set[int]
) -> None:
    """Packages rows new to the seen-sets (counted by _recount_packages): their clients join
    their categories' sets, their downloads the category totals (a set only grows here)."""
    ids = sorted(pids)
    cat_rows: dict[tuple[str, int, int], list[int]] = defaultdict(lambda: [0, 0])
    for month in range(1, 13):
        bit = 1 << (month - 1)
        for cat, (month_new, year_new) in _add_month(
            session,
            "stats_seen_category",
            "SELECT s.ip_hash, :y, :bit, p.category FROM stats_seen s "
            "JOIN packages p ON p.id = s.package_id WHERE s.year = :y AND s.package_id IN :ids "
            "AND (s.months & :bit) <> 0 GROUP BY p.category, s.ip_hash"
            + _order(pg, "p.category, s.ip_hash"),
            {"y": year, "ids": ids},
            bit,
            "ids",
        ).items():
            cat_rows[(cat, year, month)][0] += month_new
            cat_rows[(cat, year, 0)][0] += year_new
    ps = PackageStat
    names: dict[str, list[str]] = defaultdict(list)
    for pid in ids:
        names[plan.packages[pid][0]].append(plan.packages[pid][1])
    for cat, pkgs in names.items():
        for month, n in session.execute(
            select(ps.month, func.sum(ps.downloads))
            .where(ps.year == year, ps.category == cat, ps.package.in_(pkgs))
            .group_by(ps.month)
        ):
            cat_rows[(cat, year, month)][1] += int(n)
            plan.periods.add((cat, year, month))
    _add_stats(
        session,
        CategoryStat,
        [{"category": c, "year": y, "month": m, "ips": i, "downloads": n}
         for (c, y, m), (i, n) in cat_rows.items() if n],
    )  # fmt: skip


# --- entry points besides apply_pending -------------------------------------------------------


def recompute_packages(session: Session, packages: Iterable[tuple[str, str]]) -> None:
    """After a packages-table change, in its transaction: packages rows new to the seen-sets
    are counted from their records (all their years, found through record_months), rows gone
    from the table are taken out, their categories follow (:func:`apply_pending` finds both by
    comparing the table with the seen-sets). A changed release changes no count. Always bumps
    the data version (the pages show the releases, the category files list the packages)."""
    if not set(packages):
        return
    session.flush()
    if apply_pending(session).data_version is None:
        _bump(session)


def _empty(session: Session, pg: bool, tables: list[str]) -> None:
    """Empty tables nobody else reads: TRUNCATE where the login may (no dead rows to vacuum
    away), else DELETE (the ETL's login has DML rights only)."""
    if pg:
        try:
            with session.begin_nested():
                session.execute(text(f"TRUNCATE {', '.join(tables)}"))
            return
        except DBAPIError as exc:
            if "permission denied" not in str(exc.orig):
                raise
    for table in tables:
        session.execute(text(f"DELETE FROM {table}"))


def rebuild(settings: Settings) -> str:
    """Recompute all statistics and the seen-sets from the stored records (one transaction)."""
    t0 = time.monotonic()
    with db.session_factory(settings.database_url).begin() as session:
        _lock_counting(session)
        pg = _pg(session)
        _empty(session, pg, ["stats_seen", "stats_seen_category", "stats_seen_packages",
                             "record_months"])  # fmt: skip
        session.execute(delete(PackageStat))
        session.execute(delete(CategoryStat))
        if pg:
            # One transaction that reads every record a few times: sorts and hash tables in
            # memory where they fit (a server setting for this transaction only).
            session.execute(text("SET LOCAL work_mem = '256MB'"))
        # One pass over the records: where they are, and the downloads per package and month.
        session.execute(text("DROP TABLE IF EXISTS stats_rebuild_months"))
        session.execute(
            text(
                "CREATE TEMP TABLE stats_rebuild_months AS "
                f"SELECT r.category, r.package, {_year(pg)} AS year, {_month(pg)} AS month, "
                "min(r.day) AS first_day, max(r.day) AS last_day, sum(r.downloads) AS n "
                "FROM download_records r GROUP BY 1, 2, 3, 4"
            )
        )
        session.execute(
            text(
                "INSERT INTO record_months (category, package, year, month, first_day, last_day) "
                "SELECT category, package, year, month, first_day, last_day "
                "FROM stats_rebuild_months"
            )
        )
        downloads: dict[int, dict[int, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
        for pid, year, month, n in session.execute(
            text(
                "SELECT p.id, m.year, m.month, m.n FROM stats_rebuild_months m JOIN packages p "
                "ON p.package = m.package AND p.category = m.category"
            )
        ):
            downloads[year][pid][month] = int(n)
        session.execute(text("DROP TABLE stats_rebuild_months"))
        if pg:
            _analyze(session)
        packages = {i: (c, p) for i, c, p in session.execute(
            select(Package.id, Package.category, Package.package))}  # fmt: skip
        plan = _Plan(objects=[], packages=packages, new=packages, gone={})
        years = sorted(
            y
            for (y,) in session.execute(select(RecordMonth.year).distinct())
            if y >= min(FIRST_YEAR.values())
        )
        for year in years:
            _recount_packages(session, pg, plan, year, None, downloads.get(year, {}))
            for cat in _counted_categories(year):
                _recount_category(session, pg, plan, cat, year)
        session.execute(
            text("UPDATE ingested_objects SET counted_at = ingested_at WHERE "
                 "counted_at IS NULL OR counted_at <> ingested_at")
        )  # fmt: skip
        _finish(session, plan)
        version = _bump(session)
        newest = session.scalar(select(func.max(RecordMonth.last_day)))  # exact: just made
        if newest is not None:
            db.advance_valid_thru(session, _through(newest))
        valid_thru = db.get_valid_thru(session)
    months = sum(m != 0 for _, _, m in plan.periods)
    return (
        f"stats rebuild: {months} months and {len({(c, y) for c, y, _ in plan.periods})} years "
        f"recomputed, ValidThru {valid_thru or '-'}, data version {version}, "
        f"{time.monotonic() - t0:.1f}s"
    )
