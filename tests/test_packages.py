"""The packages table: ``packages load`` from a CSV and ``packages sync`` from local fixtures
and a real HTTP server on loopback, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from bioc_webstats.config import Settings, load_settings
from bioc_webstats.errors import WebstatsError
from bioc_webstats.etl.manifest import Manifest, parse_config_yaml, version_key
from bioc_webstats.etl.packages import (
    Change,
    load_csv,
    plan_changes,
    read_csv,
    shipped_csv,
    sync,
)
from bioc_webstats.httpbody import mask
from bioc_webstats.store import db
from bioc_webstats.store.models import (
    CategoryStat,
    DownloadRecord,
    IngestedObject,
    Package,
    PackageStat,
)
from conftest import free_port

FIXTURES = Path(__file__).parent / "fixtures" / "sync"
SAMPLE = FIXTURES / "packages_sample.csv"
DEVEL = FIXTURES / "devel"  # release 3.20, devel 3.21; see the expected changes below
CLI = str(Path(sys.executable).parent / "bioc-webstats")

EXPECTED_CHANGES = {  # (package, category) → (first, last) after the sync; None = new row
    ("NewPkgA", "bioc"): (None, ("3.21", None)),
    ("zz.newpkg2", "bioc"): (None, ("3.21", None)),
    ("ASAFE", "bioc"): (("3.4", None), ("3.4", "3.20")),  # gone from devel
    ("BGmix", "bioc"): (("2.2", "3.17"), ("2.2", None)),  # returning
    ("BCRANK", "bioc"): (("2.2", None), ("2.2", "3.20")),  # moved to experiment ...
    ("BCRANK", "experiment"): (None, ("3.21", None)),  # ... new row there
}


def table(settings: Settings) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    with db.session_factory(settings.database_url)() as session:
        return {
            (p.package, p.category): (p.first_release, p.last_release)
            for p in session.scalars(select(Package))
        }


def data_version(settings: Settings) -> int:
    with db.session_factory(settings.database_url)() as session:
        return db.get_data_version(session)


@pytest.fixture
def settings(db_url, clean_env, monkeypatch) -> Settings:
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    return load_settings()


@pytest.fixture
def loaded(settings) -> Settings:
    load_csv(settings, SAMPLE)
    return settings


@pytest.fixture
def http_source(tmp_path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on loopback serving a copy of the fixture tree (editable by tests)."""
    root = tmp_path / "www"
    shutil.copytree(DEVEL, root)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()


# --- packages load ----------------------------------------------------------------------------


def test_load_csv_sample_and_merge(settings, tmp_path):
    assert load_csv(settings, SAMPLE) == "packages: 47 rows read, 47 added, 0 updated"
    rows = table(settings)
    assert len(rows) == 47
    assert rows[("ABAEnrichment", "bioc")] == ("3.2", "3.14")
    assert rows[("AnnBuilder", "bioc")] == ("1.8", "2.3")
    assert rows[("BSgenome.Hsapiens.UCSC.hg16", "annotation")] == ("1.9", "2.1")
    assert rows[("RNAseq123", "workflows")] == ("3.3", None)
    assert load_csv(settings, SAMPLE) == "packages: 47 rows read, 0 added, 0 updated"

    changed = tmp_path / "changed.csv"
    text = SAMPLE.read_text().replace("RNAseq123,workflows,303,", "RNAseq123,workflows,303,320")
    changed.write_text(text + "NewOne,bioc,3.21,\n")
    assert load_csv(settings, changed) == "packages: 48 rows read, 1 added, 1 updated"
    rows = table(settings)
    assert rows[("RNAseq123", "workflows")] == ("3.3", "3.20")
    assert rows[("NewOne", "bioc")] == ("3.21", None)


