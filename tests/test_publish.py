"""Publishing: after a change, the pages and files of the new data version are laid out on
disk (``<publish_dir>/v…``), ``current`` is switched to them atomically, old versions are
pruned; requests build what is missing into the same directory; the validators follow the
version (and never come back for another database)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import text

import loggen
import webref
from bioc_webstats import __version__, cli, create_app
from bioc_webstats.config import load_settings
from bioc_webstats.errors import WebstatsError
from bioc_webstats.etl import packages
from bioc_webstats.publish import publish
from bioc_webstats.store import db
from bioc_webstats.web import site as site_mod
from bioc_webstats.web.app import StatsSite
from bioc_webstats.web.site import KEEP, PublishedSite, validators
from bioc_webstats.web.targets import Target, build, category_targets, resolve
from conftest import new_pg_database, wait_for
from test_ingest import loaded
from webserver import run_gunicorn

HEAVY = "bioc/bioc_pkg_stats.tab"
P = "/packages/stats/"
VT = dt.date(2024, 3, 31)


@pytest.fixture
def logs_dir(tmp_path):
    out = tmp_path / "logs"
    loggen.generate(out, days=2, start=dt.date(2024, 3, 30), files_per_day=4, lines_per_file=200)
    return out


def fresh_build(settings, relpath: str) -> bytes:
    """The body the web would build now (its own session and snapshot, nothing on disk)."""
    site = StatsSite(settings)
    state = site.state()
    snap = site.snapshot(state)
    target = resolve(relpath)
    assert isinstance(target, Target)
    with site.session() as session:
        return build(session, target, snap).encode()


def bump(url: str) -> None:
    with db.session_factory(url)() as s:
        db.bump_data_version(s)
        s.commit()


def current(settings) -> Path:
    return settings.publish_dir / "current"


# --- the site directory ------------------------------------------------------------------


def test_get_or_build_builds_once_across_threads(tmp_path):
    site = PublishedSite(tmp_path / "site")
    version = site.open_version("1-aa")
    calls = []

    def blocked_on_the_lock() -> int:
        """This process's requests waiting in flock() now (in /proc/locks, marked '->')."""
        lines = Path("/proc/locks").read_text().splitlines()
        return sum(" -> FLOCK " in ln and f" {os.getpid()} " in ln for ln in lines)

    def slow_build():
        calls.append(1)
        # hold the lock until the seven other threads wait on it (they must not build too)
        wait_for(lambda: blocked_on_the_lock() >= 7, 30, what="seven threads on the lock")
        return b"body", True

    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(site.get_or_build(version, "a/b", slow_build))
        )
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and len(results) == 8
    assert {r.read_bytes() for r in results} == {b"body"}
    assert results[0] == version.file("a/b")
    assert results[0].stat().st_mtime == version.published  # the version's publish time


def test_unwritable_directory_still_answers_and_unstorable_is_not_stored(tmp_path):
    site = PublishedSite(tmp_path / "site")
    version = site.open_version("1-aa")
    assert site.get_or_build(version, "x.tab", lambda: (b"moved on", False)) == b"moved on"
    assert site.lookup(version, "x.tab") is None
    (version.path / "packages/stats/sub").write_text("a file where a directory should be")
    assert site.get_or_build(version, "sub/y.tab", lambda: (b"b", True)) == b"b"


def test_switch_is_one_rename_and_prunes(tmp_path):
    site = PublishedSite(tmp_path / "site")
    made = []
    for i in range(4):
        v = site.open_version(f"{i}-t{i}")
        site.write(v, "f.txt", f"v{i}".encode())
        assert site.switch(v) is True
        made.append(v)
        assert (tmp_path / "site/current/packages/stats/f.txt").read_text() == f"v{i}"
    times = [v.published for v in made]
    assert times == sorted(set(times))  # strictly later, even within one second
    left = sorted(p.name for p in (tmp_path / "site").iterdir() if p.name.startswith("v"))
    assert left == sorted(v.path.name for v in made[-KEEP:])
    assert site.switch(made[-2]) is False  # never back to an older publish
    # a restored database's key, already published once: a new directory, later time
    again = site.open_version(made[-2].key)
    assert again.path != made[-2].path and again.published > made[-1].published


