"""``bioc-webstats compare`` against a static copy of the expected site (the independent
reference of ``webref``) served over HTTP by a real server on loopback, and as a directory:
identical → exit 0; a changed number, a missing file, an extra package → named, exit 1; a
server that fails twice then answers → retried; politeness (User-Agent, a few at a time)."""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import functools
import http.server
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import webref
from bioc_webstats import compare as cmp
from bioc_webstats.config import load_settings
from bioc_webstats.store import db
from conftest import free_port
from test_ingest_s3 import cli_run

VT = dt.date(2024, 3, 31)


class Site:
    """A static site on a free loopback port: what it was asked, and its failures to come."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: Counter[str] = Counter()
        self.agents: set[str] = set()
        self.fail: dict[str, int] = {}  # path -> 503 answers still to give
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        site = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.removeprefix("/packages/stats/")
                with site.cond:
                    site.requests[path] += 1
                    site.agents.add(self.headers.get("User-Agent", ""))
                    site.in_flight += 1
                    site.max_in_flight = max(site.max_in_flight, site.in_flight)
                    site.cond.notify_all()
                    failing = site.fail.get(path, 0)
                    if failing:
                        site.fail[path] = failing - 1
                    # Held in flight a moment (ended early by one request too many) so that
                    # overlapping requests are seen; out of flight before the answer is
                    # written: once the client has it, it may send its next one at once.
                    site.cond.wait_for(lambda: site.in_flight > 4, timeout=0.02)
                    site.in_flight -= 1
                if failing:
                    self.send_error(503, "try again")
                else:
                    super().do_GET()

            def translate_path(self, path: str) -> str:
                return super().translate_path(path.replace("/packages/stats", "", 1))

        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/packages/stats/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def expected() -> dict[str, bytes]:
    return webref.Reference(VT).all_files()


@pytest.fixture
def legacy(tmp_path, expected) -> Iterator[Site]:
    """The reference's files as a static site (what the legacy server publishes)."""
    root = tmp_path / "legacy"
    for rel, body in expected.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(body)
    site = Site(root)
    try:
        yield site
    finally:
        site.close()


@pytest.fixture
def ours(db_url):
    with db.session_factory(db_url)() as s:
        webref.load_direct(s, valid_thru=VT)
    return db_url


def run(monkeypatch, db_url, tmp_path, capsys, *args: str) -> tuple[int, list[str], list[str]]:
    capsys.readouterr()
    code = cli_run(monkeypatch, db_url, tmp_path, "compare", *args)
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err.splitlines()


def test_identical_site_over_http(ours, legacy, expected, tmp_path, monkeypatch, capsys):
    code, out, err = run(monkeypatch, ours, tmp_path, capsys, "--against", legacy.url)
    assert (code, out) == (0, [f"{len(expected)} files compared, 0 differ"]), err
    assert set(legacy.requests) == set(expected)  # every file, each once
    assert max(legacy.requests.values()) == 1
    assert legacy.agents == {cmp.USER_AGENT}
    assert cmp.USER_AGENT.startswith("bioc-webstats-compare/")
    assert 1 <= legacy.max_in_flight <= 4


def test_a_changed_number_is_named(ours, legacy, expected, tmp_path, monkeypatch, capsys):
    rel = "bioc/affy/affy_2009_stats.tab"
    body = expected[rel].decode()
    assert "2009\tFeb\t2\t2\n" in body
    (legacy.root / rel).write_text(body.replace("2009\tFeb\t2\t2\n", "2009\tFeb\t2\t3\n"))
    code, out, err = run(monkeypatch, ours, tmp_path, capsys, "--against", legacy.url)
    assert code == 1
    assert out == [
        f"{rel}: line 3: here '2009\\tFeb\\t2\\t2', there '2009\\tFeb\\t2\\t3'",
        f"{len(expected)} files compared, 1 differ",
    ]
    assert err == [
        f"bioc-webstats: error: compare: 1 of {len(expected)} files differ from {legacy.url}"
    ]


