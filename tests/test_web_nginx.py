"""A real nginx, configured from roles/webstats_nginx's own templates (with the playbook's
wiring), in front of the real gunicorn on a unix socket: published files from disk, the rest
proxied; methods, Host, security headers; slow and abusive clients. Loopback only, every
wait bounded. nginx missing is a failure ('make deps' installs it), never a skip."""

from __future__ import annotations

import datetime as dt
import email.utils
import re
import resource
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

import webref
from bioc_webstats.categories import CATEGORIES
from bioc_webstats.store import db
from bioc_webstats.web.site import PublishedSite
from bioc_webstats.web.targets import STATIC_FILES
from conftest import new_pg_database, wait_for
from webserver import nginx_binary, nginx_test, render_nginx, rss_kib, run_front, stop, unix_get

VT = dt.date(2024, 3, 31)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "strict-origin-when-cross-origin",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": CSP,
}
STATIC = "/packages/stats/bioc/bioc_packages.txt"


@pytest.fixture(scope="module")
def loaded_pg(pg_server) -> str:
    url = new_pg_database(pg_server)
    db.upgrade(url)
    with db.session_factory(url)() as s:
        webref.load_direct(s, valid_thru=VT)
    return url


def published(front, path: str) -> Path:
    """The file of URL ``path`` in the live data version (a directory URL: its index.html)."""
    rel = path.lstrip("/") + ("index.html" if path.endswith("/") else "")
    return front.publish_dir / "current" / rel


@pytest.fixture(scope="module")
def front(loaded_pg, tmp_path_factory):
    with run_front(loaded_pg, tmp_path_factory.mktemp("front")) as fr:
        assert "publish: data version" in fr.cli("publish")  # what every ETL run does
        yield fr


def gunicorn_saw(front, marker: str) -> bool:
    """Whether gunicorn's access log has a request with ``marker``; its log is written in
    batches, so first wait for a request sent to gunicorn after the one in question."""
    probe = f"/healthz?flush={time.monotonic_ns()}"
    assert unix_get(front.socket, probe)[0] == 200
    wait_for(
        lambda: probe in front.gunicorn_access_log.read_text(errors="replace"),
        30,
        what="gunicorn's access log",
    )
    return marker in front.gunicorn_access_log.read_text(errors="replace")


def nginx_logged(front, marker: str) -> str:
    """nginx's access-log line of the request with ``marker``. nginx writes it after the
    answer has left, so a client can read the answer before the line is there: wait for it."""

    def lines() -> list[str]:
        return [ln for ln in front.access_log.read_text().splitlines() if marker in ln]

    wait_for(lambda: bool(lines()), 10, what=f"{marker} in nginx's access log")
    return lines()[-1]


