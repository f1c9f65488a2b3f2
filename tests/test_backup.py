"""Backups and restores through the CLI, on real PostgreSQL and SQLite: a backup, the data
lost, a restore gives the same statistics and the same published bytes under new validators;
pg_dump of the wrong major version, a full disk, a file that is not a backup: one line."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa

import webref
from bioc_webstats import backup, create_app
from bioc_webstats.config import load_settings
from bioc_webstats.errors import WebstatsError
from bioc_webstats.publish import publish
from bioc_webstats.store import db

CLI = str(Path(sys.executable).parent / "bioc-webstats")
VT = dt.date(2024, 3, 31)
FILES = ("bioc/bioc_pkg_stats.tab", "bioc/affy/affy_stats.tab", "index.html", "bioc/affy/")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], env=dict(os.environ), capture_output=True, text=True, timeout=300
    )


def served(settings) -> dict[str, tuple[bytes, str]]:
    client = create_app(settings).test_client()
    out = {}
    for rel in FILES:
        r = client.get("/packages/stats/" + rel)
        assert r.status_code == 200, rel
        out[rel] = (r.data, r.headers["ETag"])
    return out


def lose_everything(url: str) -> None:
    with db.session_factory(url)() as s:
        for table in ("package_stats", "category_stats", "download_records", "packages", "meta"):
            s.execute(sa.text(f"DELETE FROM {table}"))
        s.commit()


def test_backup_lose_restore_same_bytes(db_url, clean_env, monkeypatch, aws_env):
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    with db.session_factory(db_url)() as s:
        webref.load_direct(s, valid_thru=VT)
    settings = load_settings()
    publish(settings)
    before = served(settings)
    boto3.client("s3").create_bucket(Bucket="bioc-webstats-backups")
    dump = clean_env / "backups" / "webstats.dump"
    # a bucket that is not there: one line, the local dump kept
    res = run("db", "backup", str(dump), "--s3", "s3://no-such-bucket-here/prod")
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "upload to s3://no-such-bucket-here/prod/webstats.dump failed: " in res.stderr
    assert "NoSuchBucket" in res.stderr and dump.is_file()
    res = run("db", "backup", str(dump), "--s3", "s3://bioc-webstats-backups/bioc-webstats/prod")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"backup: {dump} (") and "uploaded to s3://" in res.stdout
    assert stat.S_IMODE(dump.stat().st_mode) == 0o600
    key = f"bioc-webstats/prod/{dump.name}"
    head = boto3.client("s3").head_object(Bucket="bioc-webstats-backups", Key=key)
    assert head["ContentLength"] == dump.stat().st_size

    lose_everything(db_url)
    assert create_app(settings).test_client().get("/packages/stats/bioc/affy/").status_code == 404

    # from S3, as playbooks/restore.yml may (fetched into the state directory, then removed)
    state = load_settings().state_dir
    res = run("db", "restore", "s3://bioc-webstats-backups/bioc-webstats/prod/missing.dump")
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "cannot fetch s3://bioc-webstats-backups/bioc-webstats/prod/missing.dump" in res.stderr
    res = run("db", "restore", f"s3://bioc-webstats-backups/{key}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith("restore: ")
    assert not list(state.glob("restore-*")), "the fetched backup was left behind"
    assert "publish: data version" in res.stdout
    after = served(settings)
    for rel in FILES:
        assert after[rel][0] == before[rel][0], rel  # the same bytes
        assert after[rel][1] != before[rel][1], rel  # never the validators of before


def test_not_a_backup_is_one_line_and_changes_nothing(db_url, clean_env, monkeypatch):
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    with db.session_factory(db_url)() as s:
        webref.load_direct(s, valid_thru=VT)
    junk = clean_env / "junk.dump"
    junk.write_bytes(b"not a dump at all\n" * 100)
    res = run("db", "restore", str(junk))
    assert res.returncode == 1
    [line] = res.stderr.splitlines()
    assert "is not a" in line and str(junk) in line
    res = run("db", "restore", str(clean_env / "missing.dump"))
    assert res.returncode == 1 and "no such file" in res.stderr
    res = run("db", "restore", str(clean_env))  # a directory exists: not "no such file"
    assert res.stderr == f"bioc-webstats: error: restore: {clean_env}: not a regular file\n"
    with db.session_factory(db_url)() as s:
        assert db.get_valid_thru(s) == VT


def test_a_backup_of_the_other_kind_of_database_is_named_so(db_url, clean_env, monkeypatch):
    """A PostgreSQL dump restored with an SQLite configuration (or the other way round) was
    "not a bioc-webstats backup (file is not a database)": it is one, of the other kind."""
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    other = clean_env / "other.dump"
    sqlite = db_url.startswith("sqlite")
    other.write_bytes(b"PGDMP\x01\x0e\x00" if sqlite else b"SQLite format 3\x00" + b"\x00" * 84)
    res = run("db", "restore", str(other))
    ours, theirs = (
        ("SQLite", "PostgreSQL (pg_dump)") if sqlite else ("PostgreSQL (pg_dump)", "SQLite")
    )
    assert res.returncode == 1
    assert res.stderr == (
        f"bioc-webstats: error: restore: {other} is a backup of a {theirs} database; this "
        f"configuration's database is {ours}: restore it where the backup was taken\n"
    )


def test_a_backup_this_user_may_not_read_is_not_called_bad(
    db_url, clean_env, monkeypatch, tmp_path
):
    """A root-only copy (the runbook's "copy it to /tmp first", done as root) restored as the
    service user: "is not a pg_dump archive" sent SysAdmins to throw good backups away."""
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    locked = tmp_path / "not-ours.dump"
    locked.write_bytes(b"whatever it holds")
    locked.chmod(0o600)
    os.chown(locked, 65534, 65534)  # another user's: root reads it only by its capabilities
    blind = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
             "--bounding-set=-dac_override,-dac_read_search"]  # fmt: skip
    res = subprocess.run(
        [*blind, CLI, "db", "restore", str(locked)], env=dict(os.environ),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr == f"bioc-webstats: error: restore: {locked}: Permission denied\n"


def test_a_backup_fetched_onto_a_disk_that_refuses_says_where(aws_env, tmp_path):
    """s3transfer's error of a full (here: a name taken by a directory) disk names no path:
    'bioc-webstats: error: No space left on device' said neither what nor where."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="fetch-test")
    s3.put_object(Bucket="fetch-test", Key="prod/webstats.dump", Body=b"dump")
    work = tmp_path / "restore-1"
    (work / "webstats.dump").mkdir(parents=True)  # where the download goes
    with pytest.raises(WebstatsError) as exc:
        backup.fetch("s3://fetch-test/prod/webstats.dump", work)
    assert str(exc.value).startswith(
        f"restore: cannot fetch s3://fetch-test/prod/webstats.dump into {work}: "
    )


def test_the_error_line_of_pg_restore_is_the_reason_given():
    """pg_restore and pg_dump print their error, then a detail or the command that failed:
    the last line ('Command was: ALTER TABLE …') was given as the reason, not 'must be owner'."""
    from bioc_webstats.backup import _last_line

    stderr = (
        "pg_restore: error: could not execute query: ERROR:  must be owner of table packages\n"
        "Command was: ALTER TABLE IF EXISTS ONLY public.packages DROP CONSTRAINT packages_pkey;\n"
    )
    assert _last_line(stderr) == (
        "pg_restore: error: could not execute query: ERROR:  must be owner of table packages"
    )
    dump = "pg_dump: error: query failed: ERROR:  permission denied for table intruder\n"
    assert _last_line(dump + "pg_dump: detail: Query was: LOCK TABLE public.intruder\n") == (
        dump.strip()
    )
    assert _last_line("could not connect\n\n") == "could not connect"
    assert _last_line("") == "no output"


def test_pg_dump_must_match_the_server(pg_server, tmp_path, monkeypatch):
    major = backup.server_major(pg_server + "/postgres")
    assert backup.client_tool("pg_dump", major)  # the host's own fits
    with pytest.raises(WebstatsError, match=f"install postgresql-client-{major + 50}"):
        backup.client_tool("pg_dump", major + 50)
    # only an old client on PATH: refused before anything is written
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "pg_dump").write_text("#!/bin/sh\necho 'pg_dump (PostgreSQL) 9.6.24'\n")
    (fake / "pg_dump").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    monkeypatch.setattr(backup, "PG_LIB", tmp_path / "no-versioned-clients")
    with pytest.raises(WebstatsError, match=r"pg_dump 9 cannot handle a PostgreSQL \d+ server"):
        backup.client_tool("pg_dump", major)


