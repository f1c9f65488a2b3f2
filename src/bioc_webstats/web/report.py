"""Read-side queries on the statistics tables, shaped for ``tabfiles`` and the pages.

Ordering is done in Python (``tabfiles.package_order_key``) so SQLite and PostgreSQL give the
same bytes whatever their collations.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from ..categories import BY_PREFIX, CATEGORIES, Category
from ..store.models import CategoryStat, Package, PackageStat
from . import tabfiles

Years = dict[int, dict[int, tuple[int, int]]]


@dataclass
class CategoryIndex:
    """The packages of one category (contract order) and the years each has a download in."""

    category: Category
    order: list[str] = field(default_factory=list)
    years: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class Snapshot:
    """What routing needs to answer 404s without touching the heavy tables again."""

    data_version: int
    valid_thru: dt.date | None
    categories: dict[str, CategoryIndex]  # by prefix

    @property
    def data_year(self) -> int | None:
        """The current data year (year of ValidThru), None before any data."""
        return self.valid_thru.year if self.valid_thru else None


def load_snapshot(session: Session, data_version: int, valid_thru: dt.date | None) -> Snapshot:
    """Every (category, package, year) with a download: the month-0 rows, one query."""
    cats = {c.prefix: CategoryIndex(c) for c in CATEGORIES}
    if valid_thru is not None:
        years: dict[str, dict[str, list[int]]] = {c.prefix: defaultdict(list) for c in CATEGORIES}
        rows = session.execute(
            select(PackageStat.category, PackageStat.package, PackageStat.year).where(
                PackageStat.month == 0, PackageStat.downloads > 0
            )
        )
        for category, package, year in rows:
            cat = BY_PREFIX.get(category)
            if cat is not None and cat.first_year <= year <= valid_thru.year:
                years[category][package].append(year)
        for category, packages in years.items():
            _index(cats[category], packages)
    return Snapshot(data_version, valid_thru, cats)


def _index(ci: CategoryIndex, years: dict[str, list[int]]) -> None:
    """A category's packages and their years with a download, newest first, in order."""
    ci.years = {p: tuple(sorted(ys, reverse=True)) for p, ys in years.items()}
    ci.order = tabfiles.sort_packages(ci.years)


def snapshot_from_files(
    read: Callable[[str], bytes | None], data_version: int, valid_thru: dt.date | None
) -> Snapshot | None:
    """The snapshot of a published data version, from its ``<prefix>_pkg_stats.tab`` files
    (``read`` gives a file by URL path, None when it is not there): what the app answers
    redirects and 404s from while the database is down. None when a file is missing."""
    cats = {c.prefix: CategoryIndex(c) for c in CATEGORIES}
    if valid_thru is not None:
        for cat in CATEGORIES:
            body = read(f"{cat.stem}/{cat.prefix}_pkg_stats.tab")
            if body is None:
                return None
            years: dict[str, list[int]] = defaultdict(list)
            for line in body.decode("utf-8").splitlines()[1:]:
                package, year, month, _ips, downloads = line.split("\t")
                if month == "all" and int(downloads) > 0:
                    years[package].append(int(year))
            _index(cats[cat.prefix], years)
    return Snapshot(data_version, valid_thru, cats)


def _add(years: Years, year: int, month: int, ips: int, downloads: int) -> None:
    years.setdefault(year, {})[month] = (int(ips), int(downloads))


def package_years(session: Session, cat: Category, package: str, data_year: int) -> Years:
    """month rows of one package in one category, by year (only years with downloads)."""
    out: Years = {}
    rows = session.execute(
        select(PackageStat.year, PackageStat.month, PackageStat.ips, PackageStat.downloads).where(
            PackageStat.category == cat.prefix,
            PackageStat.package == package,
            PackageStat.year >= cat.first_year,
            PackageStat.year <= data_year,
        )
    )
    for year, month, ips, downloads in rows:
        _add(out, year, month, ips, downloads)
    return _with_downloads(out)


def _with_downloads(years: Years) -> Years:
    return {y: m for y, m in years.items() if sum(d for mm, (_, d) in m.items() if mm) > 0}


