"""What a URL under ``/packages/stats/`` names, and the body of each page and file.

:func:`resolve` is purely syntactic (the contract's URL rules); :func:`exists` checks a target
against the data (a :class:`~.report.Snapshot`); :func:`build` generates a body from the
database. The publish step and the app name files through these alone, so the paths on disk
are the ones requests use.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

from sqlalchemy.orm import Session

from ..categories import BY_STEM, CATEGORIES, Category
from . import pages, report, tabfiles

INDEX_PAGES = {c.index_page: c for c in CATEGORIES}
YEAR_RE = re.compile(r"[0-9]{4}")  # ASCII digits only (not fullwidth digits)
STATIC_FILES = {  # top-level assets under the prefix -> (file under static/, content type)
    "main.css": ("main.css", "text/css; charset=utf-8"),
    "charts.js": ("charts.js", "text/javascript; charset=utf-8"),
    "uPlot.iife.min.js": ("vendor/uplot/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
}


@dataclass(frozen=True)
class Target:
    """A resolved URL: what to build and where it lives in the cache."""

    kind: str  # index | repo | package | cat_tab | cat_year | pkg_stats | pkg_scores
    #            | packages_txt | pkg_tab | pkg_year
    cat: Category
    relpath: str  # cache path, canonical
    package: str | None = None
    year: int | None = None

    @property
    def is_page(self) -> bool:
        return self.kind in ("index", "repo", "package")


@dataclass(frozen=True)
class Redirect:
    """A 301 to ``location`` (under the prefix); ``needs_package`` must exist first."""

    location: str
    cat: Category | None = None
    needs_package: str | None = None


def _valid_name(name: str) -> bool:
    """Could be a package directory: not empty, no separators, no dot-files, no controls."""
    return (
        bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()
        and " " not in name
    )


def _year(text: str, cat: Category) -> int | None:
    if YEAR_RE.fullmatch(text) is None:
        return None
    year = int(text)
    return year if year >= cat.first_year else None


def resolve(sub: str) -> Target | Redirect | str | None:
    """Map the path under ``/packages/stats/`` to a target, a redirect, a static file name
    (str), or None for 404. Purely syntactic: existence is checked against the snapshot."""
    if sub in ("", "index.html"):
        cat = CATEGORIES[0]
        return Target("index", cat, "index.html")
    if sub in INDEX_PAGES:
        cat = INDEX_PAGES[sub]
        return Target("index", cat, cat.index_page)
    if sub in STATIC_FILES:
        return sub
    parts = sub.split("/")
    cat = BY_STEM.get(parts[0])
    if cat is None:
        return None
    stem, prefix = cat.stem, cat.prefix
    if len(parts) == 1:
        return Redirect(f"{stem}/", cat)
    if len(parts) == 2:
        name = parts[1]
        if name in ("", "index.html"):
            return Target("repo", cat, f"{stem}/index.html")
        files = {
            f"{prefix}_stats.tab": "cat_tab",
            f"{prefix}_pkg_stats.tab": "pkg_stats",
            f"{prefix}_pkg_scores.tab": "pkg_scores",
            f"{prefix}_packages.txt": "packages_txt",
        }
        if name in files:
            return Target(files[name], cat, f"{stem}/{name}")
        if name.startswith(prefix + "_") and name.endswith("_stats.tab"):
            year = _year(name[len(prefix) + 1 : -len("_stats.tab")], cat)
            if year is not None:
                return Target("cat_year", cat, f"{stem}/{name}", year=year)
        pkg = name[: -len(".html")] if name.endswith(".html") else name
        if _valid_name(pkg):
            return Redirect(f"{stem}/{quote(pkg)}/", cat, needs_package=pkg)
        return None
    if len(parts) == 3:
        pkg, name = parts[1], parts[2]
        if not _valid_name(pkg):
            return None
        if name in ("", "index.html"):
            return Target("package", cat, f"{stem}/{pkg}/index.html", package=pkg)
        if name == f"{pkg}_stats.tab":
            return Target("pkg_tab", cat, f"{stem}/{pkg}/{name}", package=pkg)
        if name.startswith(pkg + "_") and name.endswith("_stats.tab"):
            year = _year(name[len(pkg) + 1 : -len("_stats.tab")], cat)
            if year is not None:
                return Target("pkg_year", cat, f"{stem}/{pkg}/{name}", package=pkg, year=year)
    return None


def exists(target: Target, snap: report.Snapshot) -> bool:
    """Whether a syntactically valid target has data in this snapshot."""
    if target.kind in ("index", "repo"):
        return True
    if snap.valid_thru is None:
        return False
    ci = snap.categories[target.cat.prefix]
    if target.package is not None:
        years = ci.years.get(target.package)
        if years is None:
            return False
        return target.year is None or target.year in years
    if target.kind == "cat_year":
        return target.cat.first_year <= (target.year or 0) <= snap.valid_thru.year
    return True


def build(session: Session, target: Target, snap: report.Snapshot) -> str:
    """The body of a target (called once per data version, then cached on disk)."""
    cat = target.cat
    if target.kind == "index":
        return pages.index_page(session, snap, cat)
    if target.kind == "repo":
        return pages.repository_page(session, snap, cat)
    assert snap.valid_thru is not None
    data_year = snap.valid_thru.year
    ci = snap.categories[cat.prefix]
    if target.kind == "package":
        return pages.package_page(session, snap, cat, target.package or "")
    if target.kind == "cat_tab":
        years = report.category_years(session, cat, data_year)
        return tabfiles.category_stats_tab(years, cat.first_year, data_year)
    if target.kind == "cat_year":
        years = report.category_years(session, cat, data_year)
        year = target.year or 0
        return tabfiles.package_year_tab(year, years.get(year, {}))
    if target.kind == "pkg_stats":
        return report.pkg_stats_body(session, ci, data_year)
    if target.kind == "pkg_scores":
        scores = report.scores(session, ci, snap.valid_thru)
        return tabfiles.pkg_scores_tab((n, scores[n]) for n in ci.order)
    if target.kind == "packages_txt":
        return tabfiles.packages_txt(ci.order)
    years = report.package_years(session, cat, target.package or "", data_year)
    if target.kind == "pkg_tab":
        return tabfiles.package_stats_tab(years)
    year = target.year or 0
    return tabfiles.package_year_tab(year, years.get(year, {}))


def category_targets(snap: report.Snapshot) -> list[Target]:
    """Every page and file of the snapshot that names no package: the category text files
    (the package tables first: the heaviest builds), the index and repository pages, and
    the per-year files of each category. Named through :func:`resolve`, so the cache paths
    are the ones requests use."""
    subs: list[str] = []
    for cat in CATEGORIES:
        stem, prefix = cat.stem, cat.prefix
        subs += [f"{stem}/{prefix}_pkg_stats.tab", f"{stem}/{prefix}_pkg_scores.tab"]
    for cat in CATEGORIES:
        stem, prefix = cat.stem, cat.prefix
        subs += [cat.index_page, f"{stem}/", f"{stem}/{prefix}_stats.tab"]
        subs.append(f"{stem}/{prefix}_packages.txt")
        if snap.valid_thru is not None:
            subs += [
                f"{stem}/{prefix}_{year}_stats.tab"
                for year in range(cat.first_year, snap.valid_thru.year + 1)
            ]
    targets: dict[str, Target] = {}
    for sub in subs:
        target = resolve(sub)
        if isinstance(target, Target) and exists(target, snap):
            targets.setdefault(target.relpath, target)
    return list(targets.values())


def package_bodies(session: Session, snap: report.Snapshot) -> Iterator[tuple[Target, str]]:
    """Every package page and file of the snapshot with its body, the same bodies
    :func:`build` makes one at a time, from one streamed query per category (a whole publish:
    thousands of packages in seconds, not one round trip per file)."""
    if snap.valid_thru is None:
        return
    rel = report.every_release(session)
    data_year = snap.valid_thru.year
    for cat in CATEGORIES:
        ci = snap.categories[cat.prefix]
        for pkg, years in report.every_package_years(session, cat, data_year):
            if pkg not in ci.years:
                continue
            base = f"{cat.stem}/{pkg}"
            page = pages.package_page(session, snap, cat, pkg, years, rel.get(pkg, {}))
            yield Target("package", cat, f"{base}/index.html", package=pkg), page
            tab = tabfiles.package_stats_tab(years)
            yield Target("pkg_tab", cat, f"{base}/{pkg}_stats.tab", package=pkg), tab
            for y in ci.years[pkg]:
                body = tabfiles.package_year_tab(y, years.get(y, {}))
                yield (
                    Target("pkg_year", cat, f"{base}/{pkg}_{y}_stats.tab", package=pkg, year=y),
                    body,
                )
