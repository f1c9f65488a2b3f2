"""The packages table: load it from a CSV, sync it from Bioconductor's own files."""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..categories import BY_PREFIX, CATEGORIES
from ..config import Settings
from ..errors import WebstatsError
from ..store import db
from ..store.models import Package
from .manifest import (
    FETCH_TIMEOUT,
    PKG_NAME,
    RELEASE,
    Manifest,
    name_problem,
    read_manifest,
    version_key,
)

_CODE = re.compile(r"^[0-9]{3,4}$")
# A packages CSV is 170 KB (5,994 rows since 2009): bounds that stop /dev/zero, a file
# without line breaks or a wrong file before it takes the memory (64 MiB of short rows took
# 5 GB: every row is held, then an object each).
MAX_CSV_BYTES = 4 * 1024 * 1024
MAX_CSV_LINE = 64 * 1024
MAX_CSV_ROWS = 50_000


def release_from_code(value: str) -> str | None:
    """``314`` → ``3.14``, ``109`` → ``1.9``; ``3.14`` stays; empty → None."""
    value = value.strip()
    if not value:
        return None
    if RELEASE.match(value):
        return value
    if _CODE.match(value):
        n = int(value)
        return f"{n // 100}.{n % 100}"
    raise ValueError(f"not a release code: {value!r}")


COLUMNS = ("package", "category", "first_version", "last_version")
SEEDED = "packages_seeded"  # meta: when the shipped history was seeded, until the first sync


def read_csv(path: Path) -> list[tuple[str, str, str | None, str | None]]:
    """Rows (package, category, first, last) of a packages CSV, every row checked before
    any is used; the first problem is one line naming file and line. A UTF-8 BOM is
    accepted; a row repeated identically is read once; the same (package, category) with
    other versions is refused, naming both lines."""
    rows: dict[tuple[str, str], tuple[int, tuple[str, str, str | None, str | None]]] = {}
    try:
        # (a pipe, `packages load <(curl …)`, is read as any file: bounded, below)
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(_bounded_lines(fh, path), strict=True)
            header = [h.strip() for h in next(reader, [])]
            if not set(COLUMNS) <= set(header):
                raise WebstatsError(f"{path}: header must have columns {','.join(COLUMNS)}")
            twice = [c for c in COLUMNS if header.count(c) > 1]
            if twice:  # which one holds the values is a guess
                raise WebstatsError(f"{path}: header has column {twice[0]} more than once")
            at = {c: header.index(c) for c in COLUMNS}
            line = reader.line_num + 1  # where the next row starts
            for values in reader:
                where, line = f"{path}:{line}", reader.line_num + 1
                if not values:
                    continue  # a blank line
                if len(values) != len(header):
                    raise WebstatsError(
                        f"{where}: {len(values)} columns, the header has {len(header)}"
                    )
                row = _check_row(where, *(values[at[c]] for c in COLUMNS))
                key = (row[0], row[1])
                seen = rows.get(key)
                if seen is None and len(rows) == MAX_CSV_ROWS:
                    raise WebstatsError(
                        f"{path}: more than {MAX_CSV_ROWS} rows, not a packages CSV"
                    )
                if seen is None:
                    rows[key] = (int(where.rsplit(":", 1)[1]), row)
                elif seen[1] != row:
                    raise WebstatsError(
                        f"{where}: {row[1]}/{row[0]} conflicts with line {seen[0]} "
                        "(same package and category, other versions)"
                    )
    except OSError as exc:
        raise WebstatsError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise WebstatsError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise WebstatsError(f"{path}:{reader.line_num}: not CSV ({exc})") from None
    return [row for _, row in rows.values()]


def _bounded_lines(fh: Any, path: Path) -> Iterator[str]:
    """The lines of a text file, each at most MAX_CSV_LINE characters and all of them
    MAX_CSV_BYTES: beyond either, one line naming the file."""
    total = 0
    for number in itertools.count(1):
        line = fh.readline(MAX_CSV_LINE + 1)
        if not line:
            return
        if len(line) > MAX_CSV_LINE:
            raise WebstatsError(f"{path}:{number}: line longer than {MAX_CSV_LINE} characters")
        total += len(line)
        if total > MAX_CSV_BYTES:
            raise WebstatsError(
                f"{path}: larger than {MAX_CSV_BYTES >> 20} MiB, not a packages CSV"
            )
        yield line


