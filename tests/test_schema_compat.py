"""A release rolled back after its successor migrated keeps running (expand-only migrations),
unless the newer schema raised the floor above it."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from bioc_webstats import create_app
from bioc_webstats.config import load_settings
from bioc_webstats.store import db, stats

PACKAGES = Path(__file__).parent / "fixtures" / "packages_sample.csv"


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


def _cli(*args: str, url: str, state_dir=None):
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "bioc-webstats")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBSTATS_")}
    env |= {"WEBSTATS_DATABASE_URL": url, "WEBSTATS_ENV_FILE": "/dev/null"}
    if state_dir is not None:
        env["WEBSTATS_STATE_DIR"] = str(state_dir)
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=120)


def test_db_upgrade_leaves_a_newer_schema_and_names_a_foreign_one(db_url):
    """`db upgrade` by hand on a later release's schema (a rollback) does nothing and says so;
    a revision no release knows, or two rows in alembic_version, is one line, not alembic's
    traceback."""
    newer = _next(db.head_revision())
    _stamp(db_url, newer)
    res = _cli("db", "upgrade", url=db_url)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"schema at revision {newer}\n"
    _stamp(db_url, newer, floor=newer)
    res = _cli("db", "upgrade", url=db_url)
    assert res.returncode == 1 and "deploy a newer release" in res.stderr
    assert len(res.stderr.splitlines()) == 1
    with db.get_engine(db_url).begin() as conn:
        conn.execute(sa.text("DELETE FROM meta WHERE key = 'schema_floor'"))
    _stamp(db_url, "zzz")
    res = _cli("db", "upgrade", url=db_url)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.splitlines() == [
        "bioc-webstats: error: db upgrade: Can't locate revision identified by 'zzz'"
    ]
    with db.get_engine(db_url).begin() as conn:
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('0001')"))
    res = _cli("check", url=db_url)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert "the database's schema revision:" in res.stderr
    db.dispose_engine(db_url)


def test_a_schema_stamped_older_than_it_is_fails_the_upgrade_in_one_line(db_url):
    """alembic_version edited by hand to an older revision: the migration after it finds the
    schema other than it expects (SQLite: a 73-line traceback); nothing is changed."""
    _stamp(db_url, "0003")
    res = _cli("db", "upgrade", url=db_url)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    [line] = res.stderr.splitlines()
    assert line.startswith("bioc-webstats: error: "), line
    assert "pk_download_records" in line, line
    assert db.current_revision(db_url) == "0003"
    db.dispose_engine(db_url)


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


def test_0005_upgrades_a_populated_0004_database(db_url, tmp_path):
    """A database at 0004 with records and statistics (written in part by the release before
    0005) is upgraded: the backfilled seen-sets carry the next days' increments to exactly
    what a rebuild from the records gives. The downgrade keeps records and statistics."""
    import datetime as dt

    import loggen
    from bioc_webstats.etl import ingest
    from test_ingest import assert_truth, loaded
    from test_stats import assert_rebuild_agrees, day_files, derived, feed, old_release_recompute

    staging, source = tmp_path / "staging", tmp_path / "logs"
    source.mkdir()
    start = dt.date(2024, 6, 29)
    truth = loggen.generate(staging, days=4, start=start, files_per_day=2, lines_per_file=150)
    settings = loaded(db_url, tmp_path)
    for d in range(2):
        feed(staging, source, day_files(staging, truth, start + dt.timedelta(days=d)))
    assert ingest.run(settings, source=str(source))
    before = derived(db_url)

    _migrate(db_url, "0004")
    with db.get_engine(db_url).begin() as conn:
        tables = set(sa.inspect(conn).get_table_names())
        assert not tables & {"stats_seen", "stats_seen_category", "stats_seen_packages",
                             "record_months"}  # fmt: skip
        cols = {c["name"] for c in sa.inspect(conn).get_columns("ingested_objects")}
        assert "counted_at" not in cols
        kept = conn.execute(sa.text("SELECT count(*) FROM package_stats")).scalar()
        assert kept == len(before["package_stats"])
        # The release before 0005 stores an object of its own (names only its columns): a
        # known package in 2023, one not in the table, a workflows download of 2014.
        conn.execute(sa.text(
            "INSERT INTO ingested_objects (key, size, name_hour, lines_read, accepted, "
            "rejected, ingested_at) VALUES ('E1.2023-11-02-10.old.gz', 1, '2023-11-02 10:00:00',"
            " 4, 4, 0, '2024-07-01 00:00:00')"
        ))  # fmt: skip
        obj = conn.execute(sa.text("SELECT max(id) FROM ingested_objects")).scalar()
        wf = next(p for p, c in loggen.read_packages() if c == "workflows")
        rows = [("bioc", "affy", "2023-11-02", 11, 2), ("bioc", "affy", "2023-11-02", 12, 1),
                ("bioc", "NotAPackage", "2023-11-02", 11, 1),
                ("workflows", wf, "2014-12-31", 11, 1)]  # fmt: skip
        for cat, pkg, day, h, n in rows:
            conn.execute(
                sa.text(
                    "INSERT INTO download_records (object_id, category, package, day, ip_hash, "
                    "downloads) VALUES (:o, :c, :p, :d, :h, :n)"
                ),
                {"o": obj, "c": cat, "p": pkg, "d": day, "h": h, "n": n},
            )
    old_release_recompute(db_url)

    _migrate(db_url, "head")
    after = derived(db_url)
    assert after["uncounted"] == 0 and after["stats_seen"] and after["record_months"]
    with db.session_factory(db_url)() as s:
        assert db.get_meta(s, "seen_version") == str(db.get_data_version(s))
    for d in range(2, 4):
        feed(staging, source, day_files(staging, truth, start + dt.timedelta(days=d)))
        assert ingest.run(settings, source=str(source))
    pkg = {r[:4]: r[4:] for r in derived(db_url)["package_stats"]}
    assert pkg[("bioc", "affy", 2023, 11)] == (2, 3)
    assert not any(k[0] == "workflows" and k[2] == 2014 for k in pkg)
    assert_rebuild_agrees(db_url, settings)
    with db.session_factory(db_url).begin() as s:  # the object of the old release goes
        s.execute(sa.text("DELETE FROM download_records WHERE day < '2024-01-01'"))
        s.execute(sa.text("DELETE FROM ingested_objects WHERE key LIKE '%old.gz'"))
    stats.rebuild(settings)
    assert_truth(db_url, truth)


HINT = (
    "(the schema is missing or older than this release? 'bioc-webstats check' tells; "
    "'bioc-webstats db upgrade' fixes it)"
)


def test_a_command_before_db_upgrade_says_to_run_it(tmp_path, pg_server):
    from conftest import new_pg_database

    for url in (f"sqlite:///{tmp_path / 'empty.sqlite3'}", new_pg_database(pg_server)):
        res = _cli("stats", "rebuild", url=url, state_dir=tmp_path / "state")
        assert res.returncode == 1
        [line] = res.stderr.splitlines()
        assert line.startswith("bioc-webstats: error: database: ")
        assert line.endswith(HINT), line
        res = _cli("status", url=url)
        assert res.returncode == 1
        assert res.stderr.splitlines() == [
            f"bioc-webstats: error: database: no schema yet, this release needs "
            f"{db.head_revision()}: run 'bioc-webstats db upgrade'"
        ]
        db.dispose_engine(url)


def test_a_command_on_a_schema_behind_the_release_says_so(tmp_path, pg_server):
    """A release installed, its migration not run yet: a missing column gave the database's
    error with no hint (PostgreSQL) or "no schema yet?", and status said nothing of it."""
    from conftest import new_pg_database

    logs = tmp_path / "logs"
    logs.mkdir()
    for url in (f"sqlite:///{tmp_path / 'old.sqlite3'}", new_pg_database(pg_server)):
        _at(url, "0004")
        db.dispose_engine(url)
        for args in (["packages", "load", str(PACKAGES)], ["etl", "run", "--source", str(logs)]):
            res = _cli(*args, url=url, state_dir=tmp_path / "state")
            assert res.returncode == 1, (args, res.stderr)
            line = res.stderr.splitlines()[-1]
            assert line.startswith("bioc-webstats: error: database: ") and line.endswith(HINT)
        res = _cli("status", url=url)
        assert res.returncode == 0, res.stderr
        first = res.stdout.splitlines()[0]
        assert first.endswith(
            f"; database schema is at 0004, this release needs {db.head_revision()}: "
            "run 'bioc-webstats db upgrade'"
        ), first
        db.dispose_engine(url)


def _at(url: str, revision: str) -> None:
    from alembic import command

    cfg = db._alembic_config(url)
    with db.get_engine(url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def _connect(url: str, name: str):
    """A session outside the app's engines, named ``name`` (a psql session, say)."""
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg2.connect(
        host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database,
        application_name=name,
    )  # fmt: skip


