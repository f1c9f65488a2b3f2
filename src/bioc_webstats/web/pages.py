"""The HTML pages (category index, repository, package) rendered from report data.

Pages link relatively (``root`` is the way back to ``/packages/stats/``), so the service works
under any mount point. Charts are drawn by the vendored uPlot from JSON embedded in the page;
the tables carry the same numbers for readers without JavaScript.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.orm import Session

from ..categories import BY_PREFIX, CATEGORIES, Category
from . import report, tabfiles


@lru_cache(maxsize=1)
def environment() -> Environment:
    """The Jinja environment of the package's templates (autoescaped)."""
    env = Environment(
        loader=PackageLoader("bioc_webstats.web", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["categories"] = CATEGORIES
    return env


def _year_sections(years: Mapping[int, Mapping[int, tuple[int, int]]], order: list[int]):
    """One dict per year: month rows, the total row and the chart series."""
    out = []
    for y in order:
        months = years.get(y, {})
        rows = [
            (f"{name}/{y}", *months.get(m, (0, 0))) for m, name in enumerate(tabfiles.MONTHS, 1)
        ]
        total_dl = sum(r[2] for r in rows)
        out.append(
            {
                "year": y,
                "rows": rows,
                "total": (months.get(0, (0, 0))[0], total_dl),
                "ips": [r[1] for r in rows],
                "downloads": [r[2] for r in rows],
            }
        )
    return out


def index_page(session: Session, snap: report.Snapshot, cat: Category) -> str:
    """A category index page (``index.html``, ``data-annotation.html`` …)."""
    ci = snap.categories[cat.prefix]
    ctx: dict = {"cat": cat, "root": "", "valid_thru": snap.valid_thru}
    if snap.valid_thru is not None:
        scores = report.scores(session, ci, snap.valid_thru)
        ranked = tabfiles.rank(scores, ci.order)
        ctx["data_as_of"] = tabfiles.data_as_of(snap.valid_thru)
        ctx["top"] = ranked[: cat.top_n] if cat.top_n else None
        groups: dict[str, list[tuple[str, int]]] = {}
        for name in ci.order:
            key = name[:1].upper() if cat.top_n is not None else ""
            groups.setdefault(key, []).append((name, scores[name]))
        ctx["groups"] = list(groups.items())
    return environment().get_template("index.html").render(ctx)


def repository_page(session: Session, snap: report.Snapshot, cat: Category) -> str:
    """The repository page: category totals per year, current data year first."""
    ctx: dict = {"cat": cat, "root": "../", "valid_thru": snap.valid_thru}
    if snap.valid_thru is not None:
        data_year = snap.valid_thru.year
        years = report.category_years(session, cat, data_year)
        order = list(range(data_year, cat.first_year - 1, -1))
        ctx["sections"] = _year_sections(years, order)
        ctx["file_prefix"] = cat.prefix
        ctx["data_as_of"] = tabfiles.data_as_of(snap.valid_thru)
    return environment().get_template("repository.html").render(ctx)


def package_page(
    session: Session,
    snap: report.Snapshot,
    cat: Category,
    package: str,
    years: report.Years | None = None,
    rel: dict[str, report.Release] | None = None,
) -> str:
    """A package page: where it is now, then its years (newest first). ``years`` and
    ``rel`` when the caller read them already (a whole publish)."""
    assert snap.valid_thru is not None
    if years is None:
        years = report.package_years(session, cat, package, snap.valid_thru.year)
    order = list(snap.categories[cat.prefix].years.get(package, ()))
    if rel is None:
        rel = report.releases(session, package)
    own = rel.get(cat.prefix)
    status: dict = {"kind": None}
    if own is not None and own.last_release is None:
        status = {"kind": "current"}
    elif own is not None:
        moved = [c for c, r in rel.items() if c != cat.prefix and r.last_release is None]
        if moved:
            to = BY_PREFIX.get(moved[0])
            # its page there exists once it has a download there: a link to a 404 before
            linked = to is not None and bool(snap.categories[to.prefix].years.get(package))
            status = {"kind": "moved", "to": to, "linked": linked} if to is not None else {}
        else:
            status = {"kind": "gone", "last": own.last_release}
    ctx = {
        "cat": cat,
        "root": "../../",
        "package": package,
        "status": status,
        "sections": _year_sections(years, order),
        "data_as_of": tabfiles.data_as_of(snap.valid_thru),
        "valid_thru": snap.valid_thru,
    }
    return environment().get_template("package.html").render(ctx)


def simple_page(title: str, message: str, status: int, root: str = "") -> str:
    """A short page for errors and the no-data state."""
    return (
        environment()
        .get_template("message.html")
        .render({"title": title, "message": message, "status": status, "root": root})
    )