def _check_row(
    where: str, name: str, category: str, first: str, last: str
) -> tuple[str, str, str | None, str | None]:
    cat, name = category.strip(), name.strip()
    if cat not in BY_PREFIX:
        raise WebstatsError(f"{where}: unknown category {cat[:40]!r}")
    if not name:
        raise WebstatsError(f"{where}: empty package name")
    problem = name_problem(name)
    if problem:
        raise WebstatsError(f"{where}: {problem}")
    try:
        first_release, last_release = release_from_code(first), release_from_code(last)
    except ValueError as exc:
        raise WebstatsError(f"{where}: {exc}") from None
    if not PKG_NAME.match(name):
        raise WebstatsError(f"{where}: {name!r} is not a valid R package name")
    if first_release and last_release and _release_key(last_release) < _release_key(first_release):
        raise WebstatsError(
            f"{where}: last release {last_release} is before first release {first_release}"
        )
    return name, cat, first_release, last_release


def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(part) for part in release.split("."))


def load_csv(settings: Settings, path: Path) -> str:
    """Merge a CSV into the packages table (insert new rows, update changed ones)."""
    rows = read_csv(path)
    with db.session_factory(settings.database_url).begin() as session:
        added, updated = _merge(session, rows)
    return f"packages: {len(rows)} rows read, {added} added, {updated} updated"


def _merge(
    session: Session, rows: list[tuple[str, str, str | None, str | None]]
) -> tuple[int, int]:
    added = updated = 0
    touched: set[tuple[str, str]] = set()
    existing = {(p.package, p.category): p for p in session.scalars(select(Package))}
    for name, cat, first, last in rows:
        row = existing.get((name, cat))
        if row is None:
            row = Package(package=name, category=cat, first_release=first, last_release=last)
            session.add(row)
            existing[(name, cat)] = row
            added += 1
            touched.add((cat, name))
        elif (row.first_release, row.last_release) != (first, last):
            row.first_release, row.last_release = first, last
            updated += 1
            touched.add((cat, name))  # its page shows the releases
    if touched:
        from ..store.stats import recompute_packages

        session.flush()
        recompute_packages(session, touched)
    return added, updated


def shipped_csv() -> Path:
    """The packages history shipped with the release (``bioc_webstats/data/packages.csv``)."""
    return Path(str(resources.files("bioc_webstats") / "data" / "packages.csv"))