@pytest.mark.parametrize(
    "body, message",
    [
        ("package,category\nx,bioc\n", "header must have columns"),
        ("package,category,first_version,last_version\nx,nope,301,\n", ":2: unknown category"),
        ("package,category,first_version,last_version\nx,bioc,3x,\n", ":2: not a release code"),
        (  # longer than the column: passed the check, then failed in the database, unnamed
            "package,category,first_version,last_version\nokpkg,bioc,3.1,9999999999999999.1\n",
            ":2: not a release code",
        ),
        (  # no line break (a binary file, /dev/zero): one line, not all the memory
            "package,category,first_version,last_version\n" + "x" * 70_000,
            r"bad.csv:2: line longer than 65536 characters",
        ),
        (
            "package,category,first_version,last_version\nokpkg,bioc,314,310\n",
            ":2: last release 3.10 is before first release 3.14",
        ),
        (  # compared as numbers, not as text: 3.9 < 3.10
            "package,category,first_version,last_version\nokpkg,bioc,3.10,3.9\n",
            ":2: last release 3.9 is before first release 3.10",
        ),
        (  # the first one was used, silently
            "package,category,first_version,last_version,package\nokpkg,bioc,301,,other\n",
            r"bad.csv: header has column package more than once$",
        ),
    ],
)
def test_load_csv_bad_input_changes_nothing(loaded, tmp_path, body, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(body)
    before = table(loaded)
    with pytest.raises(WebstatsError, match=message):
        load_csv(loaded, bad)
    assert table(loaded) == before


# --- packages sync ----------------------------------------------------------------------------


def test_sync_new_removed_returning_moved(loaded):
    before = table(loaded)
    version = data_version(loaded)
    report = sync(loaded, source=str(DEVEL), dry_run=False, force=False)

    after = table(loaded)
    diff = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()}
    diff = {k: v for k, v in diff.items() if v[0] != v[1]}
    assert diff == EXPECTED_CHANGES
    changed_version = data_version(loaded)
    assert changed_version > version  # the pages follow a table change

    lines = report.splitlines()
    assert lines[0] == (
        f"packages sync from {DEVEL}: release 3.20, devel 3.21, 40 packages in devel; "
        "6 changes: 3 added, 2 closed, 1 reopened, 1 moved"
    )
    assert lines[1:] == [
        "  add    bioc/NewPkgA (first 3.21)",
        "  add    bioc/zz.newpkg2 (first 3.21)",
        "  close  bioc/ASAFE (last 3.20)",
        "  close  bioc/BCRANK (last 3.20; moved to experiment)",
        "  reopen bioc/BGmix (was last 3.17)",
        "  add    experiment/BCRANK (first 3.21; moved from bioc)",
        "applied",
    ]

    # A second sync finds the table in line with devel: nothing changes, not even the version.
    again = sync(loaded, source=str(DEVEL), dry_run=False, force=False)
    assert again.splitlines()[-1] == "nothing to change"
    assert "0 changes" in again.splitlines()[0]
    assert table(loaded) == after
    assert data_version(loaded) == changed_version


def test_sync_recomputes_the_touched_packages(loaded):
    """Records of names unknown in a category are kept; once the sync adds the name there,
    its statistics (and the category's) appear in the same transaction."""
    day = dt.date(2024, 3, 5)
    with db.session_factory(loaded.database_url).begin() as session:
        obj = IngestedObject(
            key="E1.2024-03-05-10.abc.gz",
            size=1,
            name_hour=dt.datetime(2024, 3, 5, 10),
            ingested_at=dt.datetime.now(dt.UTC),
        )
        session.add(obj)
        session.flush()
        for cat, pkg, ip, n in [
            ("experiment", "BCRANK", 1, 3),
            ("experiment", "BCRANK", 2, 4),
            ("bioc", "NewPkgA", 1, 5),
            ("bioc", "NotInDevel", 9, 1),
        ]:
            session.add(
                DownloadRecord(
                    object_id=obj.id, category=cat, package=pkg, day=day, ip_hash=ip, downloads=n
                )
            )
    sync(loaded, source=str(DEVEL), dry_run=False, force=False)
    with db.session_factory(loaded.database_url)() as session:
        stats = {
            (s.category, s.package, s.year, s.month): (s.ips, s.downloads)
            for s in session.scalars(select(PackageStat))
        }
        cats = {
            (c.category, c.year, c.month): (c.ips, c.downloads)
            for c in session.scalars(select(CategoryStat))
        }
    assert stats == {
        ("experiment", "BCRANK", 2024, 3): (2, 7),
        ("experiment", "BCRANK", 2024, 0): (2, 7),
        ("bioc", "NewPkgA", 2024, 3): (1, 5),
        ("bioc", "NewPkgA", 2024, 0): (1, 5),
    }
    assert cats[("experiment", 2024, 3)] == (2, 7) and cats[("bioc", 2024, 0)] == (1, 5)


def test_sync_change_limit_stops_unless_forced(loaded, monkeypatch):
    monkeypatch.setenv("WEBSTATS_ETL_SYNC_CHANGE_LIMIT", "5")
    settings = load_settings()
    before = table(settings)
    with pytest.raises(WebstatsError) as exc:
        sync(settings, source=str(DEVEL), dry_run=False, force=False)
    assert str(exc.value) == (
        "packages sync: 6 changes exceed the change limit of 5 (etl/sync_change_limit); "
        "nothing changed. Review them with --dry-run, apply them with --force"
    )
    assert table(settings) == before
    report = sync(settings, source=str(DEVEL), dry_run=False, force=True)
    assert report.endswith("applied")
    assert len([k for k in table(settings) if k not in before]) == 3


def test_sync_dry_run_writes_nothing(loaded, monkeypatch):
    monkeypatch.setenv("WEBSTATS_ETL_SYNC_CHANGE_LIMIT", "2")
    settings = load_settings()
    before, version = table(settings), data_version(settings)
    report = sync(settings, source=str(DEVEL), dry_run=True, force=False)
    assert table(settings) == before and data_version(settings) == version
    lines = report.splitlines()
    assert "  close  bioc/ASAFE (last 3.20)" in lines
    assert lines[-2:] == [
        "6 changes over the change limit of 2: a real run needs --force",
        "dry run: nothing written",
    ]