def test_missing_files_either_side(ours, legacy, expected, tmp_path, monkeypatch, capsys):
    gone = "bioc/limma/limma_2023_stats.tab"
    (legacy.root / gone).unlink()
    # a package only the legacy site has: listed, with its files
    listing = legacy.root / "data-annotation/annotation_packages.txt"
    listing.write_text(listing.read_text() + "ghost\n")
    ghost = webref.Reference.H + "".join(
        f"2023\t{m}\t0\t0\n" for m in webref.MONTH_NAMES
    ) + "2023\tall\t0\t0\n"  # fmt: skip
    (legacy.root / "data-annotation/ghost").mkdir()
    (legacy.root / "data-annotation/ghost/ghost_stats.tab").write_text(ghost)
    (legacy.root / "data-annotation/ghost/ghost_2023_stats.tab").write_text(ghost)
    code, out, _ = run(monkeypatch, ours, tmp_path, capsys, "--against", legacy.url)
    assert code == 1
    assert out[:-1] == [  # in the order compared: bioc first
        f"{gone}: missing there",
        "data-annotation/annotation_packages.txt: line 4: here ends; there goes on with 'ghost'",
        "data-annotation/ghost/ghost_stats.tab: missing here",
        "data-annotation/ghost/ghost_2023_stats.tab: missing here",
    ]
    assert out[-1] == f"{len(expected) + 2} files compared, 4 differ"


def test_a_directory_copy(ours, legacy, expected, tmp_path, monkeypatch, capsys):
    code, out, _ = run(monkeypatch, ours, tmp_path, capsys, "--against", str(legacy.root))
    assert (code, out) == (0, [f"{len(expected)} files compared, 0 differ"])
    assert not legacy.requests


def test_a_place_one_level_off_is_refused_in_one_line(ours, legacy, tmp_path, monkeypatch, capsys):
    """The directory above the site (or an empty one): every file was "missing there" and
    the verdict "N of N differ" named no cause."""
    above = legacy.root.parent
    for where in (str(above), legacy.url.rsplit("/", 2)[0] + "/"):
        code, out, err = run(monkeypatch, ours, tmp_path, capsys, "--against", where)
        assert code == 1 and out == [], where
        assert err == [
            f"bioc-webstats: error: compare: {where} holds no file of the categories (not even "
            "bioc/bioc_packages.txt): give the directory or URL that holds the category "
            "directories (…/packages/stats/)"
        ], where


def test_ours_from_a_url(legacy, expected, tmp_path, monkeypatch, capsys, db_url):
    """--ours URL: both sides over HTTP (here: the same site, so nothing differs), and the
    database is not read."""
    code, out, _ = run(
        monkeypatch, db_url, tmp_path, capsys, "--against", str(legacy.root), "--ours", legacy.url
    )
    assert (code, out) == (0, [f"{len(expected)} files compared, 0 differ"])


def test_narrowed_by_category_and_package(ours, legacy, expected, tmp_path, monkeypatch, capsys):
    code, out, _ = run(
        monkeypatch, ours, tmp_path, capsys, "--against", legacy.url, "--categories", "workflows"
    )
    assert (code, out) == (0, [f"{sum(k.startswith('workflows/') for k in expected)} files "
                               "compared, 0 differ"])  # fmt: skip
    legacy.requests.clear()
    code, out, _ = run(
        monkeypatch, ours, tmp_path, capsys, "--against", legacy.url,
        "--categories", "bioc", "--packages", "affy,TReNA",
    )  # fmt: skip
    wanted = [k for k in expected if k.startswith(("bioc/affy/", "bioc/TReNA/"))]
    assert (code, out) == (0, [f"{len(wanted)} files compared, 0 differ"])
    assert set(legacy.requests) == {*wanted, "bioc/bioc_packages.txt"}
    code, out, err = run(  # a name neither side lists is not compared, not "0 differ"
        monkeypatch, ours, tmp_path, capsys, "--against", legacy.url,
        "--categories", "bioc", "--packages", "affy,afy",
    )  # fmt: skip
    mine = [k for k in expected if k.startswith("bioc/affy/")]
    assert code == 1 and out == [
        "--packages afy: listed by neither side (bioc/bioc_packages.txt)",
        f"{len(mine)} files compared, 0 differ, 1 could not be compared",
    ]
    assert err == [
        f"bioc-webstats: error: compare: 0 of {len(mine)} files differ from {legacy.url}; "
        "1 could not be compared"
    ]
    code, _, err = run(
        monkeypatch, ours, tmp_path, capsys, "--against", legacy.url, "--categories", "software"
    )
    assert code == 2  # a usage error (interfaces.md), before anything is fetched
    assert err[-1] == (
        "Error: Invalid value for '--categories': unknown category 'software' "
        "(one of bioc, annotation, experiment, workflows)"
    )


def _from_ours(ours, monkeypatch, there, *args):
    """``cmp.compare`` of this instance's database with ``there``: (result, lines echoed)."""
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", ours)
    here = cmp.DatabaseSide(load_settings())
    lines: list[str] = []
    try:
        return cmp.compare(here, there, *args, echo=lines.append), lines
    finally:
        here.close()


