"""A release rolled back after its successor migrated keeps running (expand-only migrations),
unless the newer schema raised the floor above it."""

from __future__ import annotations

import sqlalchemy as sa

from bioc_webstats import create_app
from bioc_webstats.config import load_settings
from bioc_webstats.store import db


def _stamp(url: str, revision: str, floor: str | None = None) -> None:
    with db.get_engine(url).begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
        if floor is not None:
            conn.execute(
                sa.text("INSERT INTO meta (key, value) VALUES ('schema_floor', :f)"), {"f": floor}
            )


def _next(rev: str) -> str:
    return f"{int(rev) + 1:04d}"


def test_head_is_ok(db_url):
    status = db.schema_status(db_url)
    assert status.ok and status.revision == db.head_revision()


def test_newer_schema_is_compatible_by_default(db_url, clean_env, monkeypatch):
    newer = _next(db.head_revision())
    _stamp(db_url, newer)
    status = db.schema_status(db_url)
    assert status.ok and status.revision == newer and "compatible" in status.reason
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    resp = create_app(load_settings()).test_client().get("/healthz")
    assert resp.status_code == 200 and resp.json["schema"] == newer


def test_floor_above_this_release_refuses(db_url, clean_env, monkeypatch):
    newer = _next(db.head_revision())
    _stamp(db_url, newer, floor=newer)
    status = db.schema_status(db_url)
    assert not status.ok and "deploy a newer release" in status.reason
    assert not status.behind  # db upgrade cannot fix it: `check` exits 1, not 3
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    resp = create_app(load_settings()).test_client().get("/healthz")
    assert resp.status_code == 503


def test_older_schema_needs_upgrade(db_url):
    _stamp(db_url, "0001")
    status = db.schema_status(db_url)
    assert not status.ok and "db upgrade" in status.reason
    assert status.behind


def _migrate(url: str, target: str) -> None:
    from alembic import command

    cfg = db._alembic_config(url)
    with db.get_engine(url).begin() as conn:
        cfg.attributes["connection"] = conn
        if target == "head":
            command.upgrade(cfg, target)
        else:
            command.downgrade(cfg, target)


def test_records_keep_through_0004_and_back(db_url):
    """0004 drops download_records.id: the records survive it, its downgrade and a new upgrade;
    a record written by the release before it (which names no id) still goes in."""
    cols = "object_id, category, package, day, ip_hash, downloads"
    rows = "(1, 'bioc', 'limma', '2024-01-30', 42, 3), (1, 'bioc', 'affy', '2024-01-31', -7, 1)"
    with db.get_engine(db_url).begin() as conn:
        conn.execute(sa.text(f"INSERT INTO download_records ({cols}) VALUES {rows}"))
    _migrate(db_url, "0003")
    with db.get_engine(db_url).begin() as conn:
        ids = conn.execute(sa.text("SELECT id FROM download_records ORDER BY id")).scalars().all()
        assert len(ids) == 2 and len(set(ids)) == 2
        conn.execute(sa.text(f"INSERT INTO download_records ({cols}) VALUES (2, 'bioc', 'x', "
                             "'2024-02-01', 1, 1)"))  # fmt: skip
    _migrate(db_url, "head")
    with db.get_engine(db_url).begin() as conn:
        names = [c["name"] for c in sa.inspect(conn).get_columns("download_records")]
        assert "id" not in names
        total = conn.execute(sa.text("SELECT sum(downloads) FROM download_records")).scalar()
        assert total == 5
        conn.execute(sa.text(f"INSERT INTO download_records ({cols}) VALUES (3, 'bioc', 'y', "
                             "'2024-02-01', 1, 1)"))  # fmt: skip