def _broken_copy(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    shutil.copytree(DEVEL, root)
    return root


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_dir", "packages source {root}/nowhere: not a directory nor an http(s):// URL"),
        (
            "no_packages",
            "cannot read {root}/packages/devel/workflows/src/contrib/PACKAGES: "
            "No such file or directory",
        ),
        (
            "empty_packages",
            "{root}/packages/devel/data/annotation/src/contrib/PACKAGES: "
            "no Package: fields (not a PACKAGES file?)",
        ),
        (
            "html_packages",
            "{root}/packages/devel/bioc/src/contrib/PACKAGES: "
            "no Package: fields (not a PACKAGES file?)",
        ),
        (
            "bad_name",
            "{root}/packages/devel/bioc/src/contrib/PACKAGES:1: invalid package name '../etc'",
        ),
        ("no_devel", "{root}/config.yaml: devel_version must be a version like 3.20, got missing"),
        (
            "bad_version",
            "{root}/config.yaml: release_version must be a version like 3.20, got 'latest'",
        ),
        (  # longer than the column: --dry-run listed what the real run then failed to store
            "long_version",
            "{root}/config.yaml: release_version must be a version like 3.20, "
            "got '3.99999999999999999999'",
        ),
        (  # stored as a release, and a correct sync after it changed nothing
            "leading_zero",
            "{root}/config.yaml: release_version must be a version like 3.20, got '03.20'",
        ),
        (
            "three_digits",
            "{root}/config.yaml: devel_version must be a version like 3.20, got '3.021'",
        ),
        (
            "devel_not_after",
            "{root}/config.yaml: devel_version 3.20 is not after release_version 3.20",
        ),
        (  # str's \\d takes any script's digits: '٣.٢٠' was stored as a release
            "arabic_digits",
            "{root}/config.yaml: release_version must be a version like 3.20, got '٣.٢٠'",
        ),
        (  # names that 'packages load' refuses (the column holds 200 characters)
            "dotdot_name",
            "{root}/packages/devel/bioc/src/contrib/PACKAGES:3: package name 'a..b' contains a "
            "path ('/', '\\' or '..')",
        ),
        (
            "long_name",
            "{root}/packages/devel/bioc/src/contrib/PACKAGES:1: package name longer than 200 "
            "characters (201)",
        ),
        (  # split into lines whole: 66 MB took 1.4 GB; it is a few KB ("not a PACKAGES file")
            "big_config",
            "cannot read {root}/config.yaml: larger than 1048576 bytes",
        ),
        (  # held as a set of names
            "many_names",
            "{root}/packages/devel/bioc/src/contrib/PACKAGES: more than 3 packages, "
            "not a PACKAGES file",
        ),
    ],
)
def test_sync_bad_source_is_one_line_and_changes_nothing(
    loaded, tmp_path, monkeypatch, breakage, message
):
    from bioc_webstats.etl import manifest

    root = _broken_copy(tmp_path)
    contrib = root / "packages" / "devel"
    conf = root / "config.yaml"
    source = str(root)
    if breakage == "no_dir":
        source = str(root / "nowhere")
    elif breakage == "no_packages":
        (contrib / "workflows/src/contrib/PACKAGES").unlink()
    elif breakage == "empty_packages":
        (contrib / "data/annotation/src/contrib/PACKAGES").write_text("\n\n")
    elif breakage == "html_packages":
        (contrib / "bioc/src/contrib/PACKAGES").write_text("<html><body>Moved</body></html>\n")
    elif breakage == "bad_name":
        (contrib / "bioc/src/contrib/PACKAGES").write_text("Package: ../etc\nVersion: 1\n")
    elif breakage == "no_devel":
        conf.write_text('release_version: "3.20"\n')
    elif breakage == "bad_version":
        conf.write_text('release_version: "latest"\ndevel_version: "3.21"\n')
    elif breakage == "leading_zero":
        conf.write_text('release_version: "03.20"\ndevel_version: "3.21"\n')
    elif breakage == "three_digits":
        conf.write_text('release_version: "3.20"\ndevel_version: "3.021"\n')
    elif breakage == "devel_not_after":
        conf.write_text("release_version: 3.20\ndevel_version: '3.20'\n")
    elif breakage == "arabic_digits":
        conf.write_text('release_version: "٣.٢٠"\ndevel_version: "3.21"\n', encoding="utf-8")
    elif breakage == "long_version":
        conf.write_text('release_version: "3.99999999999999999999"\ndevel_version: "4.0"\n')
    elif breakage == "dotdot_name":
        (contrib / "bioc/src/contrib/PACKAGES").write_text("Package: ab\n\nPackage: a..b\n")
    elif breakage == "long_name":
        (contrib / "bioc/src/contrib/PACKAGES").write_text(f"Package: {'a' * 201}\n")
    elif breakage == "big_config":
        conf.write_bytes(conf.read_bytes() + b"#\n" * (1 << 19))
    elif breakage == "many_names":
        monkeypatch.setattr(manifest, "MAX_PACKAGES", 3)
        (contrib / "bioc/src/contrib/PACKAGES").write_text(
            "".join(f"Package: p{n}\n\n" for n in range(4))
        )
    before, version = table(loaded), data_version(loaded)
    with pytest.raises(WebstatsError) as exc:
        sync(loaded, source=source, dry_run=False, force=True)
    assert str(exc.value) == message.format(root=root)
    assert table(loaded) == before and data_version(loaded) == version


