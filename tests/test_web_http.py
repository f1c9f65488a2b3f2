"""HTTP rules of web-contract.md through the Flask test client, on SQLite and PostgreSQL:
headers, ETag/304, HEAD, redirects, the tricky 404s, no data, database down, generated URLs."""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

import webref
from bioc_webstats import create_app
from bioc_webstats.config import load_settings
from bioc_webstats.store import db
from test_proc_private import NO_CAPS

P = "/packages/stats/"
VT = dt.date(2024, 3, 31)
FW = "\uff12\uff10\uff12\uff14"  # 2024 in fullwidth digits


@pytest.fixture
def loaded(db_url, clean_env, monkeypatch):
    """(client, db_url) with the fixture dataset loaded (ValidThru 2024-03-31)."""
    with db.session_factory(db_url)() as s:
        webref.load_direct(s, valid_thru=VT)
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    return create_app(load_settings()).test_client(), db_url


def bump(url: str) -> None:
    """A new data version, committed (as by an ETL run, or by hand in SQL)."""
    with db.session_factory(url)() as s:
        db.bump_data_version(s)
        s.commit()


def http_time(value: str) -> dt.datetime:
    from werkzeug.http import parse_date

    parsed = parse_date(value)
    assert parsed is not None, value
    return parsed


def test_headers_on_files_and_pages(loaded):
    client, _ = loaded
    lms: set[str] = set()
    for path, ctype in [
        ("bioc/bioc_pkg_stats.tab", "text/plain; charset=utf-8"),
        ("bioc/bioc_packages.txt", "text/plain; charset=utf-8"),
        ("bioc/affy/affy_2024_stats.tab", "text/plain; charset=utf-8"),
        ("", "text/html; charset=utf-8"),
        ("index.html", "text/html; charset=utf-8"),
        ("workflows.html", "text/html; charset=utf-8"),
        ("bioc/", "text/html; charset=utf-8"),
        ("bioc/affy/", "text/html; charset=utf-8"),
        ("bioc/affy/index.html", "text/html; charset=utf-8"),
    ]:
        r = client.get(P + path)
        assert r.status_code == 200, path
        assert r.headers["Content-Type"] == ctype, path
        published = http_time(r.headers["Last-Modified"])  # when the version was published
        assert dt.datetime(2024, 4, 1, tzinfo=dt.UTC) <= published <= dt.datetime.now(dt.UTC)
        assert r.headers["Last-Modified"].endswith(" GMT"), path
        lms.add(r.headers["Last-Modified"])
        assert r.headers["Cache-Control"] == "public, max-age=3600", path
        etag = r.headers["ETag"]
        assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/"), path
        assert int(r.headers["Content-Length"]) == len(r.data), path
        assert "Content-Disposition" not in r.headers, path  # nginx sends none either
        part = client.get(P + path, headers={"Range": "bytes=0-9"})  # as nginx answers it
        assert (part.status_code, part.data) == (206, r.data[:10]), path
        assert part.headers["Content-Type"] == ctype, path
    assert len(lms) == 1  # one data version, one publish time
    css = client.get(P + "main.css")
    assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css")
    assert {"ETag", "Last-Modified", "Cache-Control"} <= set(css.headers.keys())


def test_a_failed_precondition_is_a_short_answer(loaded):
    """An If-Match that fails: 412 with a short page, not the file with a doubled charset and
    a public Cache-Control (werkzeug's own 412 kept both)."""
    client, _ = loaded
    for path in ("bioc/affy/affy_stats.tab", "bioc/bioc_packages.txt", "bioc/affy/"):
        whole = client.get(P + path)
        r = client.get(P + path, headers={"If-Match": '"nope"'})
        assert r.status_code == 412, path
        assert r.headers["Content-Type"] == "text/html; charset=utf-8", path
        assert r.headers["Cache-Control"] == "no-store", path
        assert whole.data not in r.data and b"Precondition Failed" in r.data, path
        ok = client.get(P + path, headers={"If-Match": whole.headers["ETag"]})
        assert (ok.status_code, ok.data) == (200, whole.data), path


