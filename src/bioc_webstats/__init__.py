"""bioc-webstats: download statistics of Bioconductor packages."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.3.27"

if TYPE_CHECKING:
    from flask import Flask


def create_app(settings: Any = None) -> Flask:
    """The WSGI application factory: ``gunicorn 'bioc_webstats:create_app()'``."""
    from .web.app import create_app as _create_app

    return _create_app(settings)
