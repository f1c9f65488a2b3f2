"""The shipped gunicorn config end to end, on real PostgreSQL: HEAD and Content-Length over
real HTTP, raw-byte URLs, logs and SIGUSR1, Type=notify, systemd socket activation."""

from __future__ import annotations

import datetime as dt
import signal
import socket
import subprocess
import sys

import pytest

import webref
from bioc_webstats.store import db
from conftest import free_port, new_pg_database, wait_for
from test_web_http import generated_urls
from webserver import gunicorn_cmd, gunicorn_env, healthy, raw_request, run_gunicorn, stop

VT = dt.date(2024, 3, 31)


@pytest.fixture(scope="module")
def loaded_pg(pg_server) -> str:
    url = new_pg_database(pg_server)
    db.upgrade(url)
    with db.session_factory(url)() as s:
        webref.load_direct(s, valid_thru=VT)
    return url


@pytest.fixture(scope="module")
def server(loaded_pg, tmp_path_factory):
    with run_gunicorn(loaded_pg, tmp_path_factory.mktemp("gunicorn")) as srv:
        yield srv


def test_every_file_get_and_head_over_http(server):
    expected = webref.Reference(VT).all_files()
    for path, body in expected.items():
        status, headers, data = server.get("/packages/stats/" + path)
        assert status == 200 and data == body, path
        hstatus, hheaders, hdata = server.get("/packages/stats/" + path, method="HEAD")
        assert hstatus == 200 and hdata == b"", path
        assert hheaders["Content-Length"] == str(len(body)), path
        for k in ("Content-Type", "ETag", "Last-Modified", "Cache-Control"):
            assert hheaders[k] == headers[k], (path, k)
    for page in ("", "index.html", "bioc/", "bioc/affy/", "data-annotation.html"):
        status, headers, data = server.get("/packages/stats/" + page)
        hstatus, hheaders, _ = server.get("/packages/stats/" + page, method="HEAD")
        assert status == hstatus == 200 and hheaders["Content-Length"] == str(len(data))
    # a missing year is a real 404, also for HEAD
    assert server.get("/packages/stats/bioc/affy/affy_2010_stats.tab")[0] == 404
    assert server.get("/packages/stats/bioc/affy/affy_2010_stats.tab", method="HEAD")[0] == 404
    status, headers, _ = server.get(
        "/packages/stats/bioc/affy/affy_stats.tab",
        headers={
            "If-None-Match": server.get("/packages/stats/bioc/affy/affy_stats.tab")[1]["ETag"]
        },
    )
    assert status == 304


def test_raw_byte_urls_never_5xx(server):
    targets = [u.encode("utf-8", "surrogateescape") for u in generated_urls(400, seed=7)]
    targets += [
        b"/packages/stats/bioc/\xff\xfe/",
        b"/packages/stats/bioc/affy\x00/",
        b"/packages/stats/bioc/%00/",
        b"/packages/stats/bioc/%c3%28/",
        b"/packages/stats/bioc/../../etc/passwd",
        b"/packages/stats/bioc/%2e%2e/%2e%2e/etc/passwd",
        b"/packages/stats/" + b"a" * 10000,
        b"/packages/stats/bioc/" + "\u00e9".encode() * 300 + b"/",
        b"//packages/stats/",
        b"/packages/stats/bioc/affy/?" + b"q" * 3000,
    ]
    for t in targets:
        status = raw_request(server.port, t)
        assert 0 < status < 500, t[:200]
    assert raw_request(server.port, b"/packages/stats/" + b"a" * 10000) in (400, 404, 414)
    assert healthy(server.base)


def test_no_request_header_moves_the_site(server):
    """SCRIPT_NAME and PATH_INFO sent as headers (a loopback client is one of gunicorn's trusted
    forwarders by default) neither mount the site under another prefix nor fail the request."""

    def status(target: bytes, header: bytes) -> int:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                      + header + b"\r\n\r\n")  # fmt: skip
            return int(s.recv(4096).split(b" ", 2)[1])

    for header in (b"SCRIPT_NAME: /evil", b"PATH_INFO: /packages/stats/bioc/"):
        assert status(b"/packages/stats/", header) == 200, header
        assert status(b"/packages/stats/bioc/bioc_packages.txt", header) == 200, header
        assert status(b"/evil/packages/stats/", header) == 404, header


def test_access_log_and_sigusr1_reopen(server):
    server.get("/packages/stats/bioc/bioc_packages.txt")
    wait_for(lambda: b"bioc_packages.txt" in server.access_log.read_bytes(), 10, what="log line")
    rotated = server.access_log.with_suffix(".log.1")
    server.access_log.rename(rotated)
    server.proc.send_signal(signal.SIGUSR1)

    def reopened() -> bool:
        server.get("/packages/stats/bioc/bioc_pkg_scores.tab")
        return server.access_log.exists() and b"pkg_scores" in server.access_log.read_bytes()

    wait_for(reopened, 20, interval=0.2, what="access log reopened after SIGUSR1")
    assert b"bioc_packages.txt" in rotated.read_bytes()  # the old file kept its lines


def test_type_notify_ready(loaded_pg, tmp_path):
    """Under systemd Type=notify, gunicorn itself sends READY=1 to $NOTIFY_SOCKET."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    port = free_port()
    env = gunicorn_env(loaded_pg, tmp_path, f"127.0.0.1:{port}", workers=1)
    env["NOTIFY_SOCKET"] = str(sock_path)
    proc = subprocess.Popen(gunicorn_cmd(), env=env, cwd=tmp_path)
    try:
        msg = sock.recv(4096)
        assert b"READY=1" in msg
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), 60, what="healthz")
    finally:
        stop(proc)
        sock.close()


ACTIVATE = """
import os, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_systemd_socket_activation(loaded_pg, tmp_path):
    """With LISTEN_FDS (a .socket unit), gunicorn serves on the inherited socket, not bind."""
    port = free_port()
    unused = free_port()
    env = gunicorn_env(loaded_pg, tmp_path, f"127.0.0.1:{unused}", workers=1)
    proc = subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, str(port), *gunicorn_cmd()],
        env=env,
        cwd=tmp_path,
    )
    try:
        wait_for(
            lambda: healthy(f"http://127.0.0.1:{port}") or proc.poll() is not None,
            60,
            what="gunicorn on the inherited socket",
        )
        assert proc.poll() is None
        assert not healthy(f"http://127.0.0.1:{unused}")
    finally:
        stop(proc)


def test_bad_config_fails_with_one_line(tmp_path):
    env = gunicorn_env("sqlite:///x.db", tmp_path, "127.0.0.1:1")
    env["WEBSTATS_GUNICORN_WORKERS"] = "many"
    r = subprocess.run(
        gunicorn_cmd(), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0
    assert "parameter gunicorn/workers must be an integer" in r.stderr
    assert "Traceback" not in r.stderr
    env["WEBSTATS_GUNICORN_WORKERS"] = "1"
    env["WEBSTATS_FLASK_LOG_LEVEL"] = "chatty"
    r = subprocess.run(
        gunicorn_cmd(), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "bioc-webstats: parameter flask/log_level must be one of DEBUG, INFO, WARNING, ERROR, "
        "CRITICAL, got 'CHATTY'"
    ]