def _package_rows(session: Session, cat: Category, data_year: int) -> Iterator[tuple[str, Years]]:
    """(package, its month rows by year) for every package of the category with rows, from
    one streamed query: one package in memory at a time."""
    stmt = (
        select(
            PackageStat.package,
            PackageStat.year,
            PackageStat.month,
            PackageStat.ips,
            PackageStat.downloads,
        )
        .where(
            PackageStat.category == cat.prefix,
            PackageStat.year >= cat.first_year,
            PackageStat.year <= data_year,
        )
        .order_by(PackageStat.package)
        .execution_options(yield_per=20000)
    )
    current: str | None = None
    years: Years = {}
    for package, year, month, ips, downloads in session.execute(stmt):
        if package != current:
            if current is not None:
                yield current, years
            current, years = package, {}
        _add(years, year, month, ips, downloads)
    if current is not None:
        yield current, years


def every_package_years(
    session: Session, cat: Category, data_year: int
) -> Iterator[tuple[str, Years]]:
    """(package, its years as :func:`package_years` gives them) for every package of the
    category with rows, from one streamed query: one package in memory at a time."""
    for package, years in _package_rows(session, cat, data_year):
        yield package, _with_downloads(years)


def category_years(session: Session, cat: Category, data_year: int) -> Years:
    """Category totals by year (missing years and months are zeros for the caller)."""
    out: Years = {}
    rows = session.execute(
        select(
            CategoryStat.year, CategoryStat.month, CategoryStat.ips, CategoryStat.downloads
        ).where(
            CategoryStat.category == cat.prefix,
            CategoryStat.year >= cat.first_year,
            CategoryStat.year <= data_year,
        )
    )
    for year, month, ips, downloads in rows:
        _add(out, year, month, ips, downloads)
    return out


def pkg_stats_body(session: Session, index: CategoryIndex, data_year: int) -> str:
    """``<prefix>_pkg_stats.tab`` built from one streamed query (one text chunk per package)."""
    chunks: dict[str, str] = {}
    for package, years in _package_rows(session, index.category, data_year):
        if package in index.years:
            keep = {y: years[y] for y in index.years[package] if y in years}
            chunks[package] = tabfiles.pkg_stats_tab([(package, keep)])[
                len(tabfiles.PKG_STATS_HEADER) :
            ]
    return tabfiles.PKG_STATS_HEADER + "".join(chunks.get(n, "") for n in index.order)


def scores(session: Session, index: CategoryIndex, valid_thru: dt.date) -> dict[str, int]:
    """Download score of every package of the category (0 when nothing in the window)."""
    window = tabfiles.score_window(valid_thru)
    (y0, m0), (y1, m1) = window[0], window[-1]
    rows = session.execute(
        select(PackageStat.package, func.sum(PackageStat.ips))
        .where(
            PackageStat.category == index.category.prefix,
            PackageStat.month >= 1,
            or_(PackageStat.year > y0, and_(PackageStat.year == y0, PackageStat.month >= m0)),
            or_(PackageStat.year < y1, and_(PackageStat.year == y1, PackageStat.month <= m1)),
        )
        .group_by(PackageStat.package)
    )
    sums = {package: int(total or 0) for package, total in rows}
    return {n: tabfiles.download_score([sums.get(n, 0)]) for n in index.order}


@dataclass(frozen=True)
class Release:
    """One row of the packages table."""

    category: str
    first_release: str | None
    last_release: str | None


def releases(session: Session, package: str) -> dict[str, Release]:
    """The packages-table rows of a package, by category prefix."""
    rows = session.execute(
        select(Package.category, Package.first_release, Package.last_release).where(
            Package.package == package
        )
    )
    return {c: Release(c, f, last) for c, f, last in rows}


def every_release(session: Session) -> dict[str, dict[str, Release]]:
    """:func:`releases` of every package, in one query."""
    out: dict[str, dict[str, Release]] = {}
    rows = session.execute(
        select(Package.package, Package.category, Package.first_release, Package.last_release)
    )
    for pkg, c, f, last in rows:
        out.setdefault(pkg, {})[c] = Release(c, f, last)
    return out