def test_last_modified_format_and_max_age_setting(db_url, clean_env, monkeypatch):
    with db.session_factory(db_url)() as s:
        webref.load_direct(s, valid_thru=dt.date(2023, 10, 4))
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    monkeypatch.setenv("WEBSTATS_WEB_CACHE_MAX_AGE", "60")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")  # must not matter
    r = create_app(load_settings()).test_client().get(P + "bioc/bioc_stats.tab")
    lm = r.headers["Last-Modified"]
    assert lm[:3] in ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun") and lm.endswith(" GMT")
    assert http_time(lm) >= dt.datetime(2023, 10, 5, tzinfo=dt.UTC)
    assert r.headers["Cache-Control"] == "public, max-age=60"


def _frozen_garbage() -> int:
    """Unreachable objects that only the permanent generation (gc.freeze) keeps alive."""
    gc.collect()
    gc.unfreeze()
    try:
        return gc.collect()
    finally:
        gc.freeze()


def test_a_new_data_version_leaves_no_garbage_frozen(loaded):
    """A worker lives for days and loads each data version once: the cycles that became
    garbage since the last freeze (the replaced snapshot's, the requests') must not be
    frozen with the new snapshot, or they stay until the worker exits."""
    client, url = loaded
    path = P + "bioc/affy/affy_2024_stats.tab"
    assert client.get(path).status_code == 200
    _frozen_garbage()  # what earlier tests and imports left
    left = {}
    for versions in (1, 20):
        for _ in range(versions):
            bump(url)
            assert client.get(path).status_code == 200
            assert client.get(P + "bioc/affy/").status_code == 200
        left[versions] = _frozen_garbage()
    # At most the request that loaded the last version (alive when it froze): was about 165
    # objects more for each version
    assert left[20] <= left[1] + 10, left


def test_etag_follows_data_version_and_304(loaded):
    client, url = loaded
    path = P + "bioc/affy/affy_stats.tab"
    first = client.get(path)
    etag1 = first.headers["ETag"]
    assert client.get(path).headers["ETag"] == etag1  # stable while nothing changes
    r304 = client.get(path, headers={"If-None-Match": etag1})
    assert r304.status_code == 304 and r304.data == b""
    assert r304.headers["ETag"] == etag1 and "Cache-Control" in r304.headers
    assert client.get(path, headers={"If-None-Match": '"other", ' + etag1}).status_code == 304
    lm = first.headers["Last-Modified"]
    assert client.get(path, headers={"If-Modified-Since": lm}).status_code == 304
    fmt = "%a, %d %b %Y %H:%M:%S GMT"
    later = (http_time(lm) + dt.timedelta(hours=1)).strftime(fmt)
    assert client.get(path, headers={"If-Modified-Since": later}).status_code == 304
    earlier = (http_time(lm) - dt.timedelta(seconds=1)).strftime(fmt)
    assert client.get(path, headers={"If-Modified-Since": earlier}).status_code == 200
    # Both are judged, as nginx judges them for a file on disk: 304 only when neither says
    # modified (werkzeug ignored an older If-Modified-Since beside a matching tag), and a tag
    # without its quotes matches nothing
    for headers, status in [
        ({"If-None-Match": '"x"', "If-Modified-Since": lm}, 200),
        ({"If-None-Match": etag1, "If-Modified-Since": earlier}, 200),
        ({"If-None-Match": etag1, "If-Modified-Since": later}, 304),
        ({"If-None-Match": etag1.strip('"')}, 200),
        ({"If-None-Match": "W/" + etag1}, 304),
    ]:
        assert client.get(path, headers=headers).status_code == status, headers
    bump(url)  # a new data version (an ETL run, a rebuild, SQL by hand): seen at once
    second = client.get(path)
    assert second.headers["ETag"] != etag1
    assert http_time(second.headers["Last-Modified"]) > http_time(lm)  # later, every version
    assert client.get(path, headers={"If-Modified-Since": lm}).status_code == 200
    assert client.get(path, headers={"If-None-Match": etag1}).status_code == 200
    assert client.get(path, headers={"If-None-Match": second.headers["ETag"]}).status_code == 304


def test_body_and_etag_change_with_new_data(loaded):
    client, url = loaded
    path = P + "bioc/affy/affy_2024_stats.tab"
    before = client.get(path)
    records = [*webref.RECORDS, ("bioc", "affy", dt.date(2024, 3, 15), "99.9.9.9")]
    with db.session_factory(url)() as s:
        webref.load_direct(s, records, valid_thru=VT)
    after = client.get(path)
    assert after.data != before.data and after.headers["ETag"] != before.headers["ETag"]
    assert after.data == webref.Reference(VT, records).pkg_year("bioc", "affy", 2024)


