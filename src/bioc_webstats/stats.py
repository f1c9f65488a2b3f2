"""Monthly and yearly statistics from the download records; the data version."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.orm import Session

from .config import Settings
from .errors import WebstatsError


def recompute_packages(session: Session, packages: Iterable[tuple[str, str]]) -> None:
    """Recompute every month and year of the given (category, package) pairs."""
    # Filled in by the ETL work; a table change with no records yet has nothing to recompute.


def rebuild(settings: Settings) -> str:
    """Recompute all statistics from the stored records."""
    raise WebstatsError("stats rebuild is not implemented yet")