def _lock_waiters(url: str) -> int:
    conn = _connect(url, "observer")
    try:
        cur = conn.cursor()
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        )
        return cur.fetchone()[0]
    finally:
        conn.close()


def test_two_upgrades_at_once_both_succeed(pg_server, tmp_path):
    """Two deploys, or a deploy and restore.yml (whose restore migrates too): the second
    waited for nothing and failed on a catalog row the first had just made."""
    import subprocess

    from conftest import new_pg_database, wait_for
    from killharness import EXE, cli_env

    url = new_pg_database(pg_server)
    _at(url, "0004")  # the release before the seen-sets: 0005 changes the ledger
    env = cli_env(url, tmp_path)
    # Both start their migration while the ledger is in use, then it is released: they run
    # at the same moment rather than one after the other by chance.
    holder = _connect(url, "holder")
    holder.cursor().execute("SELECT count(*) FROM ingested_objects")
    try:
        procs = [
            subprocess.Popen([EXE, "db", "upgrade"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]  # fmt: skip
        wait_for(lambda: _lock_waiters(url) == 2, 60, what="both upgrades to wait")
    finally:
        holder.rollback()
        holder.close()
    done = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in done] == [0, 0], done
    assert {out for _, out, _ in done} == {f"schema at revision {db.head_revision()}\n"}
    db.dispose_engine(url)


def test_an_upgrade_behind_a_table_in_use_stops_in_one_line_naming_it(pg_server, monkeypatch):
    """A long transaction on a table the migration changes (an ETL's, a psql session's): the
    upgrade waited without limit, and every session after it queued behind its lock."""
    import pytest
    from sqlalchemy.engine import make_url

    from bioc_webstats.errors import WebstatsError
    from conftest import new_pg_database

    url = new_pg_database(pg_server)
    _at(url, "0004")
    monkeypatch.setattr(db, "MIGRATE_LOCK_WAIT", "2s")
    monkeypatch.setattr(db, "MIGRATE_TRIES", 2)
    monkeypatch.setattr(db, "BLOCKER_POLL", 0.1)
    u = make_url(url)
    # sessions on a table the migration leaves alone, opened first (lower pids): not named
    readers = [_connect(url, f"reader {i}") for i in range(3)]
    for r in readers:
        r.cursor().execute("SELECT count(*) FROM meta")
    holder = _connect(url, "psql by hand")
    try:
        cur = holder.cursor()
        cur.execute("SELECT count(*) FROM ingested_objects")  # its transaction stays open
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
        with pytest.raises(WebstatsError) as err:
            db.upgrade(url)
        line = str(err.value)
        assert "\n" not in line
        assert line.startswith("db upgrade: the tables it changes stayed in use for 2 x 2s ")
        assert f"(held by pid {pid} {u.username} 'psql by hand'); nothing was changed" in line
        assert db.current_revision(url) == "0004"
    finally:
        for conn in (holder, *readers):
            conn.rollback()
            conn.close()
    assert db.upgrade(url) == db.head_revision()
    db.dispose_engine(url)


def test_sessions_are_named_by_their_command(pg_server, clean_env, monkeypatch):
    """pg_stat_activity names each session's command (what a waiting upgrade reports), never
    its arguments (every login sees the names)."""
    import pytest

    from bioc_webstats import cli
    from conftest import new_pg_database

    assert cli._command_path(["-v", "etl", "run", "--source", "/x"]) == ["etl", "run"]
    assert cli._command_path(["compare", "--against", "http://u:pw@h/"]) == ["compare"]
    assert cli._command_path(["import", "legacy-db", "a.sqlite"]) == ["import", "legacy-db"]
    url = new_pg_database(pg_server)
    monkeypatch.setattr(db, "APPLICATION_NAME", "bioc-webstats stats rebuild")
    db.upgrade(url)
    with db.get_engine(url).connect() as conn:
        name = conn.execute(sa.text("SELECT current_setting('application_name')")).scalar()
    assert name == "bioc-webstats stats rebuild"
    db.dispose_engine(url)
    # the CLI names its sessions so
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", url)
    with pytest.raises(SystemExit) as done:
        cli.main(["-v", "config", "show"])
    assert done.value.code in (0, None)
    assert db.APPLICATION_NAME == "bioc-webstats config show"