def test_head_matches_get(loaded):
    client, _ = loaded
    for path in [
        "bioc/bioc_pkg_stats.tab",
        "bioc/affy/affy_stats.tab",
        "bioc/affy/",
        "",
        "main.css",
        "bioc/affy/affy_2010_stats.tab",  # 404
        "bioc",  # 301
    ]:
        g = client.get(P + path)
        h = client.head(P + path)
        assert h.status_code == g.status_code, path
        assert h.data == b"", path
        assert h.headers["Content-Length"] == str(len(g.data)), path
        for k in ("Content-Type", "ETag", "Last-Modified", "Cache-Control", "Location"):
            assert h.headers.get(k) == g.headers.get(k), (path, k)


@pytest.mark.parametrize(
    ("path", "location"),
    [
        ("/packages/stats", "/packages/stats/"),
        ("/packages/stats?x=1", "/packages/stats/?x=1"),
        (P + "bioc", P + "bioc/"),
        (P + "data-annotation", P + "data-annotation/"),
        (P + "workflows?a=b&c=d", P + "workflows/?a=b&c=d"),
        (P + "bioc/affy", P + "bioc/affy/"),
        (P + "bioc/affy.html", P + "bioc/affy/"),
        (P + "bioc/affy.html?from=badge", P + "bioc/affy/?from=badge"),
        (P + "bioc/cn.mops.html", P + "bioc/cn.mops/"),
        (P + "data-annotation/ag.db", P + "data-annotation/ag.db/"),
    ],
)
def test_redirects(loaded, path, location):
    client, _ = loaded
    for method in (client.get, client.head):
        r = method(path)
        assert r.status_code == 301, path
        assert r.headers["Location"] == location
        assert r.headers["Cache-Control"] == "public, max-age=3600"
    target = client.get(location)
    assert target.status_code == 200


TRICKY_404 = [
    "bioc/affy_stats.tab",  # category file named after a package
    "data-annotation/data-annotation_2023_stats.tab",  # stem instead of prefix
    "data-annotation/bioc_stats.tab",  # another category's prefix
    "bioc/annotation_pkg_stats.tab",
    "bioc/affy/limma_stats.tab",  # directory and file name disagree
    "bioc/affy/limma_2024_stats.tab",
    "bioc/affy/affy_24_stats.tab",
    "bioc/affy/affy_02024_stats.tab",
    "bioc/affy/affy_+2024_stats.tab",
    "bioc/affy/affy_" + FW + "_stats.tab",
    "bioc/bioc_" + FW + "_stats.tab",
    "bioc/bioc_+2024_stats.tab",
    "bioc/bioc_2008_stats.tab",  # before first year
    "workflows/workflows_2014_stats.tab",
    "bioc/bioc_2025_stats.tab",  # after the data year
    "bioc/affy/affy_2010_stats.tab",  # a year with no download
    "bioc/affy/affy_2008_stats.tab",
    "bioc/nosuchpkg/",
    "bioc/nosuchpkg",
    "bioc/nosuchpkg.html",
    "bioc/Affy/",  # case-sensitive
    "bioc/AFFY/AFFY_stats.tab",
    "bioc/ag.db/",  # a package of another category
    "data-experiment/affy/",
    "software/",  # label, not stem
    "annotation/",  # prefix, not stem
    "nosuch/",
    "bioc/affy/extra/deeper",
    "bioc/affy/affy_stats.tab/",
    "bioc/affy/index.htm",
    "bioc/affy/../limma/",
    "bioc/../index.html",
    "bioc/./affy/",
    "bioc//affy/",
    "bioc/affy%00/",
    "bioc/%ff%fe/",
    "bioc/affy /",
    "index.htm",
    "bioc.html",
    "bioc/index.html/",
]


def test_tricky_404s(loaded):
    client, _ = loaded
    for path in TRICKY_404:
        r = client.get(P + path)
        assert r.status_code in (400, 404), path
        assert r.headers["Content-Type"].startswith("text/html"), path
        assert b"Traceback" not in r.data