def raw(port: int, data: bytes, timeout: float = 10, source: str | None = None) -> bytes:
    """Send ``data`` as is and read the answer until the server closes (bounded)."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
    ) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            out += chunk
        return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def header_values(answer: bytes, name: str) -> list[str]:
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    return [v.strip() for k, _, v in (h.partition(":") for h in head) if k.lower() == name.lower()]


def assert_security_headers(answer: bytes) -> None:
    for name, value in SECURITY.items():
        assert header_values(answer, name) == [value], (name, answer[:1000])


# --- published files from disk -----------------------------------------------------------------


def test_published_file_is_sent_by_nginx(front):
    marker = f"{STATIC}?probe=static-{time.monotonic_ns()}"
    status, headers, body = front.get(marker)
    assert status == 200
    assert body == published(front, STATIC).read_bytes()
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["Cache-Control"] == "public, max-age=3600"
    mtime = published(front, STATIC).stat().st_mtime  # the version's publish time
    assert headers["Last-Modified"] == email.utils.formatdate(mtime, usegmt=True)
    assert re.fullmatch(r'"[0-9a-f]+-[0-9a-f]+"', headers["ETag"]), headers["ETag"]  # strong
    for name, value in SECURITY.items():
        assert headers.get_all(name) == [value], name
    assert " 200 " in nginx_logged(front, marker)
    assert not gunicorn_saw(front, marker), "a published file went to gunicorn"


def test_content_types(front):
    expected = {
        "/packages/stats/bioc/bioc_2024_stats.tab": "text/plain; charset=utf-8",
        "/packages/stats/index.html": "text/html; charset=utf-8",
        "/packages/stats/main.css": "text/css; charset=utf-8",
        "/packages/stats/charts.js": "text/javascript; charset=utf-8",
        "/packages/stats/uPlot.iife.min.js": "text/javascript; charset=utf-8",
    }
    for path, ctype in expected.items():
        marker = f"{path}?probe=type-{time.monotonic_ns()}"
        status, headers, _ = front.get(marker)
        assert (status, headers["Content-Type"]) == (200, ctype), path
        assert not gunicorn_saw(front, marker), f"{path} is not published"


def test_directory_url_is_its_index_html(front):
    marker = f"/packages/stats/data-annotation/?probe=dir-{time.monotonic_ns()}"
    status, headers, body = front.get(marker)
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert body == published(front, "/packages/stats/data-annotation/").read_bytes()
    assert not gunicorn_saw(front, marker)


def test_a_page_built_on_first_request_is_sent_by_nginx_next(front):
    """Package pages are built by the app on their first request, into the live version;
    from then on nginx sends them."""
    path = "/packages/stats/bioc/affy/"
    first = f"{path}?probe=first-{time.monotonic_ns()}"
    status, _, body = front.get(first)
    assert status == 200 and gunicorn_saw(front, first)
    assert published(front, path).read_bytes() == body
    second = f"{path}?probe=second-{time.monotonic_ns()}"
    status, headers, again = front.get(second)
    assert (status, again) == (200, body)
    assert headers["Cache-Control"] == "public, max-age=3600"
    assert not gunicorn_saw(front, second)


def test_conditional_get_and_head(front):
    _, headers, body = front.get(STATIC)
    status, h304, b304 = front.get(STATIC, headers={"If-None-Match": headers["ETag"]})
    assert (status, b304) == (304, b"")
    assert h304["ETag"] == headers["ETag"] and h304["Cache-Control"] == "public, max-age=3600"
    status, _, _ = front.get(STATIC, headers={"If-Modified-Since": headers["Last-Modified"]})
    assert status == 304
    later = email.utils.formatdate(1_800_000_000, usegmt=True)
    assert front.get(STATIC, headers={"If-Modified-Since": later})[0] == 304
    status, hhead, bhead = front.get(STATIC, method="HEAD")
    assert (status, bhead) == (200, b"")
    assert hhead["Content-Length"] == str(len(body)) == headers["Content-Length"]
    for name in ("ETag", "Last-Modified", "Content-Type", "Cache-Control"):
        assert hhead[name] == headers[name], name


def _unbuilt_package(front) -> str:
    """A package of bioc whose directory is not published yet (the app answers for it)."""
    stats_dir = front.publish_dir / "current" / "packages" / "stats" / "bioc"
    names = front.get("/packages/stats/bioc/bioc_packages.txt")[2].decode().split()
    return next(n for n in names if not (stats_dir / n).exists())


def _unbuilt_files(front) -> list[str]:
    """Each package's ``_stats.tab`` not published yet, in every category (the app answers
    for them until they are)."""
    urls = []
    for stem, prefix in ((c.stem, c.prefix) for c in CATEGORIES):
        status, _, body = front.get(f"/packages/stats/{stem}/{prefix}_packages.txt")
        assert status == 200, stem
        urls += [f"/packages/stats/{stem}/{n}/{n}_stats.tab" for n in body.decode().split()]
    return [u for u in urls if not published(front, u).exists()]


def test_a_long_query_is_ignored_whoever_sends_the_page(front):
    """A query string on a page is ignored (web-contract): past gunicorn's 4 KB request line
    it was 414 while the page was not built yet, and 200 once nginx sent it from disk."""
    query = "?utm=" + "x" * 6000
    url = f"/packages/stats/bioc/{_unbuilt_package(front)}/"
    assert front.get(url + query)[0] == 200  # the app builds it
    assert front.get(url + query)[0] == 200  # nginx sends it


def test_gunicorn_starts_without_an_error(front):
    """gunicorn 25.1+ opens a control socket under $HOME by default: with the web user's
    home (none) that was an ERROR line in error.log on every start."""
    error_log = front.gunicorn_access_log.with_name("error.log").read_text(errors="replace")
    assert "Booting worker" in error_log
    assert "[ERROR]" not in error_log, error_log


def test_the_apps_warnings_reach_gunicorns_error_log_once(front):
    """A disk that refuses a package page (here its lock path is a directory: the tests run
    as root, whom no mode stops) is served from memory, and the warning SysOps need is in
    gunicorn's error.log, in gunicorn's format, once: not only in the journal."""
    error_log = front.gunicorn_access_log.with_name("error.log")
    name = _unbuilt_package(front)
    relpath = f"bioc/{name}/index.html"
    blocker = PublishedSite(front.publish_dir).current().lock(relpath)
    blocker.mkdir()
    try:
        offset = error_log.stat().st_size
        status, _, body = front.get(f"/packages/stats/bioc/{name}/")
        assert status == 200 and name.encode() in body
        assert not published(front, f"/packages/stats/bioc/{name}/").exists()
        wait_for(
            lambda: b"serving from memory" in error_log.read_bytes()[offset:],
            10,
            what="the warning in error.log",
        )
        new = error_log.read_bytes()[offset:].decode().splitlines()
        lines = [line for line in new if "serving from memory" in line]
        assert len(lines) == 1, new
        assert re.match(
            r"\[\d{4}-\d\d-\d\d [\d:]+ [+-]\d{4}\] \[\d+\] \[WARNING\] site: ", lines[0]
        )
    finally:
        blocker.rmdir()


def test_what_has_no_file_goes_to_gunicorn(front):
    # a package not published yet (its redirect, its page), /healthz, a 404
    unbuilt = _unbuilt_package(front)
    for path, status in [
        ("/packages/stats/data-experiment/nosuchpkg_stats.tab", 404),
        (f"/packages/stats/bioc/{unbuilt}", 301),
        ("/healthz", 200),
        ("/packages/stats/bioc/nosuchpkg/", 404),
        (f"/packages/stats/bioc/{unbuilt}/", 200),
    ]:
        marker = f"{path}?probe=proxied-{time.monotonic_ns()}"
        got, headers, _ = front.get(marker)
        assert got == status, path
        if status == 301:
            assert headers["Location"] == f"{path}/?{marker.split('?')[1]}"
            # as nginx's own redirect below: exactly one, the app's
            assert headers["Cache-Control"] == "public, max-age=3600"
        assert gunicorn_saw(front, marker), path


def test_a_published_directory_without_its_slash_is_redirected_by_nginx(front):
    """The contract's redirect (301, relative, the query kept) from nginx itself: the directory
    is on disk, so its page exists."""
    assert (front.publish_dir / "current" / "packages" / "stats" / "bioc").is_dir()
    marker = f"/packages/stats/bioc?probe=direct-{time.monotonic_ns()}"
    got, headers, _ = front.get(marker)
    assert got == 301
    assert headers["Location"] == "/packages/stats/bioc/?" + marker.split("?")[1]
    assert headers["Cache-Control"] == "public, max-age=3600"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert front.get(headers["Location"])[0] == 200


def test_a_redirect_keeps_the_longest_query_nginx_takes(front):
    """The app escapes a query's ^ { | … into %XX (three times as long) and keeps it in the
    Location: past nginx's 4 KB header buffer that was a 502, then a 414 past 2 KB, while
    nginx's own redirect of a published directory kept 8 KB. Every request line nginx takes
    (8 KB) now gets its 301, whoever answers; a longer one is nginx's 414."""
    for path in ("/packages/stats", "/packages/stats/bioc/affy.html"):
        for query in ("^" * 8000, "a" * 8100):
            got, headers, _ = front.get(path + "?" + query)
            assert got == 301, (path, query[:1])
            assert headers["Location"].endswith("?" + query.replace("^", "%5E")), path
        assert front.get(path + "?" + "a" * 8200)[0] == 414
    assert (front.publish_dir / "current" / "packages" / "stats" / "bioc").is_dir()
    got, headers, _ = front.get("/packages/stats/bioc?" + "a" * 8100)  # nginx's own
    assert got == 301 and headers["Location"] == "/packages/stats/bioc/?" + "a" * 8100