def test_validators_are_nginx_s(tmp_path):
    site = PublishedSite(tmp_path / "site")
    v = site.open_version("3-ab")
    path = site.write(v, "a.tab", b"12345")
    etag, mtime, size = validators(path)
    assert (etag, mtime, size) == (f'"{v.published:x}-5"', float(v.published), 5)


# --- publish and the app -------------------------------------------------------------------


def cli_env(monkeypatch, db_url: str, settings) -> None:
    """The environment of ``bioc-webstats`` run in this process (cli.main)."""
    for k, v in {
        "WEBSTATS_DATABASE_URL": db_url,
        "WEBSTATS_STATE_DIR": str(settings.state_dir),
        "WEBSTATS_ENV_FILE": "/dev/null",
        "WEBSTATS_IP_HASH_KEY": "test-key",
    }.items():
        monkeypatch.setenv(k, v)


def test_etl_run_publishes_and_the_web_serves_without_building(
    db_url, tmp_path, logs_dir, monkeypatch, caplog
):
    settings = loaded(db_url, tmp_path)
    cli_env(monkeypatch, db_url, settings)
    caplog.set_level(logging.INFO)
    with pytest.raises(SystemExit) as exc:
        cli.main(["etl", "run", "--source", str(logs_dir)])
    assert exc.value.code == 0
    err = caplog.text
    with db.session_factory(db_url)() as s:
        state = db.data_state(s)
    assert f"publish: data version {state.key} in v{state.key}-" in err

    cur = current(settings)
    site = StatsSite(settings)
    targets = category_targets(site.snapshot(state))
    relpaths = {t.relpath for t in targets}
    # every category file and the index/repository pages, nothing per package
    assert {HEAVY, "index.html", "bioc/index.html", "workflows.html"} <= relpaths
    assert "bioc/bioc_2024_stats.tab" in relpaths and "bioc/bioc_2025_stats.tab" not in relpaths
    published = {p.relative_to(cur / "packages/stats").as_posix()
                 for p in (cur / "packages/stats").rglob("*") if p.is_file()}  # fmt: skip
    assert published == relpaths | {"main.css", "charts.js", "uPlot.iife.min.js"}
    mtimes = {(cur / "packages/stats" / r).stat().st_mtime for r in published}
    assert len(mtimes) == 1  # one version, one publish time

    heavy = cur / "packages/stats" / HEAVY
    before = heavy.stat()
    expected = fresh_build(settings, HEAVY)
    assert len(expected.splitlines()) > 10 and heavy.read_bytes() == expected
    client = create_app(settings).test_client()
    resp = client.get(P + HEAVY)
    assert resp.status_code == 200 and resp.data == expected
    assert resp.headers["ETag"] == validators(heavy)[0]
    after = heavy.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rebuilt

    # a package page is built on first request, into the current version, then served as is
    pkg = next(iter(site.snapshot(state).categories["bioc"].order))
    rel = f"bioc/{pkg}/index.html"
    assert not (cur / "packages/stats" / rel).exists()
    first = client.get(f"{P}bioc/{pkg}/")
    assert first.status_code == 200
    assert (cur / "packages/stats" / rel).read_bytes() == first.data
    assert (cur / "packages/stats" / rel).stat().st_mtime == mtimes.pop()
    assert client.get(f"{P}bioc/{pkg}/").headers["ETag"] == first.headers["ETag"]

    # nothing new: the second publish builds nothing
    result = publish(settings)
    assert (result.built, result.switched) == (0, False)
    # the whole site, package files too
    result = publish(settings, all_files=True)
    assert result.built > 0 and (cur / "packages/stats" / f"bioc/{pkg}/{pkg}_stats.tab").is_file()


