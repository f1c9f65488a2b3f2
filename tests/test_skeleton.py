"""The package installs, migrates on both databases and answers /healthz."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bioc_webstats import __version__, create_app
from bioc_webstats.config import load_settings
from bioc_webstats.store import db


def test_upgrade_is_idempotent_and_check_passes(db_url):
    head = db.head_revision()
    assert db.current_revision(db_url) == head
    assert db.upgrade(db_url) == head  # second run: nothing to do
    assert db.current_revision(db_url) == head


def test_healthz_ok_on_empty_database(db_url, clean_env, monkeypatch):
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    client = create_app(load_settings()).test_client()
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json == {
        "status": "ok",
        "version": __version__,
        "database": True,
        "schema": db.head_revision(),
        "valid_thru": None,
        "stale": False,  # ours, beside the contract's five (operations.md: says when stale)
    }


def test_healthz_503_when_schema_missing(clean_env, monkeypatch):
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", f"sqlite:///{clean_env / 'empty.db'}")
    resp = create_app(load_settings()).test_client().get("/healthz")
    assert resp.status_code == 503
    assert resp.json["status"] == "error" and resp.json["schema"] is None


def test_cli_check_fails_with_one_line_before_upgrade(clean_env):
    env = {
        "PATH": "/usr/bin:/bin",
        "WEBSTATS_ENV_FILE": str(clean_env / "none.env"),
        "WEBSTATS_DATABASE_URL": f"sqlite:///{clean_env / 'c.db'}",
    }
    exe = str(Path(sys.executable).parent / "bioc-webstats")
    r = subprocess.run([exe, "check"], env=env, capture_output=True, text=True)
    assert r.returncode == 3  # the schema is behind: `db upgrade` is the fix (the deploy migrates)
    assert r.stderr.count("\n") == 1 and "db upgrade" in r.stderr
    r = subprocess.run([exe, "db", "upgrade"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe, "check"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ok:")