def test_any_host_nginx_takes_is_taken_by_the_app(front):
    """werkzeug refused a Host with a DNS label over 63 characters (400) that nginx takes: a
    page was 400 until it was built, then 200. The app gets one Host of its own."""
    host = "a" * 64 + ".example"
    unbuilt = f"/packages/stats/bioc/{_unbuilt_package(front)}/"
    for target in ("/healthz", unbuilt, "/packages/stats/bioc/bioc_packages.txt"):
        answer = raw(
            front.port,
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
        )
        assert status_of(answer) == 200, (target, answer[:300])


def test_dot_files_and_slash_runs_never_come_from_disk(front):
    meta = front.publish_dir / "current" / ".version.json"
    assert meta.is_file()  # the app's own dot-file at the version's root
    hidden = published(front, "/packages/stats/bioc/.tmp-bioc_packages.txt")
    hidden.write_text("half-written\n")
    try:
        assert front.get("/packages/stats/bioc/.tmp-bioc_packages.txt")[0] == 404
        assert front.get("/packages/stats/.lock-x")[0] == 404
    finally:
        hidden.unlink()


@pytest.mark.parametrize(
    "path",
    [
        # each names a file that exists once nginx has decoded and normalized it
        "/packages/stats//bioc/bioc_packages.txt",
        "/packages/stats/bioc//",
        "//packages/stats/bioc/bioc_packages.txt",
        "///packages/stats/",
        "//healthz",
        "/packages/stats/bioc/../index.html",
        "/packages/stats/bioc/%2e%2e/index.html",
        "/packages/stats/bioc/.%2E/workflows.html",
        "/packages/stats/bioc/affy/..",
        "/packages/stats/bioc/affy/%2e%2e%2f%2e%2e%2findex.html",
        "/packages/stats/bioc/./bioc_packages.txt",
        "/packages/stats/bioc/%2e/bioc_packages.txt",
        # an encoded "/" is a "/" (the contract: a URL means what it decodes to)
        "/packages/stats/bioc/%2F/",
        "/packages/stats/bioc/%2fbioc_packages.txt",
        "/packages/stats%2F%2F",
        "/packages/stats/bioc/%2Faffy",
        # a raw byte outside printable ASCII (no name has one; gunicorn would say 400)
        "/packages/stats/bioc/\u00e9/",
    ],
)
def test_dot_segments_and_slash_runs_are_404(front, path):
    """The path as sent: the contract's ".." segment is 404 or 400 and runs of "/" never 200
    (nginx would resolve these to published files, and the app strips leading slashes)."""
    answer = raw(
        front.port, f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
    )
    assert status_of(answer) == 404, answer[:300]
    assert_security_headers(answer)


def test_a_query_may_hold_slashes_and_dots(front):
    assert front.get(STATIC + "?from=http://x.example//a/../b")[0] == 200


def raw_get(front, target: bytes, headers: bytes = b"") -> bytes:
    return raw(
        front.port, b"GET %s HTTP/1.1\r\nHost: t\r\n%sConnection: close\r\n\r\n" % (target, headers)
    )


def test_a_query_with_raw_bytes_is_ignored_also_by_the_app(front):
    """The contract: a query is ignored. Raw non-ASCII in it reached gunicorn, which answered
    400 to a redirect, /healthz and a page not built yet; nginx does not pass such a query in
    the request line."""
    unbuilt = _unbuilt_package(front)
    for target, status in [
        ("/healthz?q=\u00e9", 200),
        ("/packages/stats/bioc/nosuchpkg/?q=\u00e9", 404),
        (f"/packages/stats/bioc/{unbuilt}/?q=\u00e9&x=%01", 200),
    ]:
        answer = raw_get(front, target.encode())
        assert status_of(answer) == status, (target, answer[:300])
        assert_security_headers(answer)