def test_other_methods_are_short_4xx(loaded):
    client, _ = loaded
    for method in (client.post, client.put, client.delete):
        r = method(P + "bioc/bioc_stats.tab", data=b"x")
        assert r.status_code == 405 and b"Traceback" not in r.data
    assert client.get("/nowhere").status_code == 404


def test_case_sensitive_names_and_encoding(loaded):
    client, _ = loaded
    a = client.get(P + "bioc/trena/trena_stats.tab")
    b = client.get(P + "bioc/TReNA/TReNA_stats.tab")
    assert a.status_code == b.status_code == 200 and a.data != b.data
    assert client.get(P + "bioc/%61ffy/").data == client.get(P + "bioc/affy/").data
    q = client.get(P + "bioc/bioc_stats.tab?x=1&y=%ff")
    assert q.status_code == 200 and q.data == client.get(P + "bioc/bioc_stats.tab").data


def test_pages_carry_legacy_texts(loaded):
    client, _ = loaded
    idx = client.get(P).text
    assert "<title>Download stats for Bioconductor software packages</title>" in idx
    assert "<h1>Download stats for Bioconductor software packages</h1>" in idx
    for label in ("annotation", "experiment", "workflow"):
        assert f"Bioconductor {label} packages</a>" in idx
    assert "Data as of Sun, 31 Mar 2024" in idx
    assert (
        "the average number of distinct IPs that hit the package each month for the last 12 "
        "months (not counting the current month)"
    ) in idx
    assert "<h2>Top 75</h2>" in idx
    assert 'href="bioc/bioc_pkg_stats.tab"' in idx and 'href="bioc/bioc_pkg_scores.tab"' in idx
    assert "See <a" in idx and "Download stats for Bioconductor software repository" in idx
    assert '<a href="bioc/limma/">limma&nbsp;(2)</a>' in idx
    assert '<a href="bioc/cn.mops/">cn.mops&nbsp;(0)</a>' in idx
    order = [idx.index(f'<a href="bioc/{n}/">{n}&nbsp;') for n in ("cn.mops", "CNAnorm", "TReNA")]
    assert order == sorted(order)
    assert '<h3 id="letter-C">C</h3>' in idx
    wf = client.get(P + "workflows.html").text
    assert "Top " not in wf and "<h3" not in wf and "wfA&nbsp;(0)" in wf
    repo = client.get(P + "bioc/").text
    assert (
        "<h1>Download stats for Bioconductor software repository (all packages combined)</h1>"
        in repo
    )
    assert 'Back to the "Download stats for Bioconductor software packages"' in repo
    assert repo.index("<h2>2024</h2>") < repo.index("<h2>2009</h2>")
    assert "<td>Jan/2024</td>" in repo and 'href="bioc_2024_stats.tab"' in repo
    assert 'All years in one file: <a href="bioc_stats.tab">bioc_stats.tab</a>' in repo
    pkg = client.get(P + "bioc/affy/").text
    assert "<h1>Download stats for software package affy</h1>" in pkg
    assert 'href="/packages/release/bioc/html/affy.html"' in pkg
    assert 'href="/packages/devel/bioc/html/affy.html"' in pkg
    assert "<h2>2010</h2>" not in pkg and "<h2>2009</h2>" in pkg
    moved = client.get(P + "bioc/CNAnorm/").text
    assert "Package CNAnorm is now in the Bioconductor annotation repository" in moved
    assert '<a href="../../data-annotation/CNAnorm/">Package CNAnorm is now' in moved
    assert client.get(P + "data-annotation/CNAnorm/").status_code == 200
    gone = client.get(P + "bioc/TReNA/").text
    assert (
        "Package TReNA is not in the current release of Bioconductor. It was last seen in 3.8."
        in gone
    )
    for page in (idx, repo, pkg):
        assert (
            "http://" not in page
            and "https://" not in page
            and "//" not in page.replace("://", "").replace("<!--", "")
        )


def test_no_data_yet(db_url, clean_env, monkeypatch):
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    client = create_app(load_settings()).test_client()
    for page in ("", "index.html", "workflows.html", "bioc/", "data-experiment/index.html"):
        r = client.get(P + page)
        assert r.status_code == 200, page
        assert "No download data has been loaded yet." in r.text
    for f in (
        "bioc/bioc_stats.tab",
        "bioc/bioc_2024_stats.tab",
        "bioc/bioc_pkg_stats.tab",
        "bioc/bioc_pkg_scores.tab",
        "bioc/bioc_packages.txt",
        "bioc/affy/affy_stats.tab",
        "bioc/affy/",
        "bioc/affy",
    ):
        assert client.get(P + f).status_code == 404, f
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json["valid_thru"] is None


