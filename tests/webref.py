"""Web test support: a raw fixture dataset and an independent reference of the contract's bytes.

The reference works from raw download records ``(category, package, date, ip)`` with plain
sets and loops, sharing no code with ``bioc_webstats.tabfiles``/``report``; the tests compare
the service's answers to it byte for byte.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections import defaultdict

from sqlalchemy import delete

from bioc_webstats.store import db
from bioc_webstats.store.models import (
    CategoryStat,
    DownloadRecord,
    IngestedObject,
    Package,
    PackageStat,
)

FIRST_YEAR = {"bioc": 2009, "annotation": 2009, "experiment": 2009, "workflows": 2015}
STEM = {
    "bioc": "bioc",
    "annotation": "data-annotation",
    "experiment": "data-experiment",
    "workflows": "workflows",
}
MONTH_NAMES = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()

# (package, category, first_release, last_release): the packages table.
PACKAGES = [
    ("affy", "bioc", "1.0", None),
    ("agahomology", "bioc", "2.1", None),
    ("cn.mops", "bioc", "2.8", None),
    ("CNAnorm", "bioc", "2.8", "3.18"),
    ("TReNA", "bioc", "3.5", "3.8"),
    ("trena", "bioc", "3.8", None),
    ("limma", "bioc", "1.0", None),
    ("zzOld", "bioc", "1.0", "2.0"),  # downloads only before 2009: not in the category
    ("silent", "bioc", "3.19", None),  # known, never downloaded
    ("ag.db", "annotation", "1.0", None),
    ("Ag.Db2", "annotation", "1.0", None),
    ("CNAnorm", "annotation", "3.19", None),  # moved: now in annotation
    ("wfA", "workflows", "3.1", None),
]


def _r(cat, pkg, day, ip, n=1):
    return [(cat, pkg, dt.date.fromisoformat(day), ip)] * n


# Raw records: one tuple per download.
RECORDS: list[tuple[str, str, dt.date, str]] = [
    # affy: many years, repeated IPs within a year, gap years
    *_r("bioc", "affy", "2008-12-31", "1.1.1.1"),  # before first year: never reported
    *_r("bioc", "affy", "2009-01-01", "1.1.1.1", 3),
    *_r("bioc", "affy", "2009-02-15", "1.1.1.1"),
    *_r("bioc", "affy", "2009-02-15", "2.2.2.2"),
    *_r("bioc", "affy", "2015-07-01", "3.3.3.3"),
    *_r("bioc", "affy", "2023-03-01", "4.4.4.4"),  # in window when ValidThru = 2024-02-xx/03-01
    *_r("bioc", "affy", "2023-04-30", "4.4.4.4", 2),
    *_r("bioc", "affy", "2023-04-30", "5.5.5.5"),
    *_r("bioc", "affy", "2023-12-31", "6.6.6.6"),
    *_r("bioc", "affy", "2024-01-01", "6.6.6.6"),
    *_r("bioc", "affy", "2024-02-29", "7.7.7.7"),
    *_r("bioc", "affy", "2024-03-01", "7.7.7.7"),
    *_r("bioc", "affy", "2024-03-31", "8.8.8.8"),
    # limma: 13 distinct IPs in one window month -> score ceil(13/12) = 2
    *[r for i in range(13) for r in _r("bioc", "limma", "2023-06-10", f"10.0.0.{i}")],
    *_r("bioc", "limma", "2009-05-05", "1.1.1.1"),
    # exactly 12 -> 1
    *[r for i in range(12) for r in _r("bioc", "agahomology", "2023-09-09", f"10.1.0.{i}")],
    *_r("bioc", "cn.mops", "2020-01-20", "9.9.9.9"),  # score 0, still listed
    *_r("bioc", "CNAnorm", "2019-11-11", "9.9.9.9"),
    *_r("bioc", "TReNA", "2018-05-05", "1.1.1.1"),
    *_r("bioc", "trena", "2023-05-05", "1.1.1.1"),
    *_r("bioc", "zzOld", "2008-06-06", "1.1.1.1"),
    *_r("bioc", "unknownpkg", "2023-05-05", "1.1.1.1"),  # not in the packages table
    *_r("annotation", "ag.db", "2023-08-08", "1.1.1.1"),
    *_r("annotation", "Ag.Db2", "2024-03-31", "1.1.1.1"),
    *_r("annotation", "CNAnorm", "2024-01-02", "2.2.2.2"),
    *_r("workflows", "wfA", "2014-12-31", "1.1.1.1"),  # before workflows' first year
    *_r("workflows", "wfA", "2016-01-01", "1.1.1.1"),
    # experiment: no record at all (empty category)
]


def known() -> set[tuple[str, str]]:
    return {(c, p) for p, c, _, _ in PACKAGES}


def counted(records=RECORDS, valid_thru: dt.date | None = None):
    """Records that count: known package, not before the category's first year."""
    ok = known()
    return [
        r
        for r in records
        if (r[0], r[1]) in ok
        and r[2].year >= FIRST_YEAR[r[0]]
        and (valid_thru is None or r[2] <= valid_thru)
    ]