def test_relative_directories_are_the_working_directorys(db_url, tmp_path, logs_dir, monkeypatch):
    """WEBSTATS_STATE_DIR and web/publish_dir given relative (by hand, from where one stands):
    the ETL wrote there, and every page and file the web built on request was a 500 (Flask's
    send_file took the path from the package's directory)."""
    monkeypatch.chdir(tmp_path)
    for k, v in {
        "WEBSTATS_DATABASE_URL": db_url,
        "WEBSTATS_STATE_DIR": "state",
        "WEBSTATS_WEB_PUBLISH_DIR": "site",
        "WEBSTATS_ENV_FILE": "/dev/null",
        "WEBSTATS_IP_HASH_KEY": "test-key",
    }.items():
        monkeypatch.setenv(k, v)
    settings = load_settings()
    assert (settings.state_dir, settings.publish_dir) == (tmp_path / "state", tmp_path / "site")
    packages.load_csv(settings, loggen.PACKAGES_SAMPLE)
    with pytest.raises(SystemExit) as exc:
        cli.main(["etl", "run", "--source", str(logs_dir)])
    assert exc.value.code == 0
    with db.session_factory(db_url)() as s:
        state = db.data_state(s)
    pkg = next(iter(StatsSite(settings).snapshot(state).categories["bioc"].order))
    client = create_app(load_settings()).test_client()
    for url in (f"{P}bioc/{pkg}/", f"{P}bioc/{pkg}/{pkg}_stats.tab", f"{P}bioc/bioc_stats.tab"):
        assert client.get(url).status_code == 200, url
    assert (tmp_path / "site/current/packages/stats/bioc" / pkg / "index.html").is_file()


def test_a_release_never_writes_pages_among_another_releases(
    db_url, tmp_path, logs_dir, monkeypatch
):
    """A deploy's new release answered (and built pages) before its health check; rolled
    back, the pages it had built stayed in the directory the release before it served: the
    web wrote into `current` whatever release had published it. A release now writes only in
    a directory of its own code, with the shipped assets, and switches to it."""
    settings = loaded(db_url, tmp_path)
    cli_env(monkeypatch, db_url, settings)
    with pytest.raises(SystemExit) as exc:
        cli.main(["etl", "run", "--source", str(logs_dir)])
    assert exc.value.code == 0
    site = StatsSite(settings)
    with db.session_factory(db_url)() as s:
        state = db.data_state(s)
    pkg = next(iter(site.snapshot(state).categories["bioc"].order))
    # what the release before this one published: its directory, named with its code
    ours = current(settings).resolve()
    old = ours.with_name(ours.name.replace(f"-{__version__}-", "-0.0.1-"))
    ours.rename(old)
    (settings.publish_dir / "current").unlink()
    (settings.publish_dir / "current").symlink_to(old.name)
    client = create_app(settings).test_client()  # this release's web, the same data
    assert client.get(f"{P}bioc/{pkg}/").status_code == 200
    assert not (old / "packages/stats" / f"bioc/{pkg}/index.html").exists()
    new = current(settings).resolve()
    assert new != old and f"-{__version__}-" in new.name
    assert (new / "packages/stats" / f"bioc/{pkg}/index.html").is_file()
    assert (new / "packages/stats/main.css").is_file()  # the assets go with it (nginx sends them)


def test_a_run_after_one_killed_before_its_publish_publishes(
    db_url, tmp_path, logs_dir, monkeypatch
):
    """A run killed between its commit and its publish left the site behind the database;
    the next run, finding nothing new, did not publish either (until new data came)."""
    from bioc_webstats.etl import ingest

    settings = loaded(db_url, tmp_path)
    cli_env(monkeypatch, db_url, settings)
    assert ingest.run(settings, source=str(logs_dir)) is True  # committed, not published
    assert PublishedSite(settings.publish_dir).current() is None
    with pytest.raises(SystemExit) as exc:
        cli.main(["etl", "run", "--source", str(logs_dir)])  # nothing new
    assert exc.value.code == 0
    with db.session_factory(db_url)() as s:
        key = db.data_state(s).key
    assert PublishedSite(settings.publish_dir).current().key == key