def test_database_down_is_503_not_500(clean_env, monkeypatch, caplog):
    from conftest import free_port

    monkeypatch.setenv(
        "WEBSTATS_DATABASE_URL", f"postgresql+psycopg2://nobody@127.0.0.1:{free_port()}/none"
    )
    client = create_app(load_settings()).test_client()
    caplog.set_level(logging.WARNING)
    for path in ("", "bioc/", "bioc/affy/", "bioc/bioc_stats.tab", "bioc/affy"):
        r = client.get(P + path)
        assert r.status_code == 503, path
        assert "unavailable" in r.text and "Traceback" not in r.text
    assert client.get("/healthz").status_code == 503
    assert client.get(P + "main.css").status_code == 200  # no database needed
    # error.log: a line a request, not a traceback of ~95 lines (an outage's crawl filled it)
    assert caplog.records and not [r for r in caplog.records if r.exc_info], caplog.text
    assert "healthz: database check failed: connection to server at" in caplog.text
    assert client.get(P + "nosuch/").status_code == 404


@pytest.mark.parametrize("where", ["directory", "missing directory"])
def test_a_sqlite_file_that_cannot_be_opened_is_503_and_named(clean_env, monkeypatch, where):
    """SQLite's own error names no file: the web answers 503, and check names the file."""
    path = clean_env if where == "directory" else clean_env / "nowhere" / "x.db"
    why = "a directory" if where == "directory" else f"no directory {path.parent}"
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", f"sqlite:///{path}")
    client = create_app(load_settings()).test_client()
    assert client.get("/healthz").status_code == 503
    assert client.get(P + "bioc/bioc_stats.tab").status_code == 503
    res = subprocess.run([str(Path(sys.executable).parent / "bioc-webstats"), "check"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 1
    assert res.stderr == (
        f"bioc-webstats: error: database: unable to open database file {path}: {why}\n"
    )


@pytest.mark.parametrize("where", ["file", "directory"])
def test_a_sqlite_file_this_user_may_not_write_is_named(clean_env, where):
    """A file this user may not read and write (or a directory it may not create it in):
    SQLite said only "unable to open database file" (or, to a reading command, "attempt to
    write a readonly database"). Run as root without capabilities, as the tests run as root."""
    box = clean_env / "box"
    box.mkdir()
    path = box / "webstats.sqlite3"
    if where == "file":
        path.write_bytes(b"")
        path.chmod(0o444)
        why = "this user may not read and write it"
    else:
        box.chmod(0o555)
        why = f"this user may not create it in {box}"
    env = {**os.environ, "WEBSTATS_DATABASE_URL": f"sqlite:///{path}"}
    for args in (["check"], ["status"]):
        res = subprocess.run([*NO_CAPS, str(Path(sys.executable).parent / "bioc-webstats"), *args],
                             capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
        assert res.returncode == 1, (args, res.stdout)
        assert res.stderr == (
            f"bioc-webstats: error: database: unable to open database file {path}: {why}\n"
        ), args


def _allow_connections(url: str, allow: bool) -> None:
    """Open or close a PostgreSQL database to new connections, and end the ones it has (the
    database down, as in a restart or a failover, on the real server)."""
    import sqlalchemy as sa

    base, name = url.rsplit("/", 1)
    engine = sa.create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(
            sa.text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allow).lower()}')
        )
        conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
    engine.dispose()


def _reference_database(server: str, monkeypatch) -> str:
    """A new database on ``server`` holding the reference data (ValidThru 2024-03-31), the
    one the app is configured with (WEBSTATS_DATABASE_URL)."""
    from conftest import new_pg_database

    url = new_pg_database(server)
    db.upgrade(url)
    with db.session_factory(url)() as s:
        webref.load_direct(s, valid_thru=VT)
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", url)
    return url


def test_database_down_after_start_answers_what_it_knows(pg_server, clean_env, monkeypatch, caplog):
    """A database that goes away under a running web (a restart, a failover) takes only what
    needs it: the redirects and 404s of the data version last read, and the pages and files
    built for it, still answer; a body not built yet is 503 until the database is back."""

    url = _reference_database(pg_server, monkeypatch)
    client = create_app(load_settings()).test_client()
    page = client.get(P + "bioc/affy/")
    assert page.status_code == 200
    _allow_connections(url, False)
    try:
        assert client.get("/healthz").status_code == 503
        again = client.get(P + "bioc/affy/")
        assert again.status_code == 200 and again.data == page.data
        assert again.headers["ETag"] == page.headers["ETag"]
        moved = client.get(P + "bioc/affy")
        assert moved.status_code == 301 and moved.headers["Location"] == P + "bioc/affy/"
        assert client.get(P + "bioc/nosuchpkg/").status_code == 404
        assert client.get(P + "bioc/affy/affy_1999_stats.tab").status_code == 404
        unbuilt = client.get(P + "bioc/limma/")
        assert unbuilt.status_code == 503 and "unavailable" in unbuilt.text
    finally:
        _allow_connections(url, True)
    assert client.get(P + "bioc/limma/").status_code == 200
    said = [r.getMessage() for r in caplog.records if r.name == "bioc_webstats.web.app"]
    down = [m for m in said if m.startswith("database unavailable (")]
    assert len(down) == 1 and "answering from data version" in down[0], said
    assert said.count("database available again") == 1, said
    assert client.get("/healthz").status_code == 200
    db.dispose_engine(url)


def test_a_worker_started_during_an_outage_answers_from_the_published_version(
    pg_server, clean_env, monkeypatch, caplog
):
    """A worker that starts while the database is down (recycled after max_requests, the
    service restarted) knew no data version: its redirects and 404s were 503. It now takes the
    published one, its snapshot read from the published pkg_stats files (the same snapshot
    as the database's), and loads it from the database once it answers."""
    from bioc_webstats.publish import publish
    from bioc_webstats.web import report

    url = _reference_database(pg_server, monkeypatch)
    settings = load_settings()
    publish(settings)
    first = create_app(settings)
    site = first.extensions["webstats"]
    state = site.state()
    cur = site.site.current()
    assert site.site.meta(cur)["valid_thru"] == VT.isoformat()

    def read(relpath: str) -> bytes | None:
        found = site.site.lookup(cur, relpath)
        return found.read_bytes() if found is not None else None

    with db.session_factory(url)() as session:
        from_db = report.load_snapshot(session, state.version, state.valid_thru)
    assert report.snapshot_from_files(read, state.version, state.valid_thru) == from_db
    assert from_db.categories["bioc"].years  # (not two empty snapshots)

    _allow_connections(url, False)
    try:
        client = create_app(load_settings()).test_client()  # a worker started now
        assert client.get("/healthz").status_code == 503
        moved = client.get(P + "bioc/affy.html?x=1")
        assert (moved.status_code, moved.headers["Location"]) == (301, P + "bioc/affy/?x=1")
        assert client.get(P + "bioc/nosuchpkg/").status_code == 404
        assert client.get(P + "bioc/affy/affy_1999_stats.tab").status_code == 404
        assert client.get(P + "bioc/bioc_packages.txt").status_code == 200  # published
        unbuilt = client.get(P + "bioc/limma/")
        assert unbuilt.status_code == 503 and "unavailable" in unbuilt.text
    finally:
        _allow_connections(url, True)
    assert client.get(P + "bioc/limma/").status_code == 200
    worker = client.application.extensions["webstats"]
    assert worker._snap[2] is False  # reloaded from the database
    db.dispose_engine(url)


def test_a_damaged_meta_value_is_503_not_500(loaded):
    client, url = loaded
    with db.session_factory(url)() as s:
        db.set_meta(s, db.DATA_VERSION, "x")
        s.commit()
    for path in ("", "bioc/affy/", "bioc/affy"):
        r = client.get(P + path)
        assert r.status_code == 503, path
        assert "unavailable" in r.text and "Traceback" not in r.text


SEGMENTS = [
    "bioc",
    "data-annotation",
    "data-experiment",
    "workflows",
    "affy",
    "limma",
    "TReNA",
    "trena",
    "cn.mops",
    "ag.db",
    "index.html",
    "bioc_stats.tab",
    "bioc_pkg_stats.tab",
    "affy_stats.tab",
    "affy_2024_stats.tab",
    "affy_2009_stats.tab",
    "bioc_2015_stats.tab",
    "annotation_packages.txt",
    "..",
    ".",
    "",
    "%00",
    "%ff%fe",
    "%c3%28",
    "%2e%2e",
    "%2F",
    "%61ffy",
    "%252e",
    FW,
    "a b",
    "~",
    "affy.html",
    "main.css",
    "\u00e9t\u00e9",
    "%e2%80%ae",
]


def generated_urls(n: int, seed: int = 20240331) -> list[str]:
    """Seeded random URLs under the prefix (and a few outside it)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        depth = rng.randint(0, 5)
        parts = []
        for _ in range(depth):
            kind = rng.random()
            if kind < 0.7:
                parts.append(rng.choice(SEGMENTS))
            elif kind < 0.8:
                parts.append(
                    "".join(rng.choice("abcXYZ019._-%") for _ in range(rng.randint(1, 12)))
                )
            elif kind < 0.9:
                parts.append("%" + "%".join(f"{rng.randrange(256):02x}" for _ in range(3)))
            else:
                parts.append("x" * rng.choice([255, 1000, 5000]))
        url = P + "/".join(parts)
        if rng.random() < 0.3:
            url += "/"
        if rng.random() < 0.1:
            url += "?q=" + rng.choice(["1", "%ff", "a&b=c", ".."])
        if rng.random() < 0.05:
            url = url.replace(P, rng.choice(["/packages/stat/", "/", "/packages/stats//"]), 1)
        out.append(url)
    return out


def test_generated_urls_never_5xx(loaded):
    client, _ = loaded
    statuses: dict[int, int] = {}
    for url in generated_urls(10_000):
        r = client.get(url)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, url
        assert r.status_code in (200, 301, 304, 308, 400, 404, 405, 414), url
    # the generator reaches real files too, not just 404s
    assert statuses.get(200, 0) > 100 and statuses.get(404, 0) > 1000


@contextlib.contextmanager
def _app_on_a_cluster_of_its_own(monkeypatch) -> Iterator[tuple[str, str, FlaskClient]]:
    """(base URL, database URL, client): the reference data on a throw-away cluster of its
    own (a test may stop its processes or drop its packets), and an app on it."""
    from conftest import pg_cluster

    with pg_cluster() as base:
        url = _reference_database(base, monkeypatch)
        yield base, url, create_app(load_settings()).test_client()
        db.dispose_engine(url)


def _cluster_pids(url: str) -> list[int]:
    """The postmaster of the cluster behind ``url`` and every process it started."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        data = conn.execute(sa.text("SHOW data_directory")).scalar_one()
    engine.dispose()
    with open(f"{data}/postmaster.pid") as f:
        postmaster = int(f.readline())
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            children.append(int(stat.parent.name))
    return [postmaster, *children]


def test_healthz_answers_503_at_once_when_the_database_hangs(clean_env, monkeypatch):
    """A database that accepts and never answers (here: every process of its cluster stopped)
    held /healthz until nginx's 504 minutes later; the deploy and the watchdog need a 503.
    Its check waits a bounded time on a thread of its own, and a hung check is not joined by
    the next one."""
    import os
    import signal
    import threading

    from bioc_webstats.web import app as webapp
    from conftest import wait_for

    monkeypatch.setattr(webapp, "HEALTH_TIMEOUT", 1.0)
    with _app_on_a_cluster_of_its_own(monkeypatch) as (_base, url, client):
        assert client.get("/healthz").status_code == 200  # its pool now holds a connection
        pids = _cluster_pids(url)
        answers: list = []

        def ask() -> None:
            r = client.get("/healthz")
            answers.append((r.status_code, r.json))

        # (runuser, the cluster's parent, stops itself when its child stops: resumed too)
        parent = int(Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])

        def send(sig: int, targets: list[int]) -> None:
            for pid in targets:
                with contextlib.suppress(ProcessLookupError):  # a short-lived child
                    os.kill(pid, sig)

        send(signal.SIGSTOP, pids)
        try:
            for _ in range(2):  # the first check hangs; the second finds it still hanging
                asker = threading.Thread(target=ask, daemon=True)
                asker.start()
                asker.join(60)
                assert not asker.is_alive(), "/healthz did not answer while the database hangs"
            assert [(code, body["status"], body["database"]) for code, body in answers] == [
                (503, "error", False),
                (503, "error", False),
            ]
        finally:
            send(signal.SIGCONT, [*pids, parent])
        wait_for(lambda: client.get("/healthz").status_code == 200, 60, what="healthz 200 again")