def load_direct(session, records=RECORDS, valid_thru: dt.date | None = None) -> None:
    """Write the packages table and the stats tables aggregated from ``records`` (test-side).

    Used instead of the ETL's recompute so the web tests do not depend on it.
    """
    session.execute(delete(PackageStat))
    session.execute(delete(CategoryStat))
    session.execute(delete(Package))
    for p, c, f, last in PACKAGES:
        session.add(Package(package=p, category=c, first_release=f, last_release=last))
    pkg_ips: dict = defaultdict(set)
    pkg_dl: dict = defaultdict(int)
    cat_ips: dict = defaultdict(set)
    cat_dl: dict = defaultdict(int)
    for c, p, d, ip in counted(records, valid_thru):
        for m in (d.month, 0):
            pkg_ips[(c, p, d.year, m)].add(ip)
            pkg_dl[(c, p, d.year, m)] += 1
            cat_ips[(c, d.year, m)].add(ip)
            cat_dl[(c, d.year, m)] += 1
    for (c, p, y, m), ips in pkg_ips.items():
        session.add(
            PackageStat(
                category=c, package=p, year=y, month=m, ips=len(ips), downloads=pkg_dl[(c, p, y, m)]
            )
        )
    for (c, y, m), ips in cat_ips.items():
        session.add(
            CategoryStat(category=c, year=y, month=m, ips=len(ips), downloads=cat_dl[(c, y, m)])
        )
    last = max(r[2] for r in records) if valid_thru is None else valid_thru
    db.set_meta(session, db.VALID_THRU, last.isoformat())
    db.bump_data_version(session)
    session.commit()


def _ip_hash(ip: str) -> int:
    return int.from_bytes(hashlib.sha256(ip.encode()).digest()[:8], "big", signed=True)


def load_via_etl(session, records=RECORDS, valid_thru: dt.date | None = None) -> None:
    """Store the raw records as the ETL does (ledger + download records, every record, known
    or not) and let the ETL's own ``stats.recompute_packages`` build the statistics."""
    from bioc_webstats.store import stats

    for p, c, f, last in PACKAGES:
        session.add(Package(package=p, category=c, first_release=f, last_release=last))
    obj = IngestedObject(
        key="fixture/E2ABCDEF.2024-03-31-00.abcd1234.gz",
        etag="fixture",
        size=1,
        name_hour=dt.datetime(2024, 3, 31),
        lines_read=len(records),
        accepted=len(records),
        rejected=0,
        ingested_at=dt.datetime.now(dt.UTC),
    )
    session.add(obj)
    session.flush()
    agg: dict = defaultdict(int)
    for c, p, d, ip in records:
        if valid_thru is None or d <= valid_thru:  # what the ETL has seen so far
            agg[(c, p, d, _ip_hash(ip))] += 1
    for (c, p, d, h), n in agg.items():
        session.add(
            DownloadRecord(object_id=obj.id, category=c, package=p, day=d, ip_hash=h, downloads=n)
        )
    session.flush()
    stats.recompute_packages(session, {(c, p) for c, p, _, _ in agg})
    if valid_thru is not None:
        db.advance_valid_thru(session, valid_thru)
    session.commit()


LOADERS = {"direct": load_direct, "etl": load_via_etl}