def test_sync_over_http(loaded, http_source):
    url, _ = http_source
    report = sync(loaded, source=url, dry_run=False, force=False)
    assert report.startswith(f"packages sync from {url}: release 3.20, devel 3.21")
    assert report.endswith("applied")
    assert table(loaded)[("BCRANK", "experiment")] == ("3.21", None)


def test_sync_http_errors_are_one_line(settings, http_source, tmp_path):
    url, root = http_source
    (root / "packages/devel/workflows/src/contrib/PACKAGES").unlink()
    with pytest.raises(WebstatsError) as exc:
        sync(settings, source=url, dry_run=True, force=False)
    assert str(exc.value) == (
        f"cannot fetch {url}packages/devel/workflows/src/contrib/PACKAGES: HTTP 404 File not found"
    )

    port = free_port()  # nothing listens there
    with pytest.raises(WebstatsError) as exc:
        sync(settings, source=f"http://127.0.0.1:{port}", dry_run=True, force=False)
    assert str(exc.value) == f"cannot fetch http://127.0.0.1:{port}/config.yaml: Connection refused"


def test_sync_http_timeout_is_one_line(settings):
    # A server that accepts the connection and never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        with pytest.raises(WebstatsError) as exc:
            sync(
                settings, source=f"http://127.0.0.1:{port}", dry_run=True, force=False, timeout=0.5
            )
    assert str(exc.value) == f"cannot fetch http://127.0.0.1:{port}/config.yaml: timed out"


@contextlib.contextmanager
def scripted_server(parts: list[tuple[bytes, float]]) -> Iterator[str]:
    """A server that answers every connection with ``parts`` (bytes, then a pause), then
    closes: broken HTTP the way a proxy or a bad mirror sends it."""
    stop = threading.Event()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    lsock.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)
                try:
                    for data, pause in parts:
                        conn.sendall(data)
                        if stop.wait(pause):
                            break
                except OSError:
                    pass  # the client gave up

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{lsock.getsockname()[1]}"
    finally:
        stop.set()
        t.join(10)
        lsock.close()