def test_a_database_cut_off_by_the_network_is_503_not_a_hung_request(clean_env, monkeypatch):
    """A failover or a partition: the server stops answering, nothing closes the connection.
    The request that needs the database must end (503), not wait out the kernel's quarter of
    an hour of retransmissions with a worker thread (libpq's tcp_user_timeout, keepalives).
    The packets to and from a real cluster's port are dropped (iptables; the tests run as
    root)."""
    import subprocess
    import threading

    monkeypatch.setattr(db, "TCP_TIMEOUT", 3)
    with _app_on_a_cluster_of_its_own(monkeypatch) as (base, _url, client):
        assert client.get(P + "bioc/affy/").status_code == 200  # a pooled connection now
        port = base.rsplit(":", 1)[1]
        rules = [
            ["INPUT", "-p", "tcp", flag, port, "-m", "comment", "--comment", "webstats-test",
             "-j", "DROP"]
            for flag in ("--dport", "--sport")
        ]  # fmt: skip
        answers: list[int] = []

        def ask() -> None:
            answers.append(client.get(P + "bioc/limma/").status_code)  # not built yet

        for rule in rules:
            subprocess.run(["iptables", "-I", *rule], check=True)
        try:
            asker = threading.Thread(target=ask, daemon=True)
            asker.start()
            asker.join(120)
            assert not asker.is_alive(), "the request hung on the unreachable database"
        finally:
            for rule in rules:
                subprocess.run(["iptables", "-D", *rule], check=True)
        assert answers == [503]
        assert client.get(P + "bioc/limma/").status_code == 200  # back: a new connection