def test_a_redirect_keeps_a_query_with_raw_bytes_percent_encoded(front):
    """The contract: a redirect keeps the query. One holding raw non-ASCII bytes was dropped
    (nginx kept it from gunicorn, which refuses it in the request line); it now reaches the
    redirect through a header, its bytes percent-encoded as they came. (A raw control
    character is nginx's own 400 before any of it: no header could carry it.)"""
    unbuilt = _unbuilt_package(front)
    path = f"/packages/stats/bioc/{unbuilt}"
    answer = raw_get(front, path.encode() + b".html?q=\x01\xe9")
    assert status_of(answer) == 400, answer[:300]
    assert_security_headers(answer)
    for query, kept in [
        (b"q=caf\xc3\xa9&x=1", "?q=caf%C3%A9&x=1"),
        (b"\xe9+%41", "?%E9+%41"),
    ]:
        answer = raw_get(front, path.encode() + b".html?" + query)
        assert status_of(answer) == 301, (query, answer[:300])
        assert header_values(answer, "Location") == [f"{path}/{kept}"], query
        assert_security_headers(answer)
    # a client cannot set the header through nginx
    answer = raw_get(front, path.encode() + b".html?a=1", b"X-Webstats-Raw-Query: b=2\r\n")
    assert header_values(answer, "Location") == [f"{path}/?a=1"]
    # a published directory without its slash (nginx's own redirect had the emptied query),
    # and a published file asked with such a query: the same bytes as without it
    assert (front.publish_dir / "current" / "packages" / "stats" / "bioc").is_dir()
    for target, location in [
        (b"/packages/stats/bioc?q=caf\xc3\xa9&x=1", "/packages/stats/bioc/?q=caf%C3%A9&x=1"),
        (b"/packages/stats/data-annotation?\xff", "/packages/stats/data-annotation/?%FF"),
    ]:
        answer = raw_get(front, target)
        assert status_of(answer) == 301, (target, answer[:300])
        assert header_values(answer, "Location") == [location], target
        assert header_values(answer, "Cache-Control") == ["public, max-age=3600"], target
        assert_security_headers(answer)
    # the same validators too: the app sent the shipped assets with the package's (its
    # install time as Last-Modified, another ETag), nginx the published copy's
    for url in [STATIC] + [f"/packages/stats/{name}" for name in STATIC_FILES]:
        status, headers, body = front.get(url)
        answer = raw_get(front, url.encode() + b"?q=\xc3\xa9")
        assert status == status_of(answer) == 200 and answer.endswith(body), url
        for name in ("ETag", "Last-Modified", "Content-Type"):
            assert header_values(answer, name) == [headers[name]], (url, name)
        assert_security_headers(answer)


@pytest.mark.parametrize(
    "header",
    [
        b"User-Agent: R\x7f",
        b"User-Agent: R (\x01)",
        b"X-Forwarded-For: 192.0.2.1\x1b",
        b'If-None-Match: "x\x01"',
        b"If-Modified-Since: Sat, 01 Jun 2024\x0b00:00:00 GMT",
        b"If-Unmodified-Since: \x7f",
    ],
)
def test_a_control_character_in_a_header_is_not_gunicorns_400(front, header):
    """nginx passes a control character in a header value; gunicorn answered 400 for every URL
    of the app (a file on disk was 200): the same URL's status depended on whether its page
    was built yet."""
    unbuilt = _unbuilt_files(front)[-1]  # the app's, as its package's directory (the last
    # category's: others take bioc's few)
    # (an If-Unmodified-Since that is no date fails, in nginx as in the app)
    file_status = 412 if header.startswith(b"If-Unmodified-Since") else 200
    for target, status in [
        ("/healthz", 200),
        (unbuilt.rsplit("/", 1)[0], 301),
        ("/packages/stats/bioc/nosuchpkg/", 404),
        (unbuilt, file_status),
        (STATIC, file_status),
    ]:
        answer = raw_get(front, target.encode(), header + b"\r\n")
        assert status_of(answer) == status, (target, answer[:300])
        assert_security_headers(answer)


@pytest.mark.parametrize(
    "header",
    [
        b"X-Forwarded-For: " + b"1" * 8170,  # fits nginx's 8k header buffer
        b"X-Forwarded-For: " + b"1" * 4100 + b"\r\nX-Forwarded-For: " + b"2" * 4100,
    ],
)
def test_a_long_forwarded_chain_is_not_gunicorns_431(front, header):
    """nginx passes the chain it was sent plus the client's address: past gunicorn's 8190
    bytes a field (or two headers joined) the app's URLs were 431 where a file is 200."""
    for target, status in [
        ("/healthz", 200),
        ("/packages/stats/bioc/nosuchpkg/", 404),
        (STATIC, 200),
    ]:
        answer = raw_get(front, target.encode(), header + b"\r\n")
        assert status_of(answer) == status, (target, answer[:300])


def test_a_control_character_in_if_match_fails_it_in_the_app_as_in_nginx(front):
    unbuilt = _unbuilt_files(front)[-1]
    for target in (STATIC, unbuilt):
        answer = raw_get(front, target.encode(), b'If-Match: "x\x01"\r\n')
        assert status_of(answer) == 412, (target, answer[:300])


def test_an_unknown_transfer_encoding_is_400_not_501(front):
    for coding in (b"gzip", b"identity", b"xchunked", b""):
        answer = raw_get(front, b"/packages/stats/", b"Transfer-Encoding: %s\r\n" % coding)
        assert status_of(answer) == 400, (coding, answer[:300])
        assert_security_headers(answer)


def test_ranges_follow_nginx_rules_also_for_what_the_app_sends(front):
    """A file the app builds on its first request and nginx sends next: the same answer to the
    same Range either way (the app's own Range handling refused an unknown unit with 416)."""
    names = front.get("/packages/stats/bioc/bioc_packages.txt")[2].decode().split()
    fresh = [f"/packages/stats/bioc/{n}/{n}_stats.tab" for n in names]
    fresh = [p for p in fresh if not published(front, p).exists()]
    assert len(fresh) >= 3
    for path, rng in zip(fresh, (b"items=0-5", b"bytes=0-9", b"bytes=0-1,5-6"), strict=False):
        first = raw_get(front, path.encode(), b"Range: %s\r\n" % rng)  # the app's
        body = published(front, path).read_bytes()
        again = raw_get(front, path.encode(), b"Range: %s\r\n" % rng)  # from disk
        for answer in (first, again):
            got = (status_of(answer), header_values(answer, "Content-Range"))
            if rng == b"bytes=0-9":
                assert got == (206, [f"bytes 0-9/{len(body)}"]), (rng, answer[:300])
                assert answer.split(b"\r\n\r\n", 1)[1] == body[:10]
            else:  # not a unit nginx knows / more ranges than max_ranges: the whole file
                assert got == (200, []), (rng, answer[:300])
                assert answer.split(b"\r\n\r\n", 1)[1] == body


