"""A real gunicorn (the shipped config) on a free loopback port, for the end-to-end web tests."""

from __future__ import annotations

import contextlib
import grp
import http.client
import os
import pwd
import shutil
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


# --- nginx in front (the role's own templates) -------------------------------------------------

NGINX_TEMPLATES = Path(__file__).resolve().parent.parent / "roles" / "webstats_nginx" / "templates"


def nginx_binary() -> str:
    """The distribution's nginx; a test that needs it fails (never skips) without it."""
    found = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert found, "nginx not found: 'make deps' installs it (Debian's nginx-light)"
    return found


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def unix_get(path: Path, target: str, timeout: float = 10) -> tuple[int, dict, bytes]:
    """GET ``target`` from an HTTP server on the unix socket ``path``: (status, headers, body)."""
    conn = _UnixHTTPConnection(str(path), timeout)
    try:
        conn.request("GET", target, headers={"Host": "localhost"})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


@dataclass
class Front:
    """nginx (rendered from roles/webstats_nginx/templates) in front of gunicorn."""

    base: str  # http://127.0.0.1:PORT (nginx)
    port: int
    proc: subprocess.Popen  # nginx's master
    conf: Path
    values: dict  # the variables the configuration was rendered with
    access_log: Path  # nginx's
    publish_dir: Path
    socket: Path  # gunicorn's
    gunicorn: subprocess.Popen
    gunicorn_access_log: Path
    env: dict  # the app's environment (the CLI run with it sees what gunicorn sees)

    get = Server.get

    def cli(self, *args: str) -> str:
        """``bioc-webstats ARGS`` with the app's environment; its stdout."""
        exe = str(Path(sys.executable).parent / "bioc-webstats")
        res = subprocess.run(
            [exe, *args], env=self.env, capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, res.stderr
        return res.stdout

    def pids(self) -> dict[str, list[int]]:
        """Every process of nginx (master, workers) and gunicorn (arbiter, workers)."""
        return {
            "nginx": [self.proc.pid, *_children(self.proc.pid)],
            "gunicorn": [self.gunicorn.pid, *_children(self.gunicorn.pid)],
        }


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def rss_kib(pid: int) -> int:
    """Resident set size of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def render_nginx(tmp: Path, socket_path: Path, publish_dir: Path, **facts) -> tuple[Path, dict]:
    """nginx.conf and the site from the role's templates, with the playbook's wiring and test
    values: a free loopback port, files under ``tmp``, this user as nginx's user (root in CI).
    Returns (nginx.conf, values)."""
    import ansible_render

    conf_dir = tmp / "nginx"
    for sub in ("modules-enabled", "conf.d", "sites-enabled"):
        (conf_dir / sub).mkdir(parents=True, exist_ok=True)
    (tmp / "logs").mkdir(exist_ok=True)
    shutil.copy("/etc/nginx/mime.types", conf_dir / "mime.types")
    user = pwd.getpwuid(os.getuid()).pw_name
    test_values = {
        "webstats_base_log_dir": str(tmp / "logs"),
        "webstats_base_publish_dir": str(publish_dir),
        "webstats_base_web_socket": str(socket_path),
        "webstats_nginx_user": user,
        "webstats_nginx_group": grp.getgrgid(os.getgid()).gr_name,
        "webstats_nginx_listen_address": "127.0.0.1",
        "webstats_nginx_port": free_port(),
        "__webstats_nginx_conf_dir": str(conf_dir),
        "__webstats_nginx_pid": str(tmp / "nginx.pid"),
        "__webstats_nginx_origin_conf": str(conf_dir / "bioc-webstats-origin.conf"),
    }
    values = ansible_render.deploy_vars(**{**test_values, **facts})
    conf = conf_dir / "nginx.conf"
    conf.write_text(ansible_render.render(NGINX_TEMPLATES / "nginx.conf.j2", values))
    site = ansible_render.render(NGINX_TEMPLATES / "site.conf.j2", values)
    (conf_dir / "sites-enabled" / "bioc-webstats").write_text(site)
    if values["webstats_nginx_origin_header_name"]:
        origin = ansible_render.render(NGINX_TEMPLATES / "origin.conf.j2", values)
        (conf_dir / "bioc-webstats-origin.conf").write_text(origin)
    return conf, values


def nginx_test(conf: Path) -> subprocess.CompletedProcess:
    """``nginx -t`` of a configuration."""
    return subprocess.run(
        [nginx_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=60
    )


@contextlib.contextmanager
def run_front(db_url: str, tmp: Path, workers: int = 2, **facts) -> Iterator[Front]:
    """gunicorn (the shipped config) on a unix socket and a real nginx in front of it, as the
    roles set them up; wait until /healthz answers through nginx; stop both afterwards."""
    tmp.mkdir(parents=True, exist_ok=True)
    sock = tmp / "web.sock"
    publish_dir = tmp / "site"
    publish_dir.mkdir(exist_ok=True)
    conf, values = render_nginx(tmp, sock, publish_dir, **facts)
    checked = nginx_test(conf)
    assert checked.returncode == 0, checked.stderr
    env = gunicorn_env(db_url, tmp, f"unix:{sock}", workers)
    env["WEBSTATS_WEB_PUBLISH_DIR"] = str(publish_dir)
    env["WEBSTATS_WEB_CACHE_MAX_AGE"] = str(values["webstats_nginx_cache_max_age"])
    # No home to write to, as for the unit's web user (/nonexistent, a read-only system);
    # these tests run as root, who could create that one: a file stands for it.
    home = tmp / "no-home"
    home.touch()
    env["HOME"] = str(home)
    env.pop("XDG_RUNTIME_DIR", None)
    gunicorn = subprocess.Popen(gunicorn_cmd(), env=env, cwd=tmp)
    nginx = None
    try:
        wait_for(lambda: sock.exists() or gunicorn.poll() is not None, 60, what="gunicorn")
        assert gunicorn.poll() is None, (tmp / "error.log").read_text(errors="replace")
        nginx = subprocess.Popen(
            [nginx_binary(), "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        port = values["webstats_nginx_port"]
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(base) or nginx.poll() is not None, 60, what="nginx + gunicorn")
        assert nginx.poll() is None, nginx.stderr.read().decode(errors="replace")
        yield Front(
            base=base,
            port=port,
            proc=nginx,
            conf=conf,
            values=values,
            access_log=tmp / "logs" / "nginx-access.log",
            publish_dir=publish_dir,
            socket=sock,
            gunicorn=gunicorn,
            gunicorn_access_log=tmp / "access.log",
            env=env,
        )
    finally:
        if nginx is not None:
            stop(nginx)
        stop(gunicorn)


@contextlib.contextmanager
def reference_front(pg_base: str, tmp: Path, valid_thru) -> Iterator[Front]:
    """nginx + gunicorn on a fresh PostgreSQL database holding the reference dataset
    (``webref``), published as every ETL run publishes."""
    import webref
    from bioc_webstats.store import db

    url = new_pg_database(pg_base)
    db.upgrade(url)
    with db.session_factory(url)() as s:
        webref.load_direct(s, valid_thru=valid_thru)
    with run_front(url, tmp) as front:
        front.cli("publish")
        yield front