def test_backup_refuses_a_disk_without_room(pg_server, clean_env, monkeypatch):
    from conftest import new_pg_database

    url = new_pg_database(pg_server)
    db.upgrade(url)
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", url)
    # a real small filesystem (1 MiB of tmpfs; the tests run as root) under a database of
    # several MiB
    small = clean_env / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", small], check=True)
    try:
        dest = small / "b" / "x.dump"
        with pytest.raises(
            WebstatsError, match=r"has [01] MiB free, a dump of this \d+ MiB database needs about"
        ):
            backup.backup(load_settings(), dest)
        assert list(small.rglob("*")) in ([], [small / "b"])  # no partial dump left
    finally:
        subprocess.run(["umount", small], check=True)


def test_backup_needs_room_for_a_dump_not_for_the_database(pg_server, clean_env, monkeypatch):
    """The check asked for the whole database's size: once the history and a year of logs
    outgrew the instance's free disk, every migrating deploy failed at its backup, though the
    dump is about a fifth of the database."""
    from conftest import new_pg_database

    url = new_pg_database(pg_server)
    db.upgrade(url)
    with db.get_engine(url).begin() as conn:  # 400,000 download records of random clients
        conn.execute(
            sa.text(
                "INSERT INTO download_records (object_id, category, package, day, ip_hash, "
                "downloads) SELECT i / 1000, 'bioc', 'pkg' || (i % 300), "
                "DATE '2024-01-01' + (i % 365), (random() * 9e18)::bigint, 1 "
                "FROM generate_series(1, 400000) AS i"
            )
        )
        size = conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar()
    db.dispose_engine(url)
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", url)
    room = size // 2**20 * 2 // 3  # MiB: less than the database, more than a third of it
    small = clean_env / "small"
    small.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={room}m,mode=0700", "tmpfs", small], check=True
    )
    try:
        assert shutil.disk_usage(small).free < size
        dest = small / "x.dump"
        done = backup.backup(load_settings(), dest)
        assert dest.read_bytes()[:5] == b"PGDMP" and done.size < size // 3, (done.size, size)
        # an earlier dump twice as large as the room left asks for more than a third
        dest.rename(small / "pre-0.0.1-20260101T000000Z.dump")
        with (small / "pre-0.0.1-20260101T000000Z.dump").open("ab") as fh:
            fh.write(b"\0" * (shutil.disk_usage(small).free // 2 + 2**20))
        # (a newer file of that suffix that is no dump does not hide it)
        (small / "notes.dump").write_text("not a dump\n")
        with pytest.raises(WebstatsError, match=r"needs about \d+ MiB: free some space"):
            backup.backup(load_settings(), small / "y.dump")
        assert sorted(p.name for p in small.iterdir()) == [
            "notes.dump",
            "pre-0.0.1-20260101T000000Z.dump",
        ]
    finally:
        subprocess.run(["umount", small], check=True)


def test_a_destination_that_is_no_regular_file_is_left_alone(db_url, clean_env, monkeypatch):
    """`db backup /dev/null` (or a FIFO) replaced the device node with the dump: refused, one
    line, the node as it was."""
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    db.upgrade(db_url)
    fifo = clean_env / "fifo"
    os.mkfifo(fifo)
    null = clean_env / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers (as root)
    for node in (fifo, null):
        before = node.lstat()
        res = run("db", "backup", str(node))
        assert res.returncode == 1, res
        assert res.stderr.strip().splitlines() == [
            f"bioc-webstats: error: backup: {node} exists and is not a regular file: choose another"
        ], res.stderr
        after = node.lstat()
        assert (after.st_mode, after.st_rdev, after.st_ino) == (
            before.st_mode, before.st_rdev, before.st_ino
        )  # fmt: skip
    assert sorted(p.name for p in clean_env.iterdir() if p.name.startswith(".")) == []


def test_a_destination_that_cannot_be_made_is_one_line(db_url, clean_env, monkeypatch):
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    db.upgrade(db_url)
    blocker = clean_env / "a-file"
    blocker.write_text("not a directory\n")
    res = run("db", "backup", str(blocker / "backups" / "x.dump"))
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"bioc-webstats: error: backup: cannot create {blocker / 'backups'}: Not a directory"
    ], res.stderr
    assert blocker.read_text() == "not a directory\n"


def test_a_file_that_is_no_backup_is_not_replaced(db_url, clean_env, monkeypatch):
    """A typo in the path (a log, a config file) is not overwritten by a dump; a bad --s3 is
    refused before anything is dumped."""
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    db.upgrade(db_url)
    notes = clean_env / "notes.txt"
    notes.write_text("keep me\n")
    res = run("db", "backup", str(notes))
    assert res.returncode == 1
    assert res.stderr == (
        f"bioc-webstats: error: backup: {notes} exists and is not a backup: choose another file\n"
    )
    assert notes.read_text() == "keep me\n"
    dest = clean_env / "new.dump"
    res = run("db", "backup", str(dest), "--s3", "notaurl")
    assert (res.returncode, res.stderr) == (
        1, "bioc-webstats: error: --s3 must be s3://bucket/prefix, got 'notaurl'\n"
    )  # fmt: skip
    assert not dest.exists()
    assert run("db", "backup", str(dest)).returncode == 0  # a backup replaces a backup
    assert run("db", "backup", str(dest)).returncode == 0


def test_a_failed_backup_keeps_the_earlier_one(db_url, clean_env, monkeypatch):
    """The dump goes beside the destination and is renamed over it once complete: a dump that
    fails (here its file cannot be opened) leaves the earlier backup as it was."""
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    db.upgrade(db_url)
    dest = clean_env / "b" / "webstats.dump"
    dest.parent.mkdir()
    dest.write_bytes(b"PGDMP yesterday's backup\n")
    (dest.parent / f".{dest.name}.partial-{os.getpid()}").mkdir()  # the dump cannot be written
    with pytest.raises(WebstatsError) as err:
        backup.backup(load_settings(), dest)
    assert "\n" not in str(err.value) and dest.name in str(err.value)
    assert dest.read_bytes() == b"PGDMP yesterday's backup\n"
    (dest.parent / f".{dest.name}.partial-{os.getpid()}").rmdir()
    done = backup.backup(load_settings(), dest)  # then a good one replaces it, 0600
    assert done.size == dest.stat().st_size > 100
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no partial file left


def sqlite_site(where: Path, monkeypatch) -> Path:
    """An SQLite database of the reference data, the configuration's: its file."""
    live = where / "webstats.sqlite3"
    url = f"sqlite:///{live}"
    db.upgrade(url)
    with db.session_factory(url)() as s:
        webref.load_direct(s, valid_thru=VT)
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", url)
    return live


def test_sqlite_backup_refuses_the_database_itself(clean_env, monkeypatch):
    live = sqlite_site(clean_env, monkeypatch)
    before = live.read_bytes()
    mode = stat.S_IMODE(live.stat().st_mode)
    res = run("db", "backup", str(live))
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        f"bioc-webstats: error: backup: {live} is the database itself: choose another file"
    ]
    assert live.read_bytes() == before and stat.S_IMODE(live.stat().st_mode) == mode


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_restore_refuses_a_database_that_is_no_backup_of_ours(
    kind, clean_env, monkeypatch, request, tmp_path
):
    """A valid SQLite file or pg_dump archive of another database (one table named meta) is
    refused with one line before anything is replaced: the live data stays."""
    from conftest import new_pg_database

    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'live.sqlite3'}"
        other = tmp_path / "other.sqlite3"
        with sqlite3.connect(other) as conn:
            conn.execute("CREATE TABLE meta (x)")
        conn.close()
    else:
        base = request.getfixturevalue("pg_server")
        url = new_pg_database(base)
        foreign = new_pg_database(base)
        engine = sa.create_engine(foreign)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE meta (x int)"))
            conn.execute(sa.text("INSERT INTO meta VALUES (1)"))
        engine.dispose()
        other = tmp_path / "other.dump"
        u = sa.engine.make_url(foreign)
        subprocess.run(
            ["pg_dump", "--format=custom", f"--file={other}", "-h", u.host, "-p", str(u.port),
             "-U", u.username, u.database],
            env={**os.environ, "PGPASSWORD": u.password or ""}, check=True,
        )  # fmt: skip
    db.upgrade(url)
    with db.session_factory(url)() as s:
        webref.load_direct(s, valid_thru=VT)
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", url)
    res = run("db", "restore", str(other))
    assert res.returncode == 1
    [line] = res.stderr.splitlines()
    assert f"restore: {other} is not a" in line, line
    with db.session_factory(url)() as s:
        assert db.get_valid_thru(s) == VT
    db.dispose_engine(url)


