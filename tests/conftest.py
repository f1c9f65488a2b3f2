"""Shared fixtures: a real throw-away PostgreSQL cluster, SQLite, and both through ``db_url``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bioc_webstats.store import db


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interruptible() -> None:
    """A ``preexec_fn``: SIGINT as a shell leaves it to a foreground command, its default action,
    unblocked. A test worker that ignores it (an earlier test in it may) passes that on across
    exec, and the command then never hears the ^C (CI: a run held past 150 s)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(autouse=True)
def _publish_without_waiting(monkeypatch, request):
    """A publish within the second of the last one waits for the next (Last-Modified never in
    the future); tests that publish again and again in-process do not wait, except those that
    check it (marker ``publish_waits``). Commands run as subprocesses wait as deployed."""
    if "publish_waits" not in request.keywords:
        from bioc_webstats.web import site

        monkeypatch.setattr(site, "MAX_PUBLISH_WAIT", 0.0)


def _pg_bindir() -> Path:
    base = Path("/usr/lib/postgresql")
    versions = sorted(
        (p for p in base.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name),
        reverse=True,
    )
    if not versions:
        pytest.fail("PostgreSQL server binaries not found: run 'make deps' (apt postgresql)")
    return versions[0]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL cluster on a free loopback port, owned by an unprivileged user.

    Yields a libpq base URL ``postgresql+psycopg2://webstats@127.0.0.1:PORT``.
    """
    if os.environ.get("WEBSTATS_TEST_PG_URL"):
        yield os.environ["WEBSTATS_TEST_PG_URL"]
        return
    with pg_cluster() as url:
        yield url


PG_ADMIN_PASSWORD = "adm1n-Pw"


@pytest.fixture(scope="session")
def pg_password_server() -> Iterator[str]:
    """A cluster that checks passwords on TCP (scram-sha-256), for the login tests; yields
    ``postgresql+psycopg2://webstats:<PG_ADMIN_PASSWORD>@127.0.0.1:PORT``."""
    with pg_cluster(passwords=True) as url:
        yield url


@contextlib.contextmanager
def pg_cluster(passwords: bool = False, settings: dict[str, str] | None = None) -> Iterator[str]:
    """Start a throw-away cluster (also used by bench/); yields its base URL, removes it after.
    With ``passwords``, TCP logins need their password (the superuser's: PG_ADMIN_PASSWORD).
    ``settings``: more server settings (``-c name=value``), for the benchmarks."""
    bindir = _pg_bindir()
    tmp = Path(tempfile.mkdtemp(prefix="webstats-pg-"))
    data = tmp / "data"
    port = free_port()
    run_as: list[str] = []
    (tmp / "pw").write_text(PG_ADMIN_PASSWORD + "\n")
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
        shutil.chown(tmp, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *run_as,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "webstats",
            *(
                ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={tmp / 'pw'}"]
                if passwords
                else ["--auth=trust"]
            ),
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    proc = subprocess.Popen(
        [
            *run_as,
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(tmp),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
            "-c",  # every test database has its own pool; gunicorn tests add their workers'
            "max_connections=300",
            *(a for k, v in (settings or {}).items() for a in ("-c", f"{k}={v}")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return (
                    subprocess.run(
                        [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                        capture_output=True,
                    ).returncode
                    == 0
                )
        except OSError:
            return False

    try:
        wait_for(ready, 60, what="PostgreSQL to accept connections")
        auth = f"webstats:{PG_ADMIN_PASSWORD}" if passwords else "webstats"
        yield f"postgresql+psycopg2://{auth}@127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


_db_counter = 0


def new_pg_database(base_url: str) -> str:
    """Create a fresh database on the test cluster and return its URL."""
    global _db_counter
    import sqlalchemy as sa

    _db_counter += 1
    name = f"t{os.getpid()}_{_db_counter}"
    engine = sa.create_engine(f"{base_url}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{base_url}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> Iterator[str]:
    """An empty database with the current schema, on SQLite and on real PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'webstats.sqlite3'}"
    else:
        url = new_pg_database(request.getfixturevalue("pg_server"))
    db.upgrade(url)
    yield url
    # Close this test's pool: idle connections of finished tests would pile up to the limit.
    db.dispose_engine(url)


@pytest.fixture
def clean_env(monkeypatch, tmp_path) -> Path:
    """No WEBSTATS_* / AWS_* variables from the caller's shell; a private state dir."""
    for key in list(os.environ):
        if key.startswith(("WEBSTATS_", "AWS_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("WEBSTATS_ENV_FILE", str(tmp_path / "none.env"))
    (tmp_path / "none.env").write_text("")
    monkeypatch.setenv("WEBSTATS_STATE_DIR", str(tmp_path / "state"))
    return tmp_path


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's server mode on a loopback port: a real HTTP endpoint for every AWS API.

    Yields the endpoint URL. Tests point boto3 at it with ``aws_env``.
    """
    import sys

    port = free_port()
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return proc.poll() is not None  # died: stop waiting, fail below

    try:
        wait_for(up, 60, what="moto server")
        assert proc.poll() is None, "moto_server exited at start"
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def aws_env(moto_server, monkeypatch) -> str:
    """boto3 in this process (and children that inherit the environment) talks to moto.

    Resets moto's state first so every test starts from an empty account.
    """
    import urllib.request

    urllib.request.urlopen(  # moto's own reset API
        urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"), timeout=10
    ).read()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return moto_server