def test_switch_of_current_is_seen_by_the_next_request(front):
    """A new version directory (publish --force: same data, a later publish time) switched
    in: the next request gets its validators; the previous ETag no longer matches."""
    _, old, old_body = front.get(STATIC)
    before = published(front, STATIC).resolve()
    front.cli("publish", "--force")
    assert published(front, STATIC).resolve() != before
    status, new, body = front.get(STATIC)
    assert (status, body) == (200, old_body)
    assert new["ETag"] != old["ETag"]
    assert email.utils.parsedate_to_datetime(
        new["Last-Modified"]
    ) > email.utils.parsedate_to_datetime(old["Last-Modified"])
    # a cache holding the previous version's validator gets the bytes again
    assert front.get(STATIC, headers={"If-None-Match": old["ETag"]})[0] == 200
    assert front.get(STATIC, headers={"If-None-Match": new["ETag"]})[0] == 304


# --- methods, Host, headers on every answer -------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", [STATIC, "/healthz", "/packages/stats/bioc", "/nope"])
def test_other_methods_get_405_with_allow(front, method, path):
    target = f"{path}?m={time.monotonic_ns()}"
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    answer = raw(front.port, head.encode())
    assert status_of(answer) == 405, answer[:200]
    assert header_values(answer, "Allow") == ["GET, HEAD"]
    assert_security_headers(answer)
    assert not gunicorn_saw(front, target), "nginx passed it on"