def test_a_backup_older_than_the_schema_restores_and_migrates(pg_server, clean_env, monkeypatch):
    """The deploy's pre-migration dump, restored after the migration: pg_restore --clean drops
    only what the archive names, so the newer migrations' tables and function stayed, and the
    migration after the restore failed ("already exists") with the restore committed: the
    schema behind, the web down. They are dropped and made again."""
    from alembic import command

    from conftest import new_pg_database

    old = new_pg_database(pg_server)
    cfg = db._alembic_config(old)
    with db.get_engine(old).begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    db.dispose_engine(old)
    dump = clean_env / "pre-0004.dump"
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", old)
    res = run("db", "backup", str(dump))
    assert res.returncode == 0, res.stderr
    live = new_pg_database(pg_server)
    db.upgrade(live)
    with db.session_factory(live)() as s:
        webref.load_direct(s, valid_thru=VT)
    with db.get_engine(live).begin() as conn:  # its name went unescaped into the DROP
        conn.execute(sa.text('CREATE TABLE public."we""ird" (x int)'))
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", live)
    res = run("db", "restore", str(dump))
    assert res.returncode == 0, res.stderr
    assert "dropped what its schema has not yet: " in res.stdout and "stats_seen" in res.stdout
    assert 'we"ird' in res.stdout
    assert f"schema at revision {db.head_revision()}" in res.stdout
    assert db.current_revision(live) == db.head_revision()
    with db.session_factory(live)() as s:
        assert s.execute(sa.text("SELECT count(*) FROM download_records")).scalar() == 0
    db.dispose_engine(live)