def test_a_server_that_fails_twice_then_answers(ours, legacy, expected, monkeypatch):
    flaky = "bioc/bioc_pkg_stats.tab"
    legacy.fail[flaky] = 2
    waits: list[float] = []
    there = cmp.WebSide(legacy.url, backoff=0.25, sleep=waits.append)
    result, lines = _from_ours(ours, monkeypatch, there)
    assert (result.compared, result.differ, lines) == (len(expected), 0, [])
    assert legacy.requests[flaky] == 3
    assert waits == [0.25, 0.5]  # backoff, doubled
    # a server that keeps failing: the file is reported, the others compared
    legacy.requests.clear()
    legacy.fail[flaky] = 10
    waits.clear()
    # counted apart from the files compared (not as one that differs)
    result, lines = _from_ours(ours, monkeypatch, there, ["bioc"])
    assert (result.differ, result.failed) == (0, 1)
    assert legacy.requests[flaky] == cmp.ATTEMPTS
    bioc = sum(k.startswith("bioc/") for k in expected)
    assert lines == [
        f"{flaky}: cannot compare: {legacy.url}{flaky}: HTTP 503 try again "
        f"(after {cmp.ATTEMPTS} attempts)",
    ]
    assert result.summary() == f"{bioc - 1} files compared, 0 differ, 1 could not be compared"


def test_first_difference_holds_no_list_of_lines():
    """Two bodies of 2 MB of short lines: the lines are walked, not listed (a list cost
    about 30 times the bytes, 1.8 GB for 60 MB)."""
    import tracemalloc

    lines = 1 << 20
    body = b"a\n" * lines
    longer = body + b"b"
    tracemalloc.start()
    try:
        assert cmp.first_difference(body, longer) == (
            f"line {lines + 1}: here ends; there goes on with 'b'"
        )
        assert cmp.first_difference(b"Year\n", body) == "line 1: here 'Year', there 'a'"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # a list of its lines: over 30 MB
    for here, there in [
        (b"a\r\nb\rc\n", b"a\r\nb\rd"),
        (b"x\r", b"x\n"),
        (b"", b"\n"),
        (b"a", b""),
    ]:
        want = old_first_difference(here, there)
        assert cmp.first_difference(here, there) == want, (here, there)


def old_first_difference(here: bytes, there: bytes) -> str:
    """The listing version, for its texts: the walk says the same."""
    a, b = here.splitlines(keepends=True), there.splitlines(keepends=True)
    for n, (x, y) in enumerate(zip(a, b, strict=False), 1):
        if x != y:
            return f"line {n}: here {cmp._show(x, y)}, there {cmp._show(y, x)}"
    n = min(len(a), len(b)) + 1
    if len(a) > len(b):
        return f"line {n}: there ends; here goes on with {cmp._show(a[n - 1])}"
    return f"line {n}: here ends; there goes on with {cmp._show(b[n - 1])}"


def test_the_cutover_filter_leaves_only_what_is_unexpected(tmp_path):
    """CUTOVER.md step 6's grep, run as written over compare's own lines: the current month
    and the current year's `all` row go, and so do the summary and the exit's error line
    ("nothing but the summary line" could never be met: the error line passed through)."""
    import subprocess

    doc = (Path(__file__).parent.parent / "docs" / "CUTOVER.md").read_text()
    [command] = [ln.strip() for ln in doc.splitlines() if ln.strip().startswith("grep -v -E")]
    now = dt.datetime.now(dt.UTC)
    year, month = now.strftime("%Y"), now.strftime("%b")
    expected = [  # (a file, the two bodies) the cut-over expects to differ
        ("bioc/affy/affy_stats.tab", f"{year}\t{month}\t1\t1\n", f"{year}\t{month}\t1\t2\n"),
        ("bioc/bioc_pkg_stats.tab", f"affy\t{year}\tall\t3\t4\n", f"affy\t{year}\tall\t3\t5\n"),
    ]  # fmt: skip
    unexpected = ("bioc/affy/affy_2019_stats.tab", "2019\tJan\t1\t1\n", "2019\tJan\t1\t2\n")
    lines = [
        f"{path}: {cmp.first_difference(a.encode(), b.encode())}"
        for path, a, b in [*expected, unexpected]
    ]
    lines += [
        "100 files compared, 3 differ",
        "bioc-webstats: error: compare: 3 of 100 files differ from https://example.org/",
    ]
    out = tmp_path / f"compare-{now:%Y-%m-%d}.txt"
    out.write_text("\n".join(lines) + "\n")
    command = command.replace("/var/tmp/", f"{tmp_path}/")
    res = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
    assert res.stdout.splitlines() == [lines[2]], res.stdout + res.stderr