def test_allow_only_on_405(front):
    assert "Allow" not in front.get(STATIC)[1]
    # a request line nginx cannot parse names no method: its 400 offers none
    for line in (b"get /x HTTP/1.1", b"GET /x HTTP/2.0", b"GET * HTTP/1.1"):
        answer = raw(front.port, line + b"\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert status_of(answer) == 400 and not header_values(answer, "Allow"), answer[:300]
        assert_security_headers(answer)


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0", b"HTTP/9.9"])
@pytest.mark.parametrize("path", [STATIC, "/packages/stats/bioc/", "/healthz", "/nope"])
def test_an_http_version_nginx_does_not_speak_is_400_not_5xx(front, version, path):
    """ "Never a 5xx": nginx answered 505 (HTTP Version Not Supported)."""
    answer = raw(front.port, b"GET %s %s\r\nHost: t\r\nConnection: close\r\n\r\n" % (
        path.encode(), version))  # fmt: skip
    assert status_of(answer) == 400, answer[:300]
    assert_security_headers(answer)


def test_doubled_or_missing_host_is_400(front):
    doubled = raw(front.port, b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert status_of(doubled) == 400
    assert_security_headers(doubled)
    assert status_of(raw(front.port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")) == 400


@pytest.mark.parametrize(
    "framing", ["Content-Length: 100000", "Content-Length: 1", "Transfer-Encoding: chunked"]
)
def test_a_body_is_refused_before_it_is_read(front, framing):
    """400 at once, the body not awaited: a body trickled a byte at a time would otherwise
    hold a request slot for as long as the client likes (nginx then discards what comes, for
    lingering_time at most)."""
    head = f"GET {STATIC} HTTP/1.1\r\nHost: t\r\n{framing}\r\nConnection: close\r\n\r\n"
    # (a server that waited for the body would time this read out)
    with socket.create_connection(("127.0.0.1", front.port), timeout=4) as s:
        s.sendall(head.encode())  # the body is never sent
        answer = s.recv(65536)
    assert status_of(answer) == 400, answer[:200]
    assert_security_headers(answer)


def test_an_empty_body_is_no_body(front):
    head = f"GET {STATIC} HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    assert status_of(raw(front.port, head.encode())) == 200


@pytest.mark.parametrize(
    "path,status",
    [(STATIC, 200), ("/packages/stats/bioc/nosuchpkg/", 404), ("/packages/stats/bioc", 301)],
)
def test_security_headers_once_on_static_proxied_404_and_redirect(front, path, status):
    answer = raw(
        front.port, f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
    )
    assert status_of(answer) == status
    assert_security_headers(answer)


def test_access_log_is_combined_without_the_client_address(front):
    """Client addresses are never stored in clear (web-contract, Privacy): nginx's combined
    format logged them; the address is now "-", the rest as combined (log tools parse it)."""
    marker = f"/healthz?probe=combined-{time.monotonic_ns()}"
    front.get(marker, headers={"User-Agent": "probe-agent/1", "Referer": "http://r.example/"})
    line = nginx_logged(front, marker)
    combined = (
        r'- - - \[[^\]]+\] "GET ' + re.escape(marker) + r' HTTP/1\.1" 200 \d+ '
        r'"http://r\.example/" "probe-agent/1"'
    )
    assert re.fullmatch(combined, line), line
    assert "127.0.0.1" not in front.access_log.read_text()


# --- slow and abusive clients ---------------------------------------------------------------------


def _all_rss(front) -> dict[int, int]:
    return {pid: rss_kib(pid) for pids in front.pids().values() for pid in pids}


@pytest.fixture
def fd_room():
    """Room for a thousand client sockets in this process (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def timed_get(front, path: str) -> tuple[int, float]:
    started = time.perf_counter()
    status = front.get(path)[0]
    return status, time.perf_counter() - started


def test_a_thousand_idle_connections_do_not_starve_a_new_client(front, fd_room):
    for _ in range(4):  # warm: every gunicorn worker has answered once
        front.get(STATIC)
        front.get("/healthz")
    before = _all_rss(front)
    idle = []
    try:
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", front.port), timeout=5))
        timings = {path: timed_get(front, path) for path in (STATIC, "/healthz")}
        # every idle connection is still open (nginx has not dropped any to make room)
        gone = sum(1 for s in idle if _closed(s))
        after = _all_rss(front)
    finally:
        for s in idle:
            s.close()
    for path, (status, _seconds) in timings.items():
        assert status == 200, path  # (a starved client would time out: front.get waits 30 s)
    assert gone == 0, f"{gone} idle connections closed early"
    _assert_flat(before, after)
    times = ", ".join(f"{p} {s * 1000:.1f} ms" for p, (_, s) in timings.items())
    print(f"1,000 idle connections, then: {times}")


def _unread_heads(port: int) -> tuple[int, int]:
    """(connections to ``port`` nginx holds, how many of them hold bytes it has not read)."""
    held = unread = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queues = fields[1], fields[3], fields[4]
        if state == "01" and int(local.split(":")[1], 16) == port:  # established, ours
            held += 1
            unread += int(queues.split(":")[1], 16) > 0
    return held, unread


def _mib(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMG])", value).groups()
    return int(number) * {"K": 1, "M": 1024, "G": 1024 * 1024}[unit] // 1024


def test_every_connection_with_a_full_head_fits_nginxs_memory_ceiling(loaded_pg, tmp_path):
    """limit_conn counts a request once its head is read: until then one address may open
    every connection nginx has, each with the largest head it keeps (1k + 4 x 8k buffers).
    The workers' memory then stays under the unit's MemoryMax= (it was 2 x 4096 connections
    of ~43 KB, 340 MB, against a 192M ceiling: the kernel would have killed workers). Three
    quarters of them are opened (all but a few filled one worker when the machine was busy,
    which then turns the rest away), and the memory of them all is projected from those."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # (a header timeout longer than the opening takes on a busy machine: nginx keeps them all)
    with run_front(loaded_pg, tmp_path, webstats_nginx_client_header_timeout=300) as fr:
        workers = int(fr.values["webstats_nginx_worker_processes"])
        per_worker = int(fr.values["webstats_nginx_worker_connections"])
        ceiling_kib = _mib(fr.values["webstats_nginx_memory_max"]) * 1024
        assert len(fr.pids()["nginx"]) == workers + 1
        full = workers * (per_worker - 16)  # each keeps a few (the listener, gunicorn's)
        count = full * 3 // 4
        base = sum(rss_kib(pid) for pid in fr.pids()["nginx"])
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1024), hard))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= count + 256, "no room"
        line = b"X-Fill: " + b"a" * 8000 + b"\r\n"  # each in a large buffer of its own
        head = b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + line * 3 + b"X-Last: " + b"a" * 7000
        opened: list[socket.socket] = []
        try:
            for _ in range(count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                # closed with a reset (no TIME_WAIT left), from an address no other test uses
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.bind(("127.0.0.99", 0))
                # (a minute: on a busy machine nginx's accept queue fills, and the kernel
                # retries a dropped SYN after 1, 2, 4, 8, 16 s)
                s.settimeout(60)
                s.connect(("127.0.0.1", fr.port))
                s.sendall(head)
                opened.append(s)

            # nginx has read every byte of the connections it kept; it turns away the few a
            # full worker is handed
            def read_all() -> bool:
                held, unread = _unread_heads(fr.port)
                return unread == 0 and held >= count * 0.9

            wait_for(read_all, 120, what="nginx to read every head")
            held = _unread_heads(fr.port)[0]
            peak = sum(rss_kib(pid) for pid in fr.pids()["nginx"])
        finally:
            for s in opened:
                s.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    projected = base + (peak - base) * full // held
    print(f"{held} connections with a {len(head)}-byte head: nginx {peak // 1024} MiB; "
          f"{full}: {projected // 1024} MiB")  # fmt: skip
    assert peak - base > held * 32, "the heads were not held"  # (at least their bytes)
    assert projected < ceiling_kib, f"{projected} KiB with {full} heads, ceiling {ceiling_kib} KiB"


def _closed(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.setblocking(True)


def _assert_flat(before: dict[int, int], after: dict[int, int], limit_kib: int = 20 * 1024):
    for pid, rss in before.items():
        assert pid in after, f"process {pid} went away"
        assert after[pid] - rss < limit_kib, f"process {pid}: RSS {rss} -> {after[pid]} KiB"


def test_a_64_mib_header_gets_4xx_and_memory_stays_flat(front):
    before = _all_rss(front)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: ")
        chunk = b"a" * (1 << 20)
        sent = 0
        try:
            for _ in range(64):
                s.sendall(chunk)
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            pass  # nginx answered and closed: the rest is not read
        answer = b""
        try:
            while time.monotonic() - started < 30:
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        except (ConnectionResetError, TimeoutError):
            pass
    assert 400 <= status_of(answer) < 500, answer[:200]
    _assert_flat(before, _all_rss(front))
    assert front.get("/healthz")[0] == 200


def test_fifty_thousand_headers_get_4xx_and_memory_stays_flat(front):
    before = _all_rss(front)
    head = b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(50_000)
    )
    try:
        answer = raw(front.port, head + b"\r\n", timeout=30)
    except (BrokenPipeError, ConnectionResetError) as exc:
        pytest.fail(f"no answer, the connection was dropped: {exc}")
    assert 400 <= status_of(answer) < 500, answer[:200]
    assert_security_headers(answer)
    _assert_flat(before, _all_rss(front))


def test_many_small_headers_are_one_limit_for_files_and_the_app(front):
    """nginx bounds a request's headers by size (its 400); gunicorn's own count limit (100
    fields) made the same request a 431 where the app answers and a 200 for a file on disk."""
    extra = b"".join(b"X-H%d: v\r\n" % i for i in range(300))
    unbuilt = _unbuilt_package(front)
    for path in (b"/packages/stats/bioc/bioc_packages.txt", b"/healthz",
                 f"/packages/stats/bioc/{unbuilt}/".encode()):  # fmt: skip
        answer = raw_get(front, path, extra)
        assert status_of(answer) == 200, (path, answer[:200])


def test_the_app_judges_conditions_as_nginx_does(front):
    """nginx passes the app only the headers it reads, the conditional ones among them; the
    app answers them as nginx answers for a file on disk (werkzeug's send_file gave 412 to an
    If-Match that matched, 200 to one that did not)."""
    etag = front.get(STATIC)[1]["ETag"]
    past = email.utils.formatdate(1_000_000_000, usegmt=True)
    later = email.utils.formatdate(1_800_000_000, usegmt=True)
    page = _unbuilt_files(front)[0]
    for headers, status in [
        ({"If-None-Match": "*"}, 304),
        ({"If-Modified-Since": later}, 304),
        ({"If-Match": "*"}, 200),
        ({"If-Match": '"other"'}, 412),
        ({"If-Unmodified-Since": past}, 412),
        ({"If-Unmodified-Since": later}, 200),
        ({"If-Unmodified-Since": "not a date"}, 412),
        ({"If-Match": "*", "If-Unmodified-Since": past}, 412),  # nginx judges both
        # the dates nginx reads, and what it ignores (werkzeug read any email date)
        ({"If-Modified-Since": "Friday, 15-Jan-27 08:00:00 GMT"}, 304),
        ({"If-Modified-Since": "Fri Jan 15 08:00:00 2027"}, 304),
        ({"If-Modified-Since": "Fri, 15 Jan 2027 08:00:00 +0100"}, 304),
        ({"If-Modified-Since": "15 Jan 2027 08:00:00 +0100"}, 200),
        ({"If-Modified-Since": "Fri, 15 jan 2027 08:00:00 GMT"}, 200),
        ({"If-Modified-Since": "Fri, 30 Feb 2027 08:00:00 GMT"}, 200),
        ({"If-Unmodified-Since": "15 Jan 2027 08:00:00 +0100"}, 412),
        # nginx's own reading: a month by its first letters, day 0 the month's eve
        ({"If-Modified-Since": "Fri, 00 Jan 2027 08:00:00 GMT"}, 304),
        ({"If-Modified-Since": "Fri, 15 Fxx 2027 08:00:00 GMT"}, 304),
        ({"If-Modified-Since": "Fri Dxx 15 08:00:00 2027"}, 304),
        ({"If-Unmodified-Since": "Fri, 15 JAN 2027 08:00:00 GMT"}, 200),
        ({"If-Modified-Since": "Fri, 29 Feb 2027 08:00:00 GMT"}, 200),
        # the eve of year 1 (the app's 500: out of datetime's range)
        ({"If-Modified-Since": "Sun, 00 Jan 0001 00:00:00 GMT"}, 200),
        ({"If-Modified-Since": "Sun Jan  0 00:00:00 0001"}, 200),
        ({"If-Unmodified-Since": "Sun, 00 Jan 0001 00:00:00 GMT"}, 412),
    ]:
        assert front.get(STATIC, headers=headers)[0] == status, ("disk", headers)
        published(front, page).unlink(missing_ok=True)  # the app answers it
        assert front.get(page, headers=headers)[0] == status, ("app", headers, page)
        assert gunicorn_saw(front, page), headers
    assert front.get(STATIC, headers={"If-Match": etag})[0] == 200


def test_the_app_judges_a_tag_with_a_date_as_nginx_does(front):
    """A matching If-None-Match with an older If-Modified-Since, and a tag without its quotes:
    nginx answers 200 for a file on disk, and the app answered 304 for the same file before it
    was on disk (werkzeug's rules)."""
    past = email.utils.formatdate(1_000_000_000, usegmt=True)
    page = _unbuilt_files(front)[0]
    for target, on_disk in ((STATIC, True), (page, False)):
        etag = front.get(target)[1]["ETag"]
        for headers, status in [
            ({"If-None-Match": etag, "If-Modified-Since": past}, 200),
            ({"If-None-Match": etag.strip('"')}, 200),
            ({"If-None-Match": f'"other", {etag}'}, 304),
        ]:
            if not on_disk:
                published(front, target).unlink(missing_ok=True)  # the app answers it
            assert front.get(target, headers=headers)[0] == status, (target, headers)


VALIDATORS = ("ETag", "Last-Modified", "Cache-Control", "Content-Length", *SECURITY)


def _validators(headers) -> dict[str, str | None]:
    return {name: headers.get(name) for name in VALIDATORS}


def test_a_tab_before_the_first_tag_is_judged_as_nginx_does(front):
    """nginx takes a tab before the first tag for part of it (a tag after a comma may have
    one), and ``*`` with a tab after it for no ``*``: the app answered 304 (If-None-Match)
    and 200 (If-Match) where nginx, for the same file on disk, answered 200 and 412."""
    page = _unbuilt_files(front)[0]
    for target, on_disk in ((STATIC, True), (page, False)):
        etag = front.get(target)[1]["ETag"]
        for headers, status in [
            ({"If-None-Match": "\t" + etag}, 200),
            ({"If-None-Match": '"other",\t' + etag}, 304),
            ({"If-None-Match": " " + etag}, 304),
            ({"If-Match": "\t" + etag}, 412),
            ({"If-Match": '"other",\t' + etag}, 200),
            ({"If-Match": "\t*"}, 412),
            ({"If-None-Match": "*\t"}, 200),
            ({"If-Match": "* \t"}, 412),
            ({"If-None-Match": "* "}, 304),
        ]:
            if not on_disk:
                published(front, target).unlink(missing_ok=True)  # the app answers it
            assert front.get(target, headers=headers)[0] == status, (target, headers)


def test_a_page_served_from_memory_has_the_validators_of_its_file(front):
    """A page the disk refuses (its lock path a directory) is served from memory: it had the
    ETag and Last-Modified of the clock (a new pair each second), where the same bytes from
    disk later have the version's publish time (long before this test)."""
    name = _unbuilt_package(front)
    url = f"/packages/stats/bioc/{name}/"
    relpath = f"bioc/{name}/index.html"
    blocker = PublishedSite(front.publish_dir).current().lock(relpath)
    blocker.mkdir()
    try:
        status, first, body = front.get(url)
        assert status == 200 and not published(front, url).exists()
        assert front.get(url, headers={"If-None-Match": first["ETag"]})[0] == 304
    finally:
        blocker.rmdir()
    status, stored, same = front.get(url)  # the app stores it, nginx sends it next
    assert (status, same) == (200, body) and published(front, url).exists()
    from_disk = front.get(url)[1]
    assert _validators(first) == _validators(stored) == _validators(from_disk)


def test_a_slow_client_is_cut_off(front):
    """A client that never finishes its request head is closed after client_header_timeout
    (a connection left open would time this read out)."""
    timeout = front.values["webstats_nginx_client_header_timeout"]
    with socket.create_connection(("127.0.0.1", front.port), timeout=timeout + 5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # and nothing more
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            data = b""
    assert data == b"" or status_of(data) == 408


# --- the optional origin header ----------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(loaded_pg, tmp_path_factory):
    with run_front(
        loaded_pg,
        tmp_path_factory.mktemp("guarded"),
        workers=1,
        webstats_nginx_origin_header_name="X-Origin-Verify",
        webstats_nginx_origin_header_value="s3cret-value-0123456789",
    ) as fr:
        yield fr


def test_origin_header_required_when_configured(guarded):
    site = (guarded.conf.parent / "sites-enabled" / "bioc-webstats").read_text()
    assert "s3cret-value" not in site, "the secret is in the world-readable site file"
    request = "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{}\r\n"
    # not from 127.0.0.1 (the exempt loopback address): the header decides
    without = raw(guarded.port, request.format("").encode(), source="127.0.0.2")
    assert status_of(without) == 403
    assert_security_headers(without)
    wrong = raw(
        guarded.port, request.format("X-Origin-Verify: nope\r\n").encode(), source="127.0.0.2"
    )
    assert status_of(wrong) == 403
    right = raw(
        guarded.port,
        request.format("X-Origin-Verify: s3cret-value-0123456789\r\n").encode(),
        source="127.0.0.2",
    )
    assert status_of(right) == 200
    # the deploy's health check (loopback) needs no secret
    assert status_of(raw(guarded.port, request.format("").encode())) == 200
    assert "s3cret-value" not in Path(guarded.access_log).read_text()


def test_the_hosts_own_listen_address_is_the_host_itself(tmp_path):
    """Listening on an address of its own (not every address), the host's health checks (the
    deploy's, the watchdog's) ask that address from that address: they were refused 403 by the
    origin check (and limited like any client), so every deploy rolled back. Another address
    is still refused."""
    own = "127.0.0.2"
    conf, values = render_nginx(
        tmp_path, tmp_path / "no-gunicorn.sock", tmp_path / "site",
        webstats_nginx_listen_address=own,
        webstats_nginx_origin_header_name="X-Origin-Verify",
        webstats_nginx_origin_header_value="s3cret-value-0123456789",
    )  # fmt: skip
    checked = nginx_test(conf)
    assert checked.returncode == 0, checked.stderr
    port = values["webstats_nginx_port"]

    def status_from(source: str) -> int:
        with socket.create_connection((own, port), timeout=10, source_address=(source, 0)) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            return status_of(s.recv(65536))

    def up() -> bool:
        try:
            with socket.create_connection((own, port), timeout=1):
                return True
        except OSError:
            return False

    nginx = subprocess.Popen([nginx_binary(), "-c", str(conf), "-g", "daemon off;"])
    try:
        wait_for(lambda: up() or nginx.poll() is not None, 30, what="nginx")
        assert nginx.poll() is None
        assert status_from(own) == 502  # let in: passed on (no gunicorn here)
        assert status_from("127.0.0.3") == 403
    finally:
        stop(nginx)


def test_unset_origin_header_lets_everyone_in(front):
    answer = raw(
        front.port,
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        source="127.0.0.2",
    )
    assert status_of(answer) == 200


# --- how many requests at once ------------------------------------------------------------

BIG = "/packages/stats/bioc/big-test-file.txt"


@pytest.fixture(scope="module")
def limited(loaded_pg, tmp_path_factory):
    with run_front(
        loaded_pg,
        tmp_path_factory.mktemp("limited"),
        workers=1,
        webstats_nginx_max_connections=5,
        webstats_nginx_max_connections_per_client=3,
    ) as fr:
        assert "publish: data version" in fr.cli("publish")
        with published(fr, BIG).open("wb") as f:
            f.truncate(64 << 20)  # far more than the socket buffers hold
        yield fr


def _held(port: int, source: str) -> tuple[socket.socket, bytes]:
    """A request for a big file whose client reads nothing past the status line: nginx is
    still sending it, so it holds its request slot."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {BIG} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return s, s.recv(12)


def test_one_client_cannot_hold_every_slot_and_the_host_is_never_limited(limited):
    held: list[socket.socket] = []

    def hold(source: str) -> bytes:
        s, status_line = _held(limited.port, source)
        held.append(s)
        return status_line

    try:
        assert [hold("127.0.0.2") for _ in range(4)] == [b"HTTP/1.1 200"] * 3 + [b"HTTP/1.1 503"]
        assert [hold("127.0.0.3") for _ in range(2)] == [b"HTTP/1.1 200"] * 2
        assert hold("127.0.0.4") == b"HTTP/1.1 503"  # five at once in all
        # the deploy's health check and SysOps on the host are never turned away
        assert [hold("127.0.0.1") for _ in range(3)] == [b"HTTP/1.1 200"] * 3
        assert limited.get("/healthz")[0] == 200
    finally:
        for s in held:
            s.close()
    # no address in clear in nginx's error log (its limit_conn lines named the client)
    error_log = Path(limited.values["webstats_nginx_log_dir"]) / "nginx-error.log"
    assert b"127.0.0." not in error_log.read_bytes()
    again = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    wait_for(
        lambda: status_of(raw(limited.port, again, source="127.0.0.4")) == 200,
        30,
        what="the slots freed once the clients went away",
    )