def test_no_migration_runs_between_the_restore_and_its_drop(pg_server, clean_env, monkeypatch):
    """A deploy's `db upgrade` during `db restore`: between pg_restore and the drop of what the
    backup's schema lacks, a migration would have made tables the drop then removed, under a
    revision that claims them. The restore holds the migration lock across both."""
    from conftest import new_pg_database

    url = new_pg_database(pg_server)
    db.upgrade(url)
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", url)
    dump = clean_env / "x.dump"
    backup.backup(load_settings(), dump)
    seen = []
    drop = backup._drop_what_the_backup_lacks

    def checked(database_url: str, toc: str) -> list[str]:
        with db.get_engine(database_url).connect() as other:  # as a migration would try it
            got = other.execute(
                sa.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": db.MIGRATE_LOCK}
            ).scalar()
            other.rollback()
        seen.append(got)
        return drop(database_url, toc)

    monkeypatch.setattr(backup, "_drop_what_the_backup_lacks", checked)
    assert backup.restore(load_settings(), dump).startswith("restore: ")
    assert seen == [False]
    with db.get_engine(url).connect() as conn:  # released after it
        assert conn.execute(
            sa.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": db.MIGRATE_LOCK}
        ).scalar()
    db.dispose_engine(url)


def _damage(path: Path, table: str) -> None:
    """Garbage over one page of ``table``'s b-tree: the file still opens, its schema and the
    other tables read, and the damage shows when that table is read (or checked)."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the page in the file, not the WAL
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,))
        root = root.fetchone()[0]
    with path.open("r+b") as f:
        f.seek((root - 1) * page_size + 8)
        f.write(os.urandom(page_size - 16))


def test_a_damaged_sqlite_file_is_neither_restored_nor_backed_up(clean_env, monkeypatch):
    """A page-by-page copy takes a damaged SQLite file as it is: a damaged backup was restored
    (exit 0, then every command failed "database disk image is malformed"), and a backup of a
    damaged database replaced a good one of the same name. SQLite's quick_check refuses both."""
    live = sqlite_site(clean_env, monkeypatch)
    good = clean_env / "webstats.dump"
    assert run("db", "backup", str(good)).returncode == 0
    damaged = clean_env / "damaged.dump"
    shutil.copyfile(good, damaged)
    _damage(damaged, "package_stats")
    before = live.read_bytes()
    res = run("db", "restore", str(damaged))
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res.stderr
    assert f"restore: {damaged} is damaged (" in res.stderr and "nothing was changed" in res.stderr
    assert live.read_bytes() == before
    # the live database damaged: its backup is refused and the good one of that name is kept
    kept = good.read_bytes()
    _damage(live, "package_stats")
    res = run("db", "backup", str(good))
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res.stderr
    assert f"backup: the database {live} is damaged (" in res.stderr, res.stderr
    assert f"{good} was not written" in res.stderr
    assert good.read_bytes() == kept
    assert [p.name for p in clean_env.iterdir() if ".partial-" in p.name] == []
