"""The Flask application: /packages/stats/… and /healthz."""

from __future__ import annotations

from flask import Flask, jsonify

from . import __version__, db
from .config import Settings, load_settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app from the effective configuration (loaded once per process)."""
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config["WEBSTATS"] = settings

    @app.get("/healthz")
    def healthz():
        body = {
            "status": "error",
            "version": __version__,
            "database": False,
            "schema": None,
            "valid_thru": None,
        }
        try:
            revision = db.current_revision(settings.database_url)
            body["database"] = True
            body["schema"] = revision
            if revision == db.head_revision():
                with db.session_factory(settings.database_url)() as session:
                    vt = db.get_valid_thru(session)
                body["valid_thru"] = vt.isoformat() if vt else None
                body["status"] = "ok"
        except Exception:
            app.logger.warning("healthz: database check failed", exc_info=True)
        return jsonify(body), 200 if body["status"] == "ok" else 503

    return app