def test_rebuild_and_sync_publish_a_new_version_and_prune(db_url, tmp_path, logs_dir, monkeypatch):
    from test_packages import DEVEL

    settings = loaded(db_url, tmp_path)
    cli_env(monkeypatch, db_url, settings)
    seen = []
    for args in (
        ["etl", "run", "--source", str(logs_dir)],
        ["stats", "rebuild"],
        ["packages", "sync", "--from", str(DEVEL), "--force"],
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main(args)
        assert exc.value.code == 0, args
        seen.append(current(settings).readlink().name)
        assert (current(settings) / "packages/stats" / HEAVY).read_bytes() == fresh_build(
            settings, HEAVY
        )
    assert len(set(seen)) == 3
    dirs = sorted(p.name for p in settings.publish_dir.iterdir() if p.name.startswith("v"))
    assert dirs == sorted(seen[-KEEP:])


def test_the_first_publish_elsewhere_removes_the_site_of_earlier_releases(db_url, tmp_path, caplog):
    """Releases before 0.3.26 published into <state dir>/site, where the service user could
    swap the directory for a link while the deploy (root) set its owner and ACL; the deploy
    now sets web/publish_dir outside it, and the first publish there removes the old site."""
    settings = loaded(db_url, tmp_path)
    earlier = settings.state_dir / "site"
    assert settings.publish_dir == earlier  # without web/publish_dir, as releases before
    publish(settings)
    publish(settings, force=True)  # the site itself stays
    assert (earlier / "current").is_symlink()
    (earlier / "current" / "packages/stats/by-hand.txt").write_text("")  # (gunicorn's pages)
    moved = dataclasses.replace(
        settings, values={**settings.values, "web/publish_dir": str(tmp_path / "site")}
    )
    with caplog.at_level(logging.INFO, logger="bioc_webstats.publish"):
        publish(moved)
    assert not earlier.exists() and (tmp_path / "site/current").is_symlink()
    assert f"publish: removed {earlier}, the site of releases before 0.3.26" in caplog.text
    (earlier / "v1-left-by-a-try").mkdir(parents=True)  # what a removal in part left: retried
    publish(moved, force=True)
    assert not earlier.exists()
    earlier.mkdir()  # a directory of that name that no publish made is not the app's to remove
    (earlier / "notes.txt").write_text("")
    publish(moved, force=True)
    assert (earlier / "notes.txt").exists()


def test_publish_failure_is_one_line(db_url, tmp_path, monkeypatch, capsys):
    settings = loaded(db_url, tmp_path)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.publish_dir.write_text("a file where the publish directory should be")
    with pytest.raises(WebstatsError, match="publish: cannot write"):
        publish(settings)
    for k, v in {
        "WEBSTATS_DATABASE_URL": db_url,
        "WEBSTATS_STATE_DIR": str(settings.state_dir),
        "WEBSTATS_ENV_FILE": "/dev/null",
    }.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exc:
        cli.main(["publish"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    # (mkdir's "File exists" named the wrong problem)
    assert err.startswith(f"bioc-webstats: error: publish: cannot write {settings.publish_dir}: "
                          "Not a directory; the site keeps showing")  # fmt: skip
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    # the app still answers, from memory
    client = create_app(settings).test_client()
    assert client.get(P + "index.html").status_code == 200
    # `current` a directory (by hand): named, and no temporary link left beside it
    settings.publish_dir.unlink()
    (settings.publish_dir / "current").mkdir(parents=True)
    with pytest.raises(WebstatsError) as err:
        publish(settings, force=True)
    assert f"cannot write {settings.publish_dir / 'current'}: Is a directory" in str(err.value)
    assert not list(settings.publish_dir.glob(".tmp-current-*"))


def test_a_disk_that_fills_up_fails_the_publish_and_keeps_the_site(db_url, tmp_path, monkeypatch):
    """A full disk part-way through a publish: the publish said "the data version moved on",
    exited 0 and switched the site to the partial directory."""
    settings = loaded(db_url, tmp_path)
    publish(settings)
    before = current(settings).resolve()
    real, writes = site_mod._write_atomic, []

    def filling(path: Path, body: bytes, mtime: int) -> None:
        writes.append(path)
        if len(writes) > 5:  # the assets and two category files, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, body, mtime)

    monkeypatch.setattr(site_mod, "_write_atomic", filling)
    with pytest.raises(WebstatsError, match="No space left on device; the site keeps showing"):
        publish(settings, force=True)
    assert len(writes) == 6
    assert current(settings).resolve() == before


def test_build_racing_a_new_data_version_is_not_stored(db_url, clean_env, monkeypatch):
    """A body built after a commit moved the data version on is not stored under the version
    the request was routed with."""
    with db.session_factory(db_url)() as s:
        webref.load_direct(s, valid_thru=VT)
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    app = create_app(load_settings())
    site = app.extensions["webstats"]
    state = site.state()
    snap = site.snapshot(state)
    target = Target("packages_txt", snap.categories["bioc"].category, "bioc/bioc_packages.txt")
    assert site.build(target, snap, state.key)[1] is True
    bump(db_url)  # a commit between the request's read of the version and its build
    assert site.build(target, snap, state.key)[1] is False


def _replace_database(url: str, records) -> None:
    """Empty every table and load ``records``: a recreated database whose data version number
    is set equal to the one it replaces (the worst case for a cache keyed by the number)."""
    with db.session_factory(url)() as s:
        version = db.get_data_version(s)
        for table in ("package_stats", "category_stats", "download_records", "ingested_objects",
                      "packages", "stats_pending", "meta"):  # fmt: skip
            s.execute(text(f"DELETE FROM {table}"))
        s.commit()
        webref.load_direct(s, records, valid_thru=VT)
        db.set_meta(s, db.DATA_VERSION, str(version - 1))
        db.bump_data_version(s)  # the same number again, another token
        s.commit()
        assert db.get_data_version(s) == version


def test_a_recreated_database_never_gets_the_old_files(db_url, clean_env, monkeypatch):
    with db.session_factory(db_url)() as s:
        webref.load_direct(s, valid_thru=VT)
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    settings = load_settings()
    publish(settings)
    client = create_app(settings).test_client()
    path = P + "bioc/affy/affy_2024_stats.tab"
    old = client.get(path)
    old_heavy = (current(settings) / "packages/stats" / HEAVY).read_bytes()
    records = [*webref.RECORDS, ("bioc", "affy", dt.date(2024, 3, 15), "99.9.9.9")]
    _replace_database(db_url, records)
    new = client.get(path)  # the app sees another database's version: a new directory
    assert new.data == webref.Reference(VT, records).pkg_year("bioc", "affy", 2024) != old.data
    assert new.headers["ETag"] != old.headers["ETag"]
    assert client.get(path, headers={"If-None-Match": old.headers["ETag"]}).status_code == 200
    heavy = client.get(P + HEAVY).data  # built into the new directory on this request
    assert heavy == fresh_build(settings, HEAVY) != old_heavy
    assert (current(settings) / "packages/stats" / HEAVY).read_bytes() == heavy


def test_a_database_recreated_under_running_gunicorn(pg_server, tmp_path):
    url = new_pg_database(pg_server)
    db.upgrade(url)
    with db.session_factory(url)() as s:
        webref.load_direct(s, valid_thru=VT)
    path = "/packages/stats/bioc/affy/affy_2024_stats.tab"
    with run_gunicorn(url, tmp_path) as server:
        st, h, old = server.get(path)
        assert st == 200
        records = [*webref.RECORDS, ("bioc", "affy", dt.date(2024, 3, 16), "99.9.9.8")]
        _replace_database(url, records)
        for _ in range(10):  # every worker, whichever answers
            st, h2, body = server.get(path)
            assert st == 200
            assert body == webref.Reference(VT, records).pkg_year("bioc", "affy", 2024) != old
            assert h2["ETag"] != h["ETag"]


def test_gunicorn_serves_what_the_cli_published(db_url, tmp_path, logs_dir):
    """The production shape: ``bioc-webstats etl run`` (its own process) publishes under the
    state directory; gunicorn's workers serve those very files."""
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
    assert "files built" in done.stderr
    cur = current(settings) / "packages/stats"
    with run_gunicorn(db_url, tmp_path) as server:
        for rel in (HEAVY, "data-annotation/annotation_pkg_scores.tab", "bioc/index.html"):
            with urllib.request.urlopen(f"{server.base}{P}{rel}", timeout=30) as r:
                assert r.status == 200
                assert r.read() == (cur / rel).read_bytes()
                assert r.headers["ETag"] == validators(cur / rel)[0]


def test_publish_all_gives_the_bodies_a_request_builds(db_url, clean_env, monkeypatch):
    """A whole publish reads every package in a few streamed queries; each body equals the
    one the app builds for that URL on its own."""
    with db.session_factory(db_url)() as s:
        webref.load_direct(s, valid_thru=VT)
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    settings = load_settings()
    result = publish(settings, all_files=True)
    root = current(settings) / "packages/stats"
    package_files = [
        p for p in root.rglob("*") if p.is_file() and len(p.relative_to(root).parts) == 3
    ]
    assert len(package_files) > 20 and result.built >= len(package_files)
    for path in package_files:
        rel = path.relative_to(root).as_posix()
        if rel.endswith("/index.html"):
            rel = rel.removesuffix("index.html")
        assert path.read_bytes() == fresh_build(settings, rel), rel


@pytest.mark.publish_waits
def test_publishers_at_once_never_date_a_version_in_the_future(tmp_path):
    """Publishers at once each took a second later than the others' versions, the last ones
    seconds ahead of the clock (eight: seven): Last-Modified in the future. One at a time picks
    its time, each a second later than the last and none later than now."""
    site = PublishedSite(tmp_path / "site")
    made: list[tuple[int, float]] = []

    def publish(i: int) -> None:
        v = PublishedSite(tmp_path / "site").open_version(f"{i}-p{i}", force=True)
        made.append((v.published, time.time()))

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(made) == 4
    times = sorted(p for p, _ in made)
    assert times == sorted(set(times))  # distinct: the validators are the second and the size
    assert all(published <= now for published, now in made), made
    assert (tmp_path / "site" / ".lock-publish").is_file() and site.current() is None


def test_publishers_of_one_data_version_at_once_share_its_directory(tmp_path):
    """The web's workers and the ETL's publish that meet the same new data version: one
    directory, the others wait for it and take it (each made its own, a second apart, and the
    pruning took the ones still being filled)."""
    barrier = threading.Barrier(4)
    made: list[Path] = []

    def publish() -> None:
        site = PublishedSite(tmp_path / "site")
        barrier.wait(30)
        made.append(site.open_version("7-abc").path)

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(made) == 4 and len(set(made)) == 1, made
    assert len(PublishedSite(tmp_path / "site").versions()) == 1


def test_the_publish_lock_is_no_link_and_is_not_waited_for_ever(tmp_path, monkeypatch, caplog):
    """The web's user may write the publish directory: a link put in place of the lock is not
    followed (nor its target created), and a holder that never lets go delays a publish by
    PUBLISH_LOCK_WAIT at most."""
    import fcntl

    from bioc_webstats.web import site as site_module

    root = tmp_path / "site"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere.lock"
    (root / ".lock-publish").symlink_to(elsewhere)
    v = PublishedSite(root).open_version("1-aa")
    assert v.path.is_dir() and not elsewhere.exists()
    assert "no publish lock in" in caplog.text
    (root / ".lock-publish").unlink()
    (root / ".lock-publish").touch()
    monkeypatch.setattr(site_module, "PUBLISH_LOCK_WAIT", 0.5)
    with open(root / ".lock-publish", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        v2 = PublishedSite(root).open_version("2-bb")
    assert v2.published > v.published
    assert "publish lock in" in caplog.text and "publishing without" in caplog.text
