"""The packages table: load it from a CSV, sync it from Bioconductor's own files."""

from __future__ import annotations

import csv
import re
from pathlib import Path

from sqlalchemy import select

from . import db
from .categories import BY_PREFIX
from .config import Settings
from .errors import WebstatsError
from .models import Package

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
        if touched:
            from .stats import recompute_packages

            recompute_packages(session, touched)
    return f"packages: {len(rows)} rows read, {added} added, {updated} updated"


def sync(settings: Settings, source: str | None, dry_run: bool, force: bool) -> str:
    """Sync from ``config.yaml`` and the devel ``PACKAGES`` files (see etl.md)."""
    raise WebstatsError("packages sync is not implemented yet")