def test_first_difference_texts():
    assert cmp.first_difference(b"a\nb\n", b"a\nc\n") == "line 2: here 'b', there 'c'"
    assert cmp.first_difference(b"a\n", b"a\nb\n") == ("line 2: here ends; there goes on with 'b'")
    assert cmp.first_difference(b"a\nb\n", b"a\n") == "line 2: there ends; here goes on with 'b'"
    assert cmp.first_difference(b"a\nb", b"a\nb\n") == "line 2: here 'b', there 'b\\n'"


def test_a_site_that_is_down_stops_the_run(ours, monkeypatch):
    """Nothing listens on the port: each file is retried, then the run stops after
    GIVE_UP files in a row instead of trying every file."""
    from conftest import free_port

    monkeypatch.setenv("WEBSTATS_DATABASE_URL", ours)
    waits: list[float] = []
    there = cmp.WebSide(f"http://127.0.0.1:{free_port()}/packages/stats/", sleep=waits.append)
    here = cmp.DatabaseSide(load_settings())
    lines: list[str] = []
    try:
        with pytest.raises(cmp.WebstatsError, match=r"stopped after 10 files in a row could not"):
            cmp.compare(here, there, echo=lines.append)
    finally:
        here.close()
    assert len(lines) == cmp.GIVE_UP and "Connection refused" in lines[0]
    # each file retried; only the few already in flight (2 x 4 jobs) went on after the stop
    tried = len(waits) // (cmp.ATTEMPTS - 1)
    assert len(waits) % (cmp.ATTEMPTS - 1) == 0 and cmp.GIVE_UP <= tried <= cmp.GIVE_UP + 8


def test_a_compressed_answer_is_named_not_compared():
    """A server (or a proxy) that gzips its answer unasked: every file "differed" at line 1,
    with binary lines, and nothing said why. It is one line, not retried."""
    import gzip as gz

    from test_packages import scripted_server

    body = gz.compress(b"Package\naffy\n")
    head = f"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n"
    waits: list[float] = []
    with scripted_server([(head.encode() + body, 0)]) as url:
        side = cmp.WebSide(url, timeout=5, sleep=waits.append, deadline=1.0)
        with pytest.raises(cmp.FetchError) as exc:
            side.fetch("bioc/bioc_packages.txt")
    assert str(exc.value) == (
        f"{url}/bioc/bioc_packages.txt: answered in Content-Encoding 'gzip', not as the "
        "file's own bytes"
    )
    assert waits == []


