"""``web warm``: after a statistics change the ETL builds the category files and the index and
repository pages into the web cache, so the web serves them without building."""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import loggen
from bioc_webstats import cli, create_app, db, ingest, stats
from bioc_webstats.web import StatsSite, build, category_targets, resolve
from bioc_webstats.webcache import DiskCache
from test_ingest import loaded
from webserver import run_gunicorn

HEAVY = "bioc/bioc_pkg_stats.tab"


@pytest.fixture
def logs_dir(tmp_path):
    out = tmp_path / "logs"
    loggen.generate(out, days=2, start=dt.date(2024, 3, 30), files_per_day=4, lines_per_file=200)
    return out


def fresh_build(settings, relpath: str) -> bytes:
    """The body the web would build now (its own session and snapshot, no cache)."""
    site = StatsSite(settings)
    try:
        version, vt = site.meta()
        snap = site.snapshot(version, vt)
        target = resolve(relpath)
        with site.session() as session:
            return build(session, target, snap).encode()
    finally:
        site.close()


def _warm_cli(monkeypatch, db_url, settings) -> SystemExit:
    """Run ``bioc-webstats web warm`` in-process with the test's configuration."""
    for k, v in {
        "WEBSTATS_DATABASE_URL": db_url,
        "WEBSTATS_STATE_DIR": str(settings.state_dir),
        "WEBSTATS_ENV_FILE": "/dev/null",
    }.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exc:
        cli.main(["web", "warm"])
    return exc.value


def test_etl_run_warms_and_the_web_serves_without_building(db_url, tmp_path, logs_dir, caplog):
    settings = loaded(db_url, tmp_path)
    caplog.set_level(logging.INFO)
    assert ingest.run(settings, source=str(logs_dir)) is True
    with db.session_factory(db_url)() as s:
        version = db.get_data_version(s)
    warmed = [r.message for r in caplog.records if r.message.startswith("web warm:")]
    assert len(warmed) == 1 and warmed[0].startswith(f"web warm: data version {version}, ")
    assert ", 0 already cached" in warmed[0]

    cache = DiskCache(settings.state_dir / "cache")
    site = StatsSite(settings)
    try:
        snap = site.snapshot(*site.meta())
    finally:
        site.close()
    targets = category_targets(snap)
    relpaths = {t.relpath for t in targets}
    # every category file and the index/repository pages, nothing per package
    assert {HEAVY, "index.html", "bioc/index.html", "workflows.html"} <= relpaths
    assert "bioc/bioc_2024_stats.tab" in relpaths and "bioc/bioc_2025_stats.tab" not in relpaths
    assert not [t for t in targets if t.package is not None]
    for rel in relpaths:
        path = cache.lookup(version, rel)
        assert path is not None, rel
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # as the web writes them

    path = cache.lookup(version, HEAVY)
    before = path.stat()
    expected = fresh_build(settings, HEAVY)
    assert len(expected.splitlines()) > 10
    assert path.read_bytes() == expected

    client = create_app(settings).test_client()
    resp = client.get("/packages/stats/" + HEAVY)
    assert resp.status_code == 200
    assert resp.data == expected
    after = path.stat()
    # not rebuilt: a build replaces the file (new inode) through a tmp file
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    page = client.get("/packages/stats/")
    assert page.data == cache.lookup(version, "index.html").read_bytes()


def test_warm_command_and_second_warm_builds_nothing(
    db_url, tmp_path, logs_dir, monkeypatch, capsys
):
    settings = loaded(db_url, tmp_path)
    ingest.run(settings, source=str(logs_dir))
    exc = _warm_cli(monkeypatch, db_url, settings)
    assert exc.code == 0
    out = capsys.readouterr().out
    assert ", 0 files built, " in out and " 0 already cached" not in out

    # the cache of this version removed: the command builds it all again
    cache = DiskCache(settings.state_dir / "cache")
    with db.session_factory(db_url)() as s:
        version = db.get_data_version(s)
    heavy = cache.lookup(version, HEAVY)
    heavy.unlink()
    exc = _warm_cli(monkeypatch, db_url, settings)
    assert exc.code == 0
    assert ", 1 files built, " in capsys.readouterr().out
    assert heavy.read_bytes() == fresh_build(settings, HEAVY)


