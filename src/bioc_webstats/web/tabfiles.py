"""The text formats of web-contract.md, as pure functions of rows (no database, no I/O).

A *year* is given as a mapping ``month -> (ips, downloads)`` where month 1..12 are the months
and month 0 is the whole year (its ``ips`` = distinct IPs over the year). Missing months are
``0\\t0``. Every function returns ``str``; the caller encodes it as UTF-8.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping

MONTHS: tuple[str, ...] = (
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "May",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Oct",
    "Nov",
    "Dec",
)
WEEKDAYS: tuple[str, ...] = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")

HEADER = "Year\tMonth\tNb_of_distinct_IPs\tNb_of_downloads\n"
PKG_STATS_HEADER = "Package\tYear\tMonth\tNb_of_distinct_IPs\tNb_of_downloads\n"
PKG_SCORES_HEADER = "Package\tDownload_score\n"

Counts = tuple[int, int]
Year = Mapping[int, Counts]
Years = Mapping[int, Year]


def package_order_key(name: str) -> tuple[str, str]:
    """The contract's package order: lower-cased name, then name, by code point."""
    return (name.lower(), name)


def sort_packages(names: Iterable[str]) -> list[str]:
    """Names in the contract's package order."""
    return sorted(names, key=package_order_key)


def year_block(year: int, months: Year) -> str:
    """12 month lines and the ``all`` line of one year (``all`` downloads = sum of months)."""
    lines = []
    total = 0
    for m, name in enumerate(MONTHS, 1):
        ips, downloads = months.get(m, (0, 0))
        total += downloads
        lines.append(f"{year}\t{name}\t{ips}\t{downloads}\n")
    year_ips = months.get(0, (0, 0))[0]
    lines.append(f"{year}\tall\t{year_ips}\t{total}\n")
    return "".join(lines)


def package_year_tab(year: int, months: Year) -> str:
    """``<pkg>_<YYYY>_stats.tab`` (and ``<prefix>_<YYYY>_stats.tab``): header + one block."""
    return HEADER + year_block(year, months)


def package_stats_tab(years: Years) -> str:
    """``<pkg>_stats.tab``: header + a block per year present, newest first."""
    return HEADER + "".join(year_block(y, years[y]) for y in sorted(years, reverse=True))


def category_stats_tab(years: Years, first_year: int, data_year: int) -> str:
    """``<prefix>_stats.tab``: header + a block for every year data_year..first_year."""
    empty: dict[int, Counts] = {}
    return HEADER + "".join(
        year_block(y, years.get(y, empty)) for y in range(data_year, first_year - 1, -1)
    )


def pkg_stats_tab(packages: Iterable[tuple[str, Years]]) -> str:
    """``<prefix>_pkg_stats.tab``: each package's body lines, ``<pkg>\\t`` in front.

    ``packages`` must already be in the package order.
    """
    out = [PKG_STATS_HEADER]
    for name, years in packages:
        prefix = name + "\t"
        for y in sorted(years, reverse=True):
            block = year_block(y, years[y])
            out.append(prefix + block[:-1].replace("\n", "\n" + prefix) + "\n")
    return "".join(out)


def pkg_scores_tab(scores: Iterable[tuple[str, int]]) -> str:
    """``<prefix>_pkg_scores.tab``: ``<pkg>\\t<score>`` lines in the given order."""
    return PKG_SCORES_HEADER + "".join(f"{name}\t{score}\n" for name, score in scores)


def packages_txt(names: Iterable[str]) -> str:
    """``<prefix>_packages.txt``: one name per line (empty file for no package)."""
    return "".join(f"{name}\n" for name in names)


def score_window(valid_thru: dt.date) -> list[tuple[int, int]]:
    """The 12 complete (year, month) before the month containing ValidThru + 1 day, oldest first."""
    d = valid_thru + dt.timedelta(days=1)
    index = d.year * 12 + (d.month - 1)  # months since year 0 of the current month
    return [((i // 12), (i % 12) + 1) for i in range(index - 12, index)]


def download_score(monthly_ips: Iterable[int]) -> int:
    """ceil(sum of the monthly distinct-IP counts in the window / 12), in integers."""
    return -(-sum(monthly_ips) // 12)


def rank(scores: Mapping[str, int], ordered: Iterable[str]) -> list[tuple[int, str, int]]:
    """(rank, name, score) by score descending, ties in package order (``ordered``)."""
    by_score = sorted(ordered, key=lambda n: -scores.get(n, 0))  # stable: keeps package order
    return [(i, n, scores.get(n, 0)) for i, n in enumerate(by_score, 1)]


def http_date(day: dt.date) -> str:
    """``Thu, 05 Oct 2023 00:00:00 GMT`` for midnight of ``day``, locale-independent."""
    return (
        f"{WEEKDAYS[day.weekday()]}, {day.day:02d} {MONTHS[day.month - 1]} {day.year:04d} "
        "00:00:00 GMT"
    )


def data_as_of(day: dt.date) -> str:
    """``Sat, 14 Jun 2025`` (the index pages' "Data as of" line)."""
    return f"{WEEKDAYS[day.weekday()]}, {day.day:02d} {MONTHS[day.month - 1]} {day.year:04d}"