@pytest.mark.parametrize(
    "parts,why",
    [
        ([(b"HELLO THIS IS NOT HTTP\r\n\r\n", 0)], "not a valid HTTP answer (BadStatusLine)"),
        (
            [(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nrelease_version: 3.20\n", 0)],
            "cut short: 22 of 100 bytes",
        ),
        (
            [(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", 0)] + [(b"r", 0.2)] * 40,
            "not complete after 1 s (",
        ),
        (
            [(b"HTTP/1.1 200 OK\r\n" + b"X-H: v\r\n" * 200 + b"\r\n", 0)],
            "not a valid HTTP answer (HTTPException)",
        ),
    ],
)
def test_sync_broken_http_is_one_line(settings, monkeypatch, parts, why):
    """Not HTTP, a body shorter than its Content-Length (taken whole before: a truncated
    PACKAGES closed packages), a body trickled past the per-file deadline, too many headers."""
    from bioc_webstats.etl import manifest

    monkeypatch.setattr(manifest, "FETCH_DEADLINE", 1.0)
    with scripted_server(parts) as url:
        with pytest.raises(WebstatsError) as exc:
            sync(settings, source=url, dry_run=True, force=False, timeout=5)
    assert str(exc.value).startswith(f"cannot fetch {url}/config.yaml: {why}"), exc.value


@pytest.mark.parametrize(
    "source, why",
    [
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://127.0.0.1:99999/", "Port out of range 0-65535"),  # was fetched, port 34463
        ("http://a b/", "a space or a control character in the host"),  # retried as a fetch
        (
            "Https://user:s3cr3t@h/",
            "credentials in the URL are not supported: the site must be public",
        ),
    ],
)
def test_sync_from_a_broken_url_is_one_line(settings, source, why):
    with pytest.raises(WebstatsError) as exc:
        sync(settings, source=source, dry_run=True, force=False)
    assert str(exc.value) == f"packages source {mask(source)}: not a usable URL ({why})"
    assert "s3cr3t" not in str(exc.value)


def test_sync_accepts_an_upper_case_scheme(loaded, http_source):
    url = http_source[0].replace("http://", "HTTP://")
    assert sync(loaded, source=url, dry_run=True, force=False).startswith(
        f"packages sync from {url}: release 3.20, devel 3.21"
    )


def test_sync_headers_trickled_past_the_deadline(settings, monkeypatch):
    """The deadline bounded only the body: headers sent a byte at a time held the sync."""
    from bioc_webstats.etl import manifest

    monkeypatch.setattr(manifest, "FETCH_DEADLINE", 1.0)
    trickle = [(b"HTTP/1.1 200 OK\r\nX-Slow: ", 0), *[(b"z", 0.2)] * 30, (b"\r\n\r\n", 0)]
    with scripted_server(trickle) as url:
        with pytest.raises(WebstatsError) as exc:
            sync(settings, source=url, dry_run=True, force=False, timeout=5)
    assert str(exc.value).startswith(f"cannot fetch {url}/config.yaml: not complete after 1 s (")


def test_sync_from_a_fifo_is_one_line(tmp_path):
    """A FIFO for config.yaml held the sync forever (opened for reading, it waits for a writer)."""
    from bioc_webstats.etl.manifest import read_manifest
    from test_compare import _run_bounded

    root = _broken_copy(tmp_path)
    (root / "config.yaml").unlink()
    os.mkfifo(root / "config.yaml")

    def unblock() -> None:
        os.close(os.open(root / "config.yaml", os.O_WRONLY | os.O_NONBLOCK))

    exc = _run_bounded(lambda: read_manifest(str(root)), unblock)
    assert isinstance(exc, WebstatsError) and str(exc) == (
        f"cannot read {root}/config.yaml: not a regular file (a FIFO, a device or a socket)"
    )


def test_packages_load_reads_a_pipe_and_bounds_a_device(tmp_path):
    """`packages load <(curl …)` hands a pipe: it is read as a file (a FIFO waits for its
    writer, as `cat` does); a link to /dev/zero is cut off at the size cap, one line."""
    import threading

    fifo = tmp_path / "packages.fifo"
    os.mkfifo(fifo)
    text = "package,category,first_version,last_version\naffy,bioc,114,\n"
    writer = threading.Thread(target=lambda: fifo.write_text(text), daemon=True)
    writer.start()
    assert read_csv(fifo) == [("affy", "bioc", "1.14", None)]
    writer.join(10)
    zero = tmp_path / "zero.csv"
    zero.symlink_to("/dev/zero")
    with pytest.raises(WebstatsError) as exc:
        read_csv(zero)
    assert str(exc.value).startswith(f"{zero}:")


def test_a_csv_too_large_for_a_packages_table_is_refused_early(tmp_path):
    """64 MiB of short rows passed the old cap and took 5 GB (every row held, then an
    object each): refused by rows, and by bytes where rows repeat (read once)."""
    head = "package,category,first_version,last_version\n"
    many = tmp_path / "many.csv"
    many.write_text(head + "".join(f"P{i:07d},bioc,,\n" for i in range(50_001)))
    with pytest.raises(WebstatsError, match=r"many.csv: more than 50000 rows, not a packages"):
        read_csv(many)
    same = tmp_path / "same.csv"
    same.write_text(head + "affy,bioc,114,\n" * 300_000)  # 4.3 MB
    with pytest.raises(WebstatsError, match=r"same.csv: larger than 4 MiB, not a packages CSV"):
        read_csv(same)


@pytest.mark.parametrize("sep", ["\u2028", "\x1c", "\x85", "\r"])
def test_sync_reads_lines_split_at_newlines_only(tmp_path, sep):
    """splitlines made a package of 'License: A\u2028Package: PhantomA'; a config.yaml
    starting with a byte-order mark had no release_version."""
    from bioc_webstats.etl.manifest import read_manifest

    root = _broken_copy(tmp_path)
    (root / "config.yaml").write_bytes(b"\xef\xbb\xbfrelease_version: 3.20\ndevel_version: 3.21\n")
    bioc = root / "packages/devel/bioc/src/contrib/PACKAGES"
    bioc.write_text(bioc.read_text() + f"\nPackage: Real\nLicense: A{sep}Package: PhantomA\n")
    found = read_manifest(str(root))
    assert found.release_version == "3.20"
    assert "Real" in found.devel["bioc"] and "PhantomA" not in found.devel["bioc"]


def test_a_sync_while_another_writer_runs_stops_at_once(loaded, capsys):
    """SysOps' `packages sync --force` while the daily job (which syncs too) runs: it failed
    on a row the other had just added, or waited silently behind its count. It now stops at
    once naming the holder, like every writer; a dry run (it writes nothing) still runs."""
    from bioc_webstats import cli

    before = table(loaded)
    with cli.writer_lock(loaded, "daily"):
        with pytest.raises(SystemExit) as done:
            cli.main(["packages", "sync", "--from", str(DEVEL), "--force"])
        assert done.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("bioc-webstats: error: packages sync: not started, 'daily' (pid")
        assert table(loaded) == before
        with pytest.raises(SystemExit) as done:
            cli.main(["packages", "sync", "--from", str(DEVEL), "--dry-run"])
        assert done.value.code in (0, None)
        assert capsys.readouterr().out.splitlines()[-1] == "dry run: nothing written"
    with db.session_factory(loaded.database_url)() as s:
        assert db.get_meta(s, "last_sync_ok") is None  # neither refused nor dry runs count
    with pytest.raises(SystemExit) as done:
        cli.main(["packages", "sync", "--from", str(DEVEL), "--force"])
    assert done.value.code in (0, None)
    assert table(loaded) != before
    # the runbook's fix for sync-not-run: a sync by hand is a successful sync (it was not:
    # status kept the old time, the alarm went on every 6 h until the next night)
    with db.session_factory(loaded.database_url)() as s:
        assert db.get_meta(s, "last_sync_ok") is not None


def test_a_dry_run_publishes_nothing(loaded, tmp_path, monkeypatch, capsys):
    """A dry run (a sync's, a log run's) "writes nothing": it published the site when it was
    behind the database, also while another writer held the lock mid-import, and called
    CloudFront."""
    from bioc_webstats import cli
    from bioc_webstats.web.site import PublishedSite

    assert PublishedSite(loaded.publish_dir).current() is None  # behind: loaded, not published
    monkeypatch.setenv("WEBSTATS_ETL_LOGS_SINCE", "2024-01-01")
    (tmp_path / "no-logs").mkdir()
    for args in (
        ["packages", "sync", "--from", str(DEVEL), "--dry-run"],
        ["etl", "run", "--source", str(tmp_path / "no-logs"), "--dry-run"],
    ):
        with pytest.raises(SystemExit) as done:
            cli.main(args)
        assert done.value.code in (0, None), capsys.readouterr().err
        assert PublishedSite(loaded.publish_dir).current() is None, args
    with pytest.raises(SystemExit) as done:  # the real thing catches up
        cli.main(["etl", "run", "--source", str(tmp_path / "no-logs")])
    assert PublishedSite(loaded.publish_dir).current() is not None


def test_a_load_while_another_writer_runs_stops_at_once(settings, tmp_path, capsys):
    """`packages load` recounts what it changes, like a sync: it wrote beside the daily job."""
    from bioc_webstats import cli

    with cli.writer_lock(settings, "daily"):
        with pytest.raises(SystemExit) as done:
            cli.main(["packages", "load", str(SAMPLE)])
        assert done.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("bioc-webstats: error: packages load: not started, 'daily' (pid")
        assert table(settings) == {}
    with pytest.raises(SystemExit) as done:
        cli.main(["packages", "load", str(SAMPLE)])
    assert done.value.code in (0, None)
    assert table(settings) != {}


def test_the_default_change_limit_lets_a_release_through_and_stops_a_lost_file():
    """A release removes its deprecated packages from devel at once: with a limit under that,
    the daily sync stopped (and alarmed daily until forced) after most releases (3.16: 52,
    3.18: 75 closed). The limit still stops a lost or emptied PACKAGES file."""
    from bioc_webstats.config import BY_NAME

    limit = int(BY_NAME["etl/sync_change_limit"].default)
    rows = read_csv(shipped_csv())
    closed: dict[str, int] = {}
    for _, _, _, last in rows:
        if last is not None:
            closed[last] = closed.get(last, 0) + 1
    recent = {v: n for v, n in closed.items() if version_key(v) >= version_key("3.10")}
    assert len(recent) >= 9 and max(recent.values()) >= 100, recent
    assert max(recent.values()) * 1.5 < limit, recent
    open_in = {c: sum(1 for _, cat, _, last in rows if cat == c and last is None)
               for c in ("bioc", "annotation", "experiment")}  # fmt: skip
    assert all(n > 2 * limit for n in open_in.values()), open_in


def test_sync_cli(loaded):
    env = dict(os.environ)
    res = subprocess.run(
        [CLI, "packages", "sync", "--from", str(DEVEL), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "dry run: nothing written"
    assert "  reopen bioc/BGmix (was last 3.17)" in res.stdout.splitlines()

    res = subprocess.run(
        [CLI, "packages", "sync", "--from", "/nonexistent/bioc"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 1 and res.stdout == ""
    # (after the publish it catches up on: the table was loaded, never published; the dry
    # run above publishes nothing)
    assert res.stderr.splitlines()[-1] == (
        "bioc-webstats: error: packages source /nonexistent/bioc: "
        "not a directory nor an http(s):// URL"
    )


# --- pure parts -------------------------------------------------------------------------------


def test_parse_config_yaml_top_level_only():
    text = (DEVEL / "config.yaml").read_text()
    conf = parse_config_yaml(text)
    assert conf["release_version"] == "3.20" and conf["devel_version"] == "3.21"
    assert parse_config_yaml("a: 'x' # c\nb: y # c\n  c: nested\n") == {"a": "x", "b": "y"}


def test_plan_never_released_package_closes_at_its_devel_version():
    manifest = Manifest(
        "m",
        "3.20",
        "3.21",
        {
            "bioc": frozenset({"Kept"}),
            "annotation": frozenset(),
            "experiment": frozenset(),
            "workflows": frozenset({"Wf"}),
        },
    )
    rows = {
        ("Kept", "bioc"): ("3.1", None),
        ("DevOnly", "bioc"): ("3.21", None),  # added in devel, dropped before any release
        ("Old", "bioc"): ("3.9", None),
        ("Wf", "bioc"): ("3.10", None),  # moved to workflows
        ("Wf", "workflows"): ("3.12", "3.15"),  # ... where it had been before
    }
    assert plan_changes(rows, manifest) == [
        Change("close", "bioc", "DevOnly", "3.21"),
        Change("close", "bioc", "Old", "3.20"),
        Change("close", "bioc", "Wf", "3.20", "moved to workflows"),
        Change("reopen", "workflows", "Wf", "3.15", "moved from bioc"),
    ]


# --- validation of a packages CSV (issue 12) ------------------------------------------------

HEADER = "package,category,first_version,last_version\n"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ('"ab\x00c",bioc,301,\n', r":2: package name contains a NUL$"),
        ('ok.pkg,bioc,301,\n"ab\ncd",bioc,301,\n', r":3: package name contains a newline$"),
        ('"ab\tcd",bioc,301,\n', r":2: package name contains a tab$"),
        ("../etc,bioc,301,\n", r":2: package name '\.\./etc' contains a path"),
        ("a..b,bioc,301,\n", r":2: package name 'a\.\.b' contains a path"),
        ("<script>x,bioc,301,\n", r":2: package name '<script>x' contains HTML"),
        ("a" * 201 + ",bioc,301,\n", r":2: package name longer than 200 characters \(201\)$"),
        ("ab-c,bioc,301,\n", r":2: 'ab-c' is not a valid R package name$"),
        ("limma,bioc\n", r":2: 2 columns, the header has 4$"),
        ("limma,bioc,301,,extra\n", r":2: 5 columns, the header has 4$"),
        ("edgeR,bioc,٣.١٤,\n", r":2: .*not a release code: '٣\.١٤'"),  # any script's digits
        ("edgeR,bioc,٣١٤,\n", r":2: .*not a release code: '٣١٤'"),
        ("limma,bioc,301,\naffy,bioc,101,\nlimma,bioc,302,\n",
         r":4: bioc/limma conflicts with line 2 \(same package and category, other versions\)$"),
    ],
)  # fmt: skip
def test_load_csv_refuses_bad_rows_and_writes_nothing(loaded, tmp_path, rows, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + rows, encoding="utf-8")
    before = table(loaded)
    with pytest.raises(WebstatsError, match=re.escape(str(bad)) + message) as exc:
        load_csv(loaded, bad)
    assert "\n" not in str(exc.value)
    assert table(loaded) == before


def test_load_csv_bom_and_identical_duplicates(settings, tmp_path):
    good = tmp_path / "good.csv"
    body = HEADER + "limma,bioc,109,\naffy,bioc,101,320\nlimma,bioc,109,\n"
    good.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_csv(settings, good) == "packages: 2 rows read, 2 added, 0 updated"
    assert table(settings) == {("limma", "bioc"): ("1.9", None), ("affy", "bioc"): ("1.1", "3.20")}


def test_a_load_is_one_transaction(loaded, tmp_path, monkeypatch):
    """A failure in the middle of writing (here: the recompute) leaves the table as it was."""
    from bioc_webstats.store import stats

    more = tmp_path / "more.csv"
    more.write_text(HEADER + "NewOne,bioc,321,\nNewTwo,bioc,321,\n")
    before = table(loaded)

    def boom(*_args, **_kw):
        raise WebstatsError("recompute failed")

    monkeypatch.setattr(stats, "recompute_packages", boom)
    with pytest.raises(WebstatsError, match="recompute failed"):
        load_csv(loaded, more)
    assert table(loaded) == before


# --- the shipped history: seed, then sync ---------------------------------------------------


def test_the_shipped_history_is_in_the_package():
    from bioc_webstats.etl.packages import read_csv, shipped_csv

    path = shipped_csv()
    assert path.is_file() and path.parent.name == "data"
    rows = read_csv(path)  # every row passes the validation
    assert len(rows) == 5994
    assert ("ABSSeq", "bioc", "2.14", None) in rows
    assert {r[1] for r in rows} == {"bioc", "annotation", "experiment", "workflows"}


def _devel_of_the_history(root: Path, add: int, close: int) -> Path:
    """Today's devel as the shipped history has it (every open row), with ``add`` new bioc
    packages and the first ``close`` open bioc ones gone."""
    from bioc_webstats.categories import BY_PREFIX
    from bioc_webstats.etl.manifest import packages_path
    from bioc_webstats.etl.packages import read_csv, shipped_csv

    devel: dict[str, list[str]] = {c: [] for c in BY_PREFIX}
    for pkg, cat, _first, last in read_csv(shipped_csv()):
        if last is None:
            devel[cat].append(pkg)
    devel["bioc"] = sorted(devel["bioc"])[close:] + [f"NewPkg{i}" for i in range(add)]
    (root / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text('release_version: "3.20"\ndevel_version: "3.21"\n')
    for cat, names in devel.items():
        target = root / packages_path(BY_PREFIX[cat].repo_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(f"Package: {n}\nVersion: 1.0\n\n" for n in names))
    return root


def test_seed_only_an_empty_table_then_sync_past_the_limit(settings, monkeypatch, tmp_path):
    """Seed the shipped history into an empty table; a second seed does nothing; the first
    sync after the seed adds and reopens what today's devel has even past the change limit
    (the history is as old as the release), but its closes are held to it: a PACKAGES cut
    short closed thousands with nothing said (the limit did not apply at all). The limit
    applies again, to every change, to the next syncs."""
    from bioc_webstats.etl.packages import SEEDED, seed

    monkeypatch.setenv("WEBSTATS_ETL_SYNC_CHANGE_LIMIT", "3")
    settings = load_settings()
    assert seed(settings).startswith("packages seed: the table was empty; 5994 rows loaded from ")
    version = data_version(settings)
    assert seed(settings) == "packages seed: the table has 5994 rows; nothing done"
    assert data_version(settings) == version
    with db.session_factory(settings.database_url)() as s:
        assert db.get_meta(s, SEEDED)
    cut_short = str(_devel_of_the_history(tmp_path / "cut", add=5, close=4))
    with pytest.raises(WebstatsError, match="4 closes exceed the change limit of 3"):
        sync(settings, source=cut_short, dry_run=False, force=False)
    dry = sync(settings, source=cut_short, dry_run=True, force=False).splitlines()
    assert dry[-2:] == [
        "4 closes over the change limit of 3: a real run needs --force",
        "dry run: nothing written",
    ]
    today = str(_devel_of_the_history(tmp_path / "today", add=5, close=3))
    dry = sync(settings, source=today, dry_run=True, force=False).splitlines()
    assert dry[-2].startswith("first sync since the shipped history was seeded (")
    assert dry[-2].endswith("): its adds and reopens are not held to the change limit of 3")
    assert dry[-1] == "dry run: nothing written"
    report = sync(settings, source=today, dry_run=False, force=False)
    lines = report.splitlines()
    assert lines[-1] == "applied"
    after = table(settings)
    assert after[("NewPkg0", "bioc")] == ("3.21", None)
    assert sum(1 for (_p, c), (_f, last) in after.items() if last == "3.20" and c == "bioc") >= 3
    with db.session_factory(settings.database_url)() as s:
        assert db.get_meta(s, SEEDED) is None
    assert sync(settings, source=today, dry_run=False, force=False).endswith("nothing to change")
    # the limit is back, for every change: four new packages, limit 3
    again = str(_devel_of_the_history(tmp_path / "again", add=9, close=3))
    with pytest.raises(WebstatsError, match="4 changes exceed the change limit of 3"):
        sync(load_settings(), source=again, dry_run=False, force=False)


def test_seed_cli_prints_what_it_did(settings):
    env = dict(os.environ)
    first = subprocess.run(
        [CLI, "packages", "seed"], capture_output=True, text=True, env=env, timeout=300
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("packages seed: the table was empty; 5994 rows loaded")
    again = subprocess.run(
        [CLI, "packages", "seed"], capture_output=True, text=True, env=env, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout == "packages seed: the table has 5994 rows; nothing done\n"


def test_sync_redirect_loop_is_one_line(settings):
    """urllib's reason for a redirect loop has three lines."""
    loop = [(b"HTTP/1.1 302 Found\r\nLocation: /config.yaml\r\nContent-Length: 0\r\n\r\n", 0)]
    with scripted_server(loop) as url:
        with pytest.raises(WebstatsError) as exc:
            sync(settings, source=url, dry_run=True, force=False, timeout=5)
    message = str(exc.value)
    assert message.startswith(f"cannot fetch {url}/config.yaml: HTTP 302 ") and "\n" not in message


def test_packages_load_of_no_file_is_one_usage_line(db_url, tmp_path, monkeypatch, capsys):
    """'' was opened as the current directory ("Is a directory")."""
    from test_ingest_s3 import cli_run

    for arg, why in [
        ("", "does not exist"),
        (str(tmp_path / "missing.csv"), "does not exist"),
        (str(tmp_path), "is a directory"),
    ]:
        assert cli_run(monkeypatch, db_url, tmp_path, "packages", "load", arg) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and why in err, err