def test_stats_rebuild_warms_the_new_version(db_url, tmp_path, logs_dir):
    settings = loaded(db_url, tmp_path)
    ingest.run(settings, source=str(logs_dir))
    stats.rebuild(settings)
    with db.session_factory(db_url)() as s:
        version = db.get_data_version(s)
    cache = DiskCache(settings.state_dir / "cache")
    assert cache.lookup(version, HEAVY).read_bytes() == fresh_build(settings, HEAVY)
    # the older version's directory was pruned by the first file of the new one
    assert [p.name for p in (settings.state_dir / "cache").iterdir() if p.name[0] == "v"] == [
        cache.version_dir(version).name
    ]


def test_warm_failure_is_one_line_and_does_not_fail_the_run(
    db_url, tmp_path, logs_dir, caplog, monkeypatch, capsys
):
    settings = loaded(db_url, tmp_path)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / "cache").write_text("a file where the cache directory should be")
    caplog.set_level(logging.INFO)
    assert ingest.run(settings, source=str(logs_dir)) is True
    failed = [r for r in caplog.records if "web warm" in r.message]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING
    assert "web warm failed" in failed[0].message and "\n" not in failed[0].message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # the statistics are in regardless
    with db.session_factory(db_url)() as s:
        assert db.get_valid_thru(s) is not None and db.get_data_version(s) == 1

    exc = _warm_cli(monkeypatch, db_url, settings)
    assert exc.code == 1
    err = capsys.readouterr().err
    assert err.startswith("bioc-webstats: error: web warm: cannot write the cache")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_packages_sync_warms_only_when_it_changed(db_url, tmp_path, logs_dir, caplog):
    from bioc_webstats.packages import sync
    from test_packages import DEVEL

    settings = loaded(db_url, tmp_path)
    ingest.run(settings, source=str(logs_dir))
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert sync(settings, source=str(DEVEL), dry_run=False, force=True).endswith("applied")
    with db.session_factory(db_url)() as s:
        version = db.get_data_version(s)
    assert version > 1
    warmed = [r.message for r in caplog.records if r.message.startswith("web warm: ")]
    assert len(warmed) == 1 and warmed[0].startswith(f"web warm: data version {version}, ")
    cache = DiskCache(settings.state_dir / "cache")
    assert cache.lookup(version, HEAVY).read_bytes() == fresh_build(settings, HEAVY)

    caplog.clear()
    assert sync(settings, source=str(DEVEL), dry_run=False, force=True).endswith("to change")
    assert not [r for r in caplog.records if "web warm" in r.message]


def test_gunicorn_serves_what_the_etl_process_warmed(db_url, tmp_path, logs_dir):
    """The production shape: ``bioc-webstats etl run`` (its own process) warms the cache under
    the state directory; gunicorn's workers serve those files as they are."""
    settings = loaded(db_url, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBSTATS_")}
    env.update(
        WEBSTATS_DATABASE_URL=db_url,
        WEBSTATS_STATE_DIR=str(settings.state_dir),
        WEBSTATS_ENV_FILE="/dev/null",
        WEBSTATS_IP_HASH_KEY="test-key",
    )
    exe = Path(sys.executable).parent / "bioc-webstats"
    done = subprocess.run(
        [str(exe), "etl", "run", "--source", str(logs_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "web warm: data version 1, 82 files built" in done.stderr
    cache = DiskCache(settings.state_dir / "cache")
    heavy = cache.lookup(1, HEAVY)
    before = heavy.stat()
    with run_gunicorn(db_url, tmp_path) as server:
        for rel in (HEAVY, "data-annotation/annotation_pkg_scores.tab", "bioc/index.html"):
            with urllib.request.urlopen(f"{server.base}/packages/stats/{rel}", timeout=30) as r:
                assert r.status == 200
                assert r.read() == cache.lookup(1, rel).read_bytes()
    after = heavy.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