class Reference:
    """Expected bytes of every text file, from raw records, for one ValidThru."""

    def __init__(self, valid_thru: dt.date, records=RECORDS) -> None:
        self.vt = valid_thru
        self.data_year = valid_thru.year
        self.recs = counted(records, valid_thru)

    # -- small helpers ------------------------------------------------------------------
    def _month(self, cat, pkg, year, month):
        rs = [
            r
            for r in self.recs
            if r[0] == cat
            and (pkg is None or r[1] == pkg)
            and r[2].year == year
            and (month == 0 or r[2].month == month)
        ]
        return len({r[3] for r in rs}), len(rs)

    def _block(self, cat, pkg, year, lead=""):
        lines = []
        for m in range(1, 13):
            ips, n = self._month(cat, pkg, year, m)
            lines.append(f"{lead}{year}\t{MONTH_NAMES[m - 1]}\t{ips}\t{n}\n")
        ips, n = self._month(cat, pkg, year, 0)
        lines.append(f"{lead}{year}\tall\t{ips}\t{n}\n")
        return "".join(lines)

    # -- what exists ------------------------------------------------------------------
    def packages(self, cat) -> list[str]:
        names = {r[1] for r in self.recs if r[0] == cat}
        # lower-cased name, then name, compared by code point
        return sorted(names, key=lambda s: (s.lower(), s))

    def package_years(self, cat, pkg) -> list[int]:
        return sorted({r[2].year for r in self.recs if r[0] == cat and r[1] == pkg}, reverse=True)

    # -- the files ----------------------------------------------------------------------
    H = "Year\tMonth\tNb_of_distinct_IPs\tNb_of_downloads\n"

    def pkg_year(self, cat, pkg, year) -> bytes:
        return (self.H + self._block(cat, pkg, year)).encode()

    def pkg_all(self, cat, pkg) -> bytes:
        return (
            self.H + "".join(self._block(cat, pkg, y) for y in self.package_years(cat, pkg))
        ).encode()

    def cat_year(self, cat, year) -> bytes:
        return (self.H + self._block(cat, None, year)).encode()

    def cat_all(self, cat) -> bytes:
        years = range(self.data_year, FIRST_YEAR[cat] - 1, -1)
        return (self.H + "".join(self._block(cat, None, y) for y in years)).encode()

    def pkg_stats(self, cat) -> bytes:
        out = "Package\tYear\tMonth\tNb_of_distinct_IPs\tNb_of_downloads\n"
        for p in self.packages(cat):
            for y in self.package_years(cat, p):
                out += self._block(cat, p, y, lead=p + "\t")
        return out.encode()

    def window(self) -> list[tuple[int, int]]:
        d = self.vt + dt.timedelta(days=1)
        y, m = d.year, d.month
        out = []
        for _ in range(12):
            m -= 1
            if m == 0:
                y, m = y - 1, 12
            out.append((y, m))
        return out

    def score(self, cat, pkg) -> int:
        total = sum(self._month(cat, pkg, y, m)[0] for y, m in self.window())
        return math.ceil(total / 12)

    def pkg_scores(self, cat) -> bytes:
        out = "Package\tDownload_score\n"
        for p in self.packages(cat):
            out += f"{p}\t{self.score(cat, p)}\n"
        return out.encode()

    def packages_txt(self, cat) -> bytes:
        return "".join(p + "\n" for p in self.packages(cat)).encode()

    def all_files(self) -> dict[str, bytes]:
        """URL path under /packages/stats/ -> expected bytes, for every file that exists."""
        out: dict[str, bytes] = {}
        for cat, stem in STEM.items():
            out[f"{stem}/{cat}_stats.tab"] = self.cat_all(cat)
            out[f"{stem}/{cat}_pkg_stats.tab"] = self.pkg_stats(cat)
            out[f"{stem}/{cat}_pkg_scores.tab"] = self.pkg_scores(cat)
            out[f"{stem}/{cat}_packages.txt"] = self.packages_txt(cat)
            for y in range(FIRST_YEAR[cat], self.data_year + 1):
                out[f"{stem}/{cat}_{y}_stats.tab"] = self.cat_year(cat, y)
            for p in self.packages(cat):
                out[f"{stem}/{p}/{p}_stats.tab"] = self.pkg_all(cat, p)
                for y in self.package_years(cat, p):
                    out[f"{stem}/{p}/{p}_{y}_stats.tab"] = self.pkg_year(cat, p, y)
        return out
