"""The packages table: load it from a CSV, sync it from Bioconductor's own files."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from ..categories import BY_PREFIX, CATEGORIES
from ..config import Settings
from ..errors import WebstatsError
from ..store import db
from ..store.models import Package
from .manifest import FETCH_TIMEOUT, Manifest, read_manifest, version_key

_CODE = re.compile(r"^\d{3,4}$")
_XY = re.compile(r"^\d+\.\d+$")


def release_from_code(value: str) -> str | None:
    """``314`` → ``3.14``, ``109`` → ``1.9``; ``3.14`` stays; empty → None."""
    value = value.strip()
    if not value:
        return None
    if _XY.match(value):
        return value
    if _CODE.match(value):
        n = int(value)
        return f"{n // 100}.{n % 100}"
    raise ValueError(f"not a release code: {value!r}")


def read_csv(path: Path) -> list[tuple[str, str, str | None, str | None]]:
    """Rows (package, category, first, last) of a packages CSV; errors name file and line."""
    rows = []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            need = {"package", "category", "first_version", "last_version"}
            if not reader.fieldnames or not need <= set(reader.fieldnames):
                raise WebstatsError(f"{path}: header must have columns {','.join(sorted(need))}")
            for row in reader:
                line = reader.line_num
                cat = (row["category"] or "").strip()
                name = (row["package"] or "").strip()
                if cat not in BY_PREFIX:
                    raise WebstatsError(f"{path}:{line}: unknown category {cat!r}")
                if not name:
                    raise WebstatsError(f"{path}:{line}: empty package name")
                try:
                    first = release_from_code(row["first_version"] or "")
                    last = release_from_code(row["last_version"] or "")
                except ValueError as exc:
                    raise WebstatsError(f"{path}:{line}: {exc}") from None
                rows.append((name, cat, first, last))
    except OSError as exc:
        raise WebstatsError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise WebstatsError(f"{path}: not UTF-8 text") from None
    return rows


def load_csv(settings: Settings, path: Path) -> str:
    """Merge a CSV into the packages table (insert new rows, update changed ones)."""
    rows = read_csv(path)
    added = updated = 0
    touched: set[tuple[str, str]] = set()
    with db.session_factory(settings.database_url).begin() as session:
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

            recompute_packages(session, touched)
    return f"packages: {len(rows)} rows read, {added} added, {updated} updated"


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
    if limit < 0:
        raise WebstatsError(f"parameter etl/sync_change_limit must be >= 0, got {limit}")
    manifest = read_manifest(src, timeout)
    with db.session_factory(settings.database_url).begin() as session:
        existing = {(p.package, p.category): p for p in session.scalars(select(Package))}
        changes = plan_changes(
            {k: (p.first_release, p.last_release) for k, p in existing.items()}, manifest
        )
        lines = [_summary(manifest, changes), *(c.describe() for c in changes)]
        if dry_run:  # nothing was modified: leaving the block writes nothing
            if len(changes) > limit:
                lines.append(f"over the change limit of {limit}: a real run needs --force")
            lines.append("dry run: nothing written")
            return "\n".join(lines)
        if len(changes) > limit and not force:
            raise WebstatsError(
                f"packages sync: {len(changes)} changes exceed the change limit of {limit} "
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
    lines.append("applied" if changes else "nothing to change")
    return "\n".join(lines)
