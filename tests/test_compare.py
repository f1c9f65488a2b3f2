"""``bioc-webstats compare`` against a static copy of the expected site (the independent
reference of ``webref``) served over HTTP by a real server on loopback, and as a directory:
identical → exit 0; a changed number, a missing file, an extra package → named, exit 1; a
server that fails twice then answers → retried; politeness (User-Agent, a few at a time)."""

from __future__ import annotations

import datetime as dt
import functools
import http.server
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import webref
from bioc_webstats import compare as cmp
from bioc_webstats.config import load_settings
from bioc_webstats.store import db
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
    code, out, _ = run(  # a name neither side lists is a difference, not "0 differ"
        monkeypatch, ours, tmp_path, capsys, "--against", legacy.url,
        "--categories", "bioc", "--packages", "affy,afy",
    )  # fmt: skip
    mine = [k for k in expected if k.startswith("bioc/affy/")]
    assert code == 1 and out == [
        "--packages afy: listed by neither side (bioc/bioc_packages.txt)",
        f"{len(mine) + 1} files compared, 1 differ",
    ]
    code, _, err = run(
        monkeypatch, ours, tmp_path, capsys, "--against", legacy.url, "--categories", "software"
    )
    assert code == 1 and err == [
        "bioc-webstats: error: --categories: unknown category 'software' "
        "(one of bioc, annotation, experiment, workflows)"
    ]


def test_a_server_that_fails_twice_then_answers(ours, legacy, expected, monkeypatch):
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", ours)
    flaky = "bioc/bioc_pkg_stats.tab"
    legacy.fail[flaky] = 2
    waits: list[float] = []
    there = cmp.WebSide(legacy.url, backoff=0.25, sleep=waits.append)
    here = cmp.DatabaseSide(load_settings())
    lines: list[str] = []
    try:
        result = cmp.compare(here, there, echo=lines.append)
    finally:
        here.close()
    assert (result.compared, result.differ, lines) == (len(expected), 0, [])
    assert legacy.requests[flaky] == 3
    assert waits == [0.25, 0.5]  # backoff, doubled
    # a server that keeps failing: the file is reported, the others compared
    legacy.requests.clear()
    legacy.fail[flaky] = 10
    waits.clear()
    here = cmp.DatabaseSide(load_settings())
    try:
        result = cmp.compare(here, there, categories=["bioc"], echo=lines.append)
    finally:
        here.close()
    assert result.differ == 1 and legacy.requests[flaky] == cmp.ATTEMPTS
    assert lines == [
        f"{flaky}: cannot compare: {legacy.url}{flaky}: HTTP 503 try again "
        f"(after {cmp.ATTEMPTS} attempts)"
    ]


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


@pytest.mark.parametrize(
    "parts,why",
    [
        ([(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nPackage\n", 0)], "cut short: 8 of 50"),
        (
            [(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", 0)] + [(b"x", 0.2)] * 40,
            "not complete after 1 s",
        ),
        ([(b"NOT HTTP\r\n\r\n", 0)], "not a valid HTTP answer (BadStatusLine)"),
    ],
)
def test_a_broken_answer_is_retried_then_named(parts, why):
    """A body shorter than its Content-Length (compared as a shorter file before), one
    trickled past the per-file deadline, an answer that is not HTTP: retried, then one line."""
    from test_packages import scripted_server

    waits: list[float] = []
    with scripted_server(parts) as url:
        side = cmp.WebSide(url, timeout=5, sleep=waits.append, deadline=1.0)
        with pytest.raises(cmp.FetchError) as exc:
            side.fetch("bioc/bioc_packages.txt")
    assert str(exc.value).startswith(f"{url}/bioc/bioc_packages.txt: {why}"), exc.value
    assert str(exc.value).endswith(f"(after {cmp.ATTEMPTS} attempts)")
    assert len(waits) == cmp.ATTEMPTS - 1


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

    for call in (lambda: cmp.open_side(url), lambda: manifest.read_text(url, "config.yaml")):
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