def test_a_table_locked_by_a_migration_or_a_restore_is_503_not_a_hung_request(
    pg_server, clean_env, monkeypatch
):
    """A migration, or a restore's single-transaction pg_restore --clean, holds the tables
    alone for minutes while the web serves: a request that needs the database waited for them
    until nginx's 504. It waits WEB_LOCK_TIMEOUT (5 s), then answers what it can without the
    database (404 for a package it knows is not there) or 503."""
    import threading

    import sqlalchemy as sa

    url = _reference_database(pg_server, monkeypatch)
    client = create_app(load_settings()).test_client()
    assert client.get(P + "bioc/affy/").status_code == 200  # its snapshot and a pooled login
    answers: dict[str, int] = {}

    def ask(path: str) -> None:
        answers[path] = client.get(P + path).status_code

    locker = sa.create_engine(url)
    try:
        with locker.begin() as conn:
            conn.execute(sa.text("LOCK TABLE packages, package_stats, category_stats, meta "
                                 "IN ACCESS EXCLUSIVE MODE"))  # fmt: skip
            askers = [threading.Thread(target=ask, args=(path,), daemon=True)
                      for path in ("bioc/limma/", "bioc/no-such-package/")]  # fmt: skip
            for asker in askers:
                asker.start()
            for asker in askers:
                asker.join(60)
                assert not asker.is_alive(), "a request waited for the locked tables"
    finally:
        locker.dispose()
    assert answers == {"bioc/limma/": 503, "bioc/no-such-package/": 404}
    assert client.get(P + "bioc/limma/").status_code == 200  # the tables are free again
    db.dispose_engine(url)


def test_a_move_to_a_category_without_downloads_yet_links_nowhere(loaded):
    """A package closed here and open in a category where it has no download yet: its page
    there is a 404, so the sentence is said without a link to it (it linked to the 404)."""
    from sqlalchemy import update

    from bioc_webstats.store.models import Package

    client, url = loaded
    with db.session_factory(url)() as s:
        s.execute(
            update(Package)
            .where(Package.package == "affy", Package.category == "bioc")
            .values(last_release="3.18")
        )
        s.add(Package(package="affy", category="experiment", first_release="3.19"))
        db.bump_data_version(s)
        s.commit()
    assert client.get(P + "data-experiment/affy/").status_code == 404
    page = client.get(P + "bioc/affy/").text
    assert (
        '<p class="landing">Package affy is now in the Bioconductor experiment repository</p>'
        in (page)
    )
    assert "data-experiment/affy" not in page
