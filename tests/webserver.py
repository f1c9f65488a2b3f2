"""A real gunicorn (the shipped config) on a free loopback port, for the end-to-end web tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import free_port, new_pg_database, wait_for


@dataclass
class Server:
    base: str  # http://127.0.0.1:PORT
    port: int
    proc: subprocess.Popen
    access_log: Path
    error_log: Path

    def get(self, path: str, method: str = "GET", headers: dict | None = None):
        """(status, headers, body) without following redirects; header names are
        case-insensitive (the server sends them lower-cased, as HTTP/2 does)."""
        req = urllib.request.Request(self.base + path, method=method, headers=headers or {})
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(req, timeout=30) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def raw_request(port: int, target: bytes, method: bytes = b"GET") -> int:
    """Send one request line with exactly these bytes; return the status code (0: no answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def gunicorn_env(db_url: str, tmp: Path, bind: str, workers: int = 2) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBSTATS_", "AWS_"))}
    (tmp / "none.env").write_text("")
    env.update(
        WEBSTATS_ENV_FILE=str(tmp / "none.env"),
        WEBSTATS_STATE_DIR=str(tmp / "state"),
        WEBSTATS_DATABASE_URL=db_url,
        WEBSTATS_GUNICORN_BIND_PORT=bind,
        WEBSTATS_GUNICORN_ACCESS_LOG=str(tmp / "access.log"),
        WEBSTATS_GUNICORN_ERROR_LOG=str(tmp / "error.log"),
        WEBSTATS_GUNICORN_WORKERS=str(workers),
    )
    return env


def gunicorn_cmd() -> list[str]:
    return [
        str(Path(sys.executable).parent / "gunicorn"),
        "-c",
        "python:bioc_webstats.web.gunicorn_conf",
        "bioc_webstats:create_app()",
    ]


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


@contextlib.contextmanager
def run_gunicorn(db_url: str, tmp: Path, workers: int = 2, **extra_env) -> Iterator[Server]:
    """Start gunicorn with the shipped config; wait for /healthz; stop it afterwards."""
    port = free_port()
    env = gunicorn_env(db_url, tmp, f"127.0.0.1:{port}", workers)
    env.update(extra_env)
    proc = subprocess.Popen(gunicorn_cmd(), env=env, cwd=tmp)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(base) or proc.poll() is not None, 60, what="gunicorn")
        assert proc.poll() is None, (tmp / "error.log").read_text(errors="replace")
        yield Server(base, port, proc, tmp / "access.log", tmp / "error.log")
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def reference_server(pg_base: str, tmp: Path, valid_thru) -> Iterator[Server]:
    """gunicorn on a fresh PostgreSQL database holding the reference dataset (``webref``)."""
    import webref
    from bioc_webstats.store import db

    url = new_pg_database(pg_base)
    db.upgrade(url)
    with db.session_factory(url)() as s:
        webref.load_direct(s, valid_thru=valid_thru)
    with run_gunicorn(url, tmp) as srv:
        yield srv
