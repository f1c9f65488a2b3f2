"""The four Bioconductor repositories and everything the contract says about them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Category:
    """One repository: how it is named in URLs, file names, texts and the logs."""

    prefix: str  # stored in the database and used in file names
    stem: str  # URL directory under /packages/stats/
    label: str  # word used in page texts
    index_page: str  # category index page under /packages/stats/
    top_n: int | None  # length of the Top-N list on the index page (None: no list)
    first_year: int  # nothing dated before this year is counted
    repo_path: str  # path segment(s) in download URLs and on bioconductor.org


CATEGORIES: tuple[Category, ...] = (
    Category("bioc", "bioc", "software", "index.html", 75, 2009, "bioc"),
    Category(
        "annotation",
        "data-annotation",
        "annotation",
        "data-annotation.html",
        30,
        2009,
        "data/annotation",
    ),
    Category(
        "experiment",
        "data-experiment",
        "experiment",
        "data-experiment.html",
        15,
        2009,
        "data/experiment",
    ),
    Category("workflows", "workflows", "workflow", "workflows.html", None, 2015, "workflows"),
)

BY_PREFIX: dict[str, Category] = {c.prefix: c for c in CATEGORIES}
BY_STEM: dict[str, Category] = {c.stem: c for c in CATEGORIES}
BY_REPO_PATH: dict[str, Category] = {c.repo_path: c for c in CATEGORIES}