@pytest.mark.parametrize(
    "parts,why",
    [
        ([(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nPackage\n", 0)], "cut short: 8 of 50"),
        ([(b"NOT HTTP\r\n\r\n", 0)], "not a valid HTTP answer (BadStatusLine)"),
    ],
)
def test_a_broken_answer_is_retried_then_named(parts, why):
    """A body shorter than its Content-Length (compared as a shorter file before), an answer
    that is not HTTP: retried, then one line."""
    from test_packages import scripted_server

    waits: list[float] = []
    with scripted_server(parts) as url:
        side = cmp.WebSide(url, timeout=5, sleep=waits.append, deadline=1.0)
        with pytest.raises(cmp.FetchError) as exc:
            side.fetch("bioc/bioc_packages.txt")
    assert str(exc.value).startswith(f"{url}/bioc/bioc_packages.txt: {why}"), exc.value
    assert str(exc.value).endswith(f"(after {cmp.ATTEMPTS} attempts)")
    assert len(waits) == cmp.ATTEMPTS - 1


def test_a_body_trickled_past_the_deadline_is_named_without_a_retry():
    """Another attempt would be as slow: one line after one deadline, not four."""
    from test_packages import scripted_server

    waits: list[float] = []
    parts = [(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", 0)] + [(b"x", 0.2)] * 40
    with scripted_server(parts) as url:
        side = cmp.WebSide(url, timeout=5, sleep=waits.append, deadline=1.0)
        with pytest.raises(cmp.FetchError) as exc:
            side.fetch("bioc/bioc_packages.txt")
    assert str(exc.value).startswith(f"{url}/bioc/bioc_packages.txt: not complete after 1 s (")
    assert waits == []


def test_a_broken_url_is_one_line():
    with pytest.raises(cmp.WebstatsError) as exc:
        cmp.open_side("http://[::1/packages/stats/")
    assert str(exc.value) == "http://[::1/packages/stats/: not a usable URL (Invalid IPv6 URL)"
    with pytest.raises(cmp.WebstatsError) as exc:  # named as given, not as a path (ftp:/x)
        cmp.open_side("ftp://x/")
    assert str(exc.value) == "ftp://x/: not a directory nor an http(s):// URL"


@pytest.mark.parametrize("url", ["http://u:S3cretPW@127.0.0.1:1/", "https://token@example.org/x/"])
def test_credentials_in_a_url_are_refused_and_never_printed(url):
    """compare and the packages source refuse user:password@ in a URL in one line without the
    secret (urllib would not send it, and every line about the site printed it)."""
    from bioc_webstats.etl import manifest

    for call in (lambda: cmp.open_side(url), lambda: manifest.read_source(url, "config.yaml")):
        with pytest.raises(cmp.WebstatsError) as exc:
            call()
        text = str(exc.value)
        assert "credentials in the URL are not supported" in text
        assert "S3cret" not in text and "token" not in text and "\n" not in text


@pytest.mark.parametrize(
    "args, option",
    [
        (["--against", ""], "--against"),  # a shell variable unset: not the current directory
        (["--against", "x", "--packages", ","], "--packages"),  # 0 files compared: a pass
        (["--against", "x", "--categories", " , "], "--categories"),  # every category
        (["--against", "x", "--timeout", "nan"], "--timeout"),  # a traceback on the first fetch
        (["--against", "x", "--categories", "bioc,foo"], "--categories"),  # was exit 1
        (["--against", "x", "--categories", "BIOC"], "--categories"),
    ],
)
def test_compare_options_that_name_nothing_are_usage_errors(args, option, capsys, monkeypatch):
    from bioc_webstats import cli

    monkeypatch.setenv("WEBSTATS_ENV_FILE", "/dev/null")
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"Invalid value for '{option}'" in err and "Traceback" not in err


# --- hostile sites (a probe's findings) -------------------------------------------------------


def _answer(status: str, *headers: str) -> list[tuple[bytes, float]]:
    head = "".join(f"{h}\r\n" for h in (*headers, "Content-Length: 0"))
    return [(f"HTTP/1.1 {status}\r\n{head}\r\n".encode(), 0)]


@pytest.mark.parametrize("value", ["nan", "inf", "-5"])
def test_an_unusable_retry_after_falls_back_to_the_backoff(value):
    """NaN passed min/max to time.sleep (a traceback); inf waited 60 s, -5 not at all."""
    from test_packages import scripted_server

    waits: list[float] = []
    with scripted_server(_answer("503 Busy", f"Retry-After: {value}")) as url:
        side = cmp.WebSide(url, timeout=5, backoff=0.25, sleep=waits.append)
        with pytest.raises(cmp.FetchError, match=r"HTTP 503 Busy \(after 4 attempts\)$"):
            side.fetch("bioc/bioc_packages.txt")
    assert waits == [0.25, 0.5, 1.0]


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://127.0.0.1:99999/", "Port out of range 0-65535"),  # was fetched from port 34463
        ("http://127.0.0.1:abc/", "Port could not be cast to integer value as 'abc'"),
        ("http://a b/", "a space or a control character in the host"),
        ("http://" + "a" * 70 + ".example/", "host name not usable: encoding with 'idna' codec"),
    ],
)
def test_an_unusable_url_is_refused_once_up_front(url, why):
    """Not a WebSide whose every file fails 4 times (or an IDNA traceback on the first)."""
    from bioc_webstats.etl import manifest

    with pytest.raises(cmp.WebstatsError) as exc:
        cmp.open_side(url)
    assert str(exc.value).startswith(f"{url}: not a usable URL ({why}")
    with pytest.raises(cmp.WebstatsError) as exc:
        manifest.read_source(url, "config.yaml")
    assert str(exc.value).startswith(f"packages source {url}: not a usable URL ({why}")


@pytest.mark.parametrize(
    "where", ["HTTP://user:s3cr3t@127.0.0.1/", "Https://user:s3cr3t@h/", "ftp://user:s3cr3t@h/"]
)
def test_a_password_in_any_scheme_is_never_printed(where):
    """The scheme check was case-sensitive: HTTP:// was taken for a directory, printed whole."""
    from bioc_webstats.etl import manifest

    for call in (lambda: cmp.open_side(where), lambda: manifest.read_source(where, "x")):
        with pytest.raises(cmp.WebstatsError) as exc:
            call()
        assert "s3cr3t" not in str(exc.value) and "***@" in str(exc.value)
    if where.startswith("ftp"):
        assert (
            str(exc.value) == "packages source ftp://***@h/: not a directory nor an http(s):// URL"
        )
    else:
        assert "credentials in the URL are not supported" in str(exc.value)


def test_an_upper_case_scheme_is_a_url(legacy, expected):
    side = cmp.open_side(legacy.url.replace("http://", "HTTP://"))
    assert side.fetch("bioc/bioc_packages.txt") == expected["bioc/bioc_packages.txt"]


@pytest.mark.parametrize(
    "location, why",
    [
        ("ftp://127.0.0.1:{port}/x", "not http(s)"),  # urllib followed it; the FTP reply went
        ("http://" + "a" * 70 + ".example/", "host name not usable"),  # a UnicodeError
        ("http://127.0.0.1:99999/", "Port out of range"),
    ],
)
def test_a_redirect_to_an_unusable_url_is_refused_once(location, why):
    from test_packages import scripted_server

    location = location.format(port=free_port())
    waits: list[float] = []
    with scripted_server(_answer("302 Found", f"Location: {location}")) as url:
        side = cmp.WebSide(url, timeout=5, sleep=waits.append)
        with pytest.raises(cmp.FetchError) as exc:
            side.fetch("bioc/bioc_packages.txt")
    assert str(exc.value).startswith(f"{url}/bioc/bioc_packages.txt: HTTP 302 redirect to ")
    assert f"refused: {why}" in str(exc.value)
    assert "\n" not in str(exc.value) and waits == []  # not retried


def test_headers_trickled_past_the_deadline_are_cut_off():
    """The deadline bounded only the body: a status line sent a byte at a time held compare
    (and packages sync) for as long as the server liked."""
    from test_packages import scripted_server

    trickle = [(b"HTTP/1.1 200 OK\r\nX-Slow: ", 0), *[(b"z", 0.2)] * 30, (b"\r\n\r\n", 0)]
    with scripted_server(trickle) as url:
        side = cmp.WebSide(url, timeout=5, attempts=1, deadline=1.0)
        started = time.monotonic()
        with pytest.raises(cmp.FetchError, match=r"not complete after 1 s \("):
            side.fetch("bioc/bioc_packages.txt")
    assert time.monotonic() - started < 5  # the trickle lasts 6 s; the deadline is 1 s


def _run_bounded(call, unblock, timeout: float = 10.0):
    """``call()``'s exception, failing (after unblocking it) if it does not end in time."""
    with cf.ThreadPoolExecutor(1) as pool:
        future = pool.submit(call)
        try:
            return future.exception(timeout=timeout)
        except cf.TimeoutError:
            unblock()
            raise AssertionError(f"still blocked after {timeout} s") from None


def test_a_directory_copy_refuses_what_is_not_a_regular_file(tmp_path, monkeypatch):
    """A FIFO blocked forever; a link to /dev/zero read until MemoryError; a big file was
    read whole, past the cap of an HTTP body."""
    bioc = tmp_path / "bioc"
    bioc.mkdir()
    os.mkfifo(bioc / "fifo")
    (bioc / "zero").symlink_to("/dev/zero")
    (bioc / "big").write_bytes(b"x" * 2000)
    monkeypatch.setattr(cmp, "MAX_SMALL", 1000)
    side = cmp.open_side(str(tmp_path))

    def unblock() -> None:
        os.close(os.open(bioc / "fifo", os.O_WRONLY | os.O_NONBLOCK))

    for name, why in [
        ("fifo", "not a regular file"),
        ("zero", "not a regular file"),
        ("big", "larger than 1000 bytes"),
    ]:
        exc = _run_bounded(lambda n=name: side.fetch(f"bioc/{n}"), unblock)
        assert isinstance(exc, cmp.FetchError) and str(exc).startswith(f"{bioc / name}: {why}")
    assert side.fetch("bioc/nothing") is None


def test_nothing_to_compare_is_not_a_pass(tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    unused = f"sqlite:///{tmp_path / 'unused.sqlite3'}"  # --ours: the database is not read
    code, out, err = run(
        monkeypatch, unused, tmp_path, capsys, "--against", str(tmp_path / "a"),
        "--ours", str(tmp_path / "b"),
    )  # fmt: skip
    assert (code, out) == (1, ["0 files compared, 0 differ"])
    assert err == [
        f"bioc-webstats: error: compare: nothing was compared: neither {tmp_path / 'a'} nor "
        f"{tmp_path / 'b'} publishes any file of the selected categories"
    ]


def test_year_files_are_not_all_held_in_memory(tmp_path):
    """Comparison.files kept every body until the last one was read (25 year files of
    60 MB: a MemoryError); now each is dropped once judged."""
    import tracemalloc

    years = range(2009, 2025)
    size = 2 * 1024 * 1024
    for side in ("a", "b"):
        (tmp_path / side / "bioc").mkdir(parents=True)
        tab = webref.Reference.H + "".join(f"{y}\tall\t1\t1\n" for y in years)
        (tmp_path / side / "bioc/bioc_stats.tab").write_text(tab)
        for y in years:
            (tmp_path / side / f"bioc/bioc_{y}_stats.tab").write_bytes(b"%d\n" % y * (size // 5))
    here, there = cmp.open_side(str(tmp_path / "a")), cmp.open_side(str(tmp_path / "b"))
    tracemalloc.start()
    try:
        result = cmp.compare(here, there, categories=["bioc"], jobs=1, echo=print)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (result.compared, result.differ) == (17, 0)
    assert peak < 10 * size  # held all at once: 2 sides x 16 files = 32 x size


def test_years_a_site_cannot_have_are_not_asked_for(tmp_path):
    """A totals file listing 'years' 0000 to 9999 (a hostile or broken site) made compare ask
    for 10,000 year files, '…_9_stats.tab' among them; only those from the category's first
    year to this one are asked for (the totals file itself differs)."""
    asked: list[str] = []
    for side in ("a", "b"):
        (tmp_path / side / "bioc").mkdir(parents=True)
    rows = "".join(f"{y:04d}\tall\t1\t1\n" for y in range(10_000))
    (tmp_path / "a/bioc/bioc_stats.tab").write_text(webref.Reference.H + rows)
    (tmp_path / "b/bioc/bioc_stats.tab").write_text(webref.Reference.H)
    here, there = cmp.open_side(str(tmp_path / "a")), cmp.open_side(str(tmp_path / "b"))
    fetch = there.fetch
    there.fetch = lambda path: asked.append(path) or fetch(path)  # type: ignore[method-assign]
    cmp.compare(here, there, categories=["bioc"], jobs=1, echo=lambda line: None)
    years = [p for p in asked if p.startswith("bioc/bioc_") and p != "bioc/bioc_stats.tab"]
    this_year = dt.datetime.now(dt.UTC).year
    want = [f"bioc/bioc_{y}_stats.tab" for y in range(this_year, 2008, -1)]
    assert sorted(p for p in years if "pkg" not in p and "packages" not in p) == sorted(want)


def test_a_listing_is_split_at_newlines_only_and_bounded(tmp_path, monkeypatch):
    """splitlines made two packages of 'b\\u2028c'; a listing of millions of names was all
    held as a list of lines."""
    assert cmp._names("a\nb\u2028c\r\nd\x1ce\x85f\n\n".encode()) == ["a", "b\u2028c", "d\x1ce\x85f"]
    for side in ("a", "b"):
        (tmp_path / side / "workflows").mkdir(parents=True)
        (tmp_path / side / "workflows/workflows_packages.txt").write_text("p1\np2\np3\np4\n")
    monkeypatch.setattr(cmp, "MAX_NAMES", 3)
    lines: list[str] = []
    here, there = cmp.open_side(str(tmp_path / "a")), cmp.open_side(str(tmp_path / "b"))
    result = cmp.compare(here, there, categories=["workflows"], echo=lines.append)
    assert lines == [
        "workflows/workflows_packages.txt: cannot compare its packages: lists more than 3 packages",
    ]
    assert result.summary() == "1 files compared, 0 differ, 1 could not be compared"


@pytest.mark.parametrize("length", ["²", "٣", " 12 ", "x"])
def test_a_content_length_of_other_digits_is_no_traceback(length):
    """str.isdigit() takes '²' and '٣', int() does not take '²': a hostile Content-Length
    was a ValueError out of the body reader; only ASCII digits are a length."""
    from email.message import Message

    from bioc_webstats import httpbody

    class Resp:
        headers = Message()

        def __init__(self) -> None:
            self.parts = [b"twelve bytes", b""]
            self.headers["Content-Length"] = length

        def read1(self, n: int = -1) -> bytes:
            return self.parts.pop(0)

    assert httpbody.read_body(Resp(), 100) == b"twelve bytes"  # (12: checked; others: none)


def test_a_redirects_body_is_not_read():
    """urllib read a redirect's whole body before following it, past every cap (a 1 GB one
    took 4 GB of compare's memory, and of packages sync's): here one that never ends."""
    from bioc_webstats import httpbody
    from test_packages import scripted_server

    with scripted_server([(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nPackage", 0)]) as target:
        head = f"HTTP/1.1 301 Moved\r\nLocation: {target}/x\r\nContent-Length: 999999999\r\n\r\n"
        with scripted_server([(head.encode(), 0), *[(b"x" * 65536, 0.1)] * 100]) as url:
            assert httpbody.get(url + "/a", "test", 5, max_bytes=100, deadline=3) == b"Package"


@pytest.mark.parametrize("unreadable", ["bioc/bioc_packages.txt", "bioc/affy/affy_stats.tab"])
def test_what_an_unreadable_list_names_on_the_other_side_is_still_compared(
    ours, legacy, expected, monkeypatch, unreadable
):
    """A listing (its packages) or a package's all-years file (its year files) that one side
    cannot give: it is one line, and the files the other side's copy names are compared. They
    were dropped with it, uncounted (every bioc package's files behind '1 could not be
    compared')."""
    legacy.fail[unreadable] = 100
    there = cmp.WebSide(legacy.url, backoff=0.01, sleep=lambda _: None)
    result, lines = _from_ours(ours, monkeypatch, there, ["bioc"])
    bioc = sum(k.startswith("bioc/") for k in expected)
    assert [line.split(": cannot compare: ")[0] for line in lines] == [unreadable]
    assert (result.compared, result.differ, result.failed) == (bioc - 1, 0, 1)


def test_a_listing_that_cannot_be_read_with_packages_is_one_line(ours, legacy, monkeypatch):
    """--packages read the listing again after the site check had found it unreadable (four
    more attempts), and its FetchError ended the whole run instead of one line. The packages'
    own files need no listing: they are compared."""
    listing = "bioc/bioc_packages.txt"
    legacy.fail[listing] = 100
    there = cmp.WebSide(legacy.url, backoff=0.01, sleep=lambda _: None)
    result, lines = _from_ours(ours, monkeypatch, there, ["bioc"], ["affy"])
    assert legacy.requests[listing] == cmp.ATTEMPTS  # once, with its retries
    [line] = lines
    assert line.startswith(f"{listing}: cannot compare: {legacy.url}{listing}: HTTP 503 ")
    assert (result.failed, result.differ) == (1, 0) and result.compared > 1
    assert legacy.requests["bioc/affy/affy_stats.tab"] == 1


def test_a_file_is_capped_by_what_it_is(tmp_path):
    """2 x jobs files in flight under one 64 MiB cap: a site answering 60 MB for every file
    took 770 MB. Only a category's _pkg_stats.tab is large (software's ~20 MB)."""
    big = b"x" * (cmp.MAX_SMALL + 1)
    (tmp_path / "bioc" / "affy").mkdir(parents=True)
    (tmp_path / "bioc" / "bioc_pkg_stats.tab").write_bytes(big)
    (tmp_path / "bioc" / "affy" / "affy_stats.tab").write_bytes(big)
    side = cmp.open_side(str(tmp_path))
    assert side.fetch("bioc/bioc_pkg_stats.tab") == big
    with pytest.raises(cmp.FetchError, match=f"larger than {cmp.MAX_SMALL} bytes"):
        side.fetch("bioc/affy/affy_stats.tab")


def test_a_file_url_and_a_url_with_a_query(tmp_path):
    (tmp_path / "a b").mkdir()
    for url in (f"file://{tmp_path}/a%20b", f"file://localhost{tmp_path}/a%20b"):
        assert cmp.open_side(url).root == tmp_path / "a b", url  # was "localhost/…"
    with pytest.raises(cmp.WebstatsError) as exc:
        cmp.open_side("file://other.host/x")
    assert str(exc.value) == "file://other.host/x: a file:// URL names a directory of this host"
    # a query is lost from every file's URL; it may hold a token: not printed
    for url in ("http://h.example/stats/?token=s3cr3t", "http://h.example/stats/#s3cr3t",
                "http://h.example/stats/?", "http://h.example/stats/#"):  # fmt: skip
        with pytest.raises(cmp.WebstatsError) as exc:
            cmp.open_side(url)
        assert str(exc.value) == "http://h.example/stats/: not a usable URL (a query or a #)"