def seed(settings: Settings) -> str:
    """Load the shipped history into an EMPTY packages table (a deploy's first step, before
    the first ETL); a table with rows is left alone. Idempotent; one transaction. The next
    sync may then apply more changes than ``etl/sync_change_limit`` (the history is as old
    as the release): it is marked in ``meta`` until that sync."""
    path = shipped_csv()
    rows = read_csv(path)
    with db.session_factory(settings.database_url).begin() as session:
        present = session.scalar(select(func.count()).select_from(Package)) or 0
        if present:
            return f"packages seed: the table has {present} rows; nothing done"
        added, _ = _merge(session, rows)
        db.set_meta(session, SEEDED, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    return f"packages seed: the table was empty; {added} rows loaded from {path}"


@dataclass(frozen=True)
class Change:
    """One row the sync adds, closes (sets last_release) or reopens (clears it)."""

    action: str  # "add" | "close" | "reopen"
    category: str
    package: str
    release: str | None  # first_release of an add, last_release of a close
    note: str = ""

    def describe(self) -> str:
        """One line for the sync report."""
        what = {
            "add": f"first {self.release}",
            "close": f"last {self.release}",
            "reopen": f"was last {self.release}",
        }[self.action]
        note = f"; {self.note}" if self.note else ""
        return f"  {self.action:<6} {self.category}/{self.package} ({what}{note})"


def _closing_release(first: str | None, release: str) -> str:
    """The last release of a package gone from devel: the current release, unless it was
    added in devel and never reached a release (then its first, devel-only version)."""
    try:
        if first is not None and version_key(first) > version_key(release):
            return first
    except ValueError:
        pass
    return release


def plan_changes(
    rows: dict[tuple[str, str], tuple[str | None, str | None]], manifest: Manifest
) -> list[Change]:
    """The changes that bring ``rows`` ((package, category) → (first, last)) in line with devel.

    Per category: names new to it are added (first = devel version), open rows gone from its
    devel PACKAGES are closed (last = release version), closed rows back in it are reopened.
    A package that changed category is therefore a close in one and an add in the other.
    """
    changes: list[Change] = []
    for cat in CATEGORIES:
        devel = manifest.devel[cat.prefix]
        existing = {pkg: fl for (pkg, c), fl in rows.items() if c == cat.prefix}
        for name in sorted(devel - existing.keys()):
            changes.append(Change("add", cat.prefix, name, manifest.devel_version))
        for name, (first, last) in sorted(existing.items()):
            if last is None and name not in devel:
                closing = _closing_release(first, manifest.release_version)
                changes.append(Change("close", cat.prefix, name, closing))
            elif last is not None and name in devel:
                changes.append(Change("reopen", cat.prefix, name, last))
    # Label moves: a package leaving one category while it enters (or returns to) another.
    entering = {c.package: c.category for c in changes if c.action in ("add", "reopen")}
    leaving = {c.package: c.category for c in changes if c.action == "close"}
    labelled = []
    for c in changes:
        if c.action == "close" and c.package in entering:
            c = Change(
                c.action, c.category, c.package, c.release, f"moved to {entering[c.package]}"
            )
        elif c.action != "close" and c.package in leaving:
            c = Change(
                c.action, c.category, c.package, c.release, f"moved from {leaving[c.package]}"
            )
        labelled.append(c)
    return labelled


def _summary(manifest: Manifest, changes: list[Change]) -> str:
    counts = {a: sum(c.action == a for c in changes) for a in ("add", "close", "reopen")}
    moved = sum(c.action == "close" and c.note.startswith("moved") for c in changes)
    in_devel = sum(len(names) for names in manifest.devel.values())
    return (
        f"packages sync from {manifest.source}: release {manifest.release_version}, devel "
        f"{manifest.devel_version}, {in_devel} packages in devel; {len(changes)} changes: "
        f"{counts['add']} added, {counts['close']} closed, {counts['reopen']} reopened, "
        f"{moved} moved"
    )


def sync(
    settings: Settings,
    source: str | None,
    dry_run: bool,
    force: bool,
    timeout: float = FETCH_TIMEOUT,
) -> str:
    """Sync from ``config.yaml`` and the devel ``PACKAGES`` files (see etl.md).

    Everything is fetched and checked before the database is touched; a fetch error changes
    nothing. More changes than ``etl/sync_change_limit`` stop the sync unless ``force``. The
    changes, the statistics of the touched packages and the data version are one transaction.
    """
    src = source or settings.get("etl/packages_source") or "https://bioconductor.org"
    limit = settings.get_int("etl/sync_change_limit")
    manifest = read_manifest(src, timeout)
    with db.session_factory(settings.database_url).begin() as session:
        existing = {(p.package, p.category): p for p in session.scalars(select(Package))}
        changes = plan_changes(
            {k: (p.first_release, p.last_release) for k, p in existing.items()}, manifest
        )
        lines = [_summary(manifest, changes), *(c.describe() for c in changes)]
        seeded = db.get_meta(session, SEEDED)
        # The first sync after the shipped history was seeded brings the table up to today's
        # devel: its adds and reopens are not held to the limit (the history is as old as its
        # release); its closes are (a PACKAGES cut short closes thousands).
        counted = [c for c in changes if c.action == "close"] if seeded else changes
        what = "closes" if seeded else "changes"
        over = len(counted) > limit and not force
        if seeded and len(changes) > limit and not over:  # the dry run says it too
            lines.append(
                f"first sync since the shipped history was seeded ({seeded}): its adds and "
                f"reopens are not held to the change limit of {limit}"
            )
        if dry_run:  # nothing was modified: leaving the block writes nothing
            if over:
                lines.append(
                    f"{len(counted)} {what} over the change limit of {limit}: "
                    "a real run needs --force"
                )
            lines.append("dry run: nothing written")
            return "\n".join(lines)
        if over:
            raise WebstatsError(
                f"packages sync: {len(counted)} {what} exceed the change limit of {limit} "
                "(etl/sync_change_limit); nothing changed. Review them with --dry-run, "
                "apply them with --force"
            )
        for c in changes:
            if c.action == "add":
                session.add(
                    Package(package=c.package, category=c.category, first_release=c.release)
                )
            else:
                row = existing[(c.package, c.category)]
                row.last_release = c.release if c.action == "close" else None
        if changes:
            from ..store.stats import recompute_packages

            session.flush()
            recompute_packages(session, {(c.category, c.package) for c in changes})
        if seeded:
            db.delete_meta(session, SEEDED)
    lines.append("applied" if changes else "nothing to change")
    return "\n".join(lines)
