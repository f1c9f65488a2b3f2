"""Database URLs and logins: the plain ``postgresql://`` scheme, passwords with URL-special
characters, one clear line for a bad URL (never the password), a login per process (owner
for migrations, ETL, read-only web), and a rotated password picked up without a restart."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa

import webref
from bioc_webstats import create_app
from bioc_webstats.config import load_settings, normalize_database_url
from bioc_webstats.errors import ConfigError
from bioc_webstats.publish import publish
from bioc_webstats.store import db
from conftest import new_pg_database, wait_for

CLI = str(Path(sys.executable).parent / "bioc-webstats")
HARD = "p@ss/w:rd%#?"  # every character a URL parser trips on


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("WEBSTATS_")}
    return subprocess.run(
        [CLI, *args], env={**base, **env}, capture_output=True, text=True, timeout=120
    )


def role(admin_url: str, dbname: str, name: str, password: str) -> None:
    engine = sa.create_engine(f"{admin_url}/{dbname}", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{name}" LOGIN PASSWORD :pw'), {"pw": password})
        conn.execute(sa.text(f'GRANT ALL ON SCHEMA public TO "{name}"'))
    engine.dispose()


def parts(url: str) -> tuple[str, int]:
    u = sa.engine.make_url(url)
    return u.host or "", u.port or 5432


def test_plain_postgresql_scheme_and_a_password_with_special_characters(
    pg_password_server, clean_env
):
    url = new_pg_database(pg_password_server)
    dbname = url.rsplit("/", 1)[1]
    role(pg_password_server, dbname, "hard", HARD)
    host, port = parts(pg_password_server)
    plain = f"postgresql://hard:{HARD}@{host}:{port}/{dbname}"  # typed as is, unescaped
    for scheme in ("postgresql", "postgres"):
        res = run("db", "upgrade", WEBSTATS_DATABASE_URL=plain.replace("postgresql", scheme, 1),
                  WEBSTATS_ENV_FILE="/dev/null")  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert "schema at revision" in res.stdout
    res = run("check", WEBSTATS_DATABASE_URL=plain, WEBSTATS_ENV_FILE="/dev/null")
    assert res.returncode == 0, res.stderr
    assert normalize_database_url(plain).startswith("postgresql+psycopg2://hard:p%40ss%2Fw%3Ard")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"postgresql://u:{HARD}@db.example:abc/x", "not a valid database URL"),
        (f"postgresql://u:{HARD}@[::1/x", "not a valid database URL"),
        (f"postgresql://u:{HARD}@db.example:99999/x", "invalid port 99999"),
        (f"mysql://u:{HARD}@db.example/x", "must be postgresql://"),
        ("db.example/webstats", "must be postgresql://"),
        ("sqlite://", "in-memory SQLite database"),  # db upgrade said done, and kept nothing
        ("sqlite:///:memory:", "in-memory SQLite database"),
    ],
)
def test_bad_database_url_is_one_line_without_the_password(clean_env, url, message):
    with pytest.raises(ConfigError, match=message):
        normalize_database_url(url)
    res = run("check", WEBSTATS_DATABASE_URL=url, WEBSTATS_ENV_FILE="/dev/null")
    assert res.returncode == 1
    assert len(res.stderr.splitlines()) == 1 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    for piece in ("p@ss", "w:rd", "ss/w"):
        assert piece not in res.stderr


@pytest.mark.parametrize(
    "server", ["db.example/other", "db.example?host=evil", "u@db.example", "db example", ""]
)
def test_a_server_that_is_no_host_is_one_line(clean_env, monkeypatch, server):
    """db/server is a host: a '/', '?' or '@' in it would make the URL mean another database
    (it was taken as written)."""
    monkeypatch.setenv("WEBSTATS_DB_SERVER", server)
    monkeypatch.setenv("WEBSTATS_DB_PASSWORD", "r-pw")
    if not server:  # unset: the embedded database, as documented
        assert load_settings().database_url.startswith("sqlite:")
        return
    with pytest.raises(ConfigError, match="db/server must be a host name or address"):
        load_settings()
    for ok in ("db.example", "10.0.0.7", "[::1]", "webstats.abc123.us-east-1.rds.amazonaws.com"):
        monkeypatch.setenv("WEBSTATS_DB_SERVER", ok)
        assert sa.engine.make_url(load_settings().database_url).host in (ok, ok.strip("[]"))


def test_each_process_takes_its_login(clean_env, monkeypatch):
    monkeypatch.setenv("WEBSTATS_DB_SERVER", "db.example")
    monkeypatch.setenv("WEBSTATS_DB_DBUSER", "runner")
    monkeypatch.setenv("WEBSTATS_DB_PASSWORD", "r-pw")
    users = {
        login: sa.engine.make_url(load_settings(login=login).database_url).username
        for login in ("etl", "web", "owner")
    }
    assert users == {"etl": "runner", "web": "runner", "owner": "runner"}  # one login for all
    monkeypatch.setenv("WEBSTATS_DB_OWNER_DBUSER", "owner")
    monkeypatch.setenv("WEBSTATS_DB_OWNER_PASSWORD", "o-pw")
    monkeypatch.setenv("WEBSTATS_DB_WEB_DBUSER", "reader")
    monkeypatch.setenv("WEBSTATS_DB_WEB_PASSWORD", "w-pw")
    urls = {login: sa.engine.make_url(load_settings(login=login).database_url)
            for login in ("etl", "web", "owner")}  # fmt: skip
    assert {k: (u.username, u.password) for k, u in urls.items()} == {
        "etl": ("runner", "r-pw"),
        "web": ("reader", "w-pw"),
        "owner": ("owner", "o-pw"),
    }
    shown = run("config", "show", **{k: v for k, v in os.environ.items() if "WEBSTATS" in k})
    assert shown.returncode == 0 and "w-pw" not in shown.stdout and "o-pw" not in shown.stdout
    assert "db/owner_password = <redacted>" in shown.stdout


def test_the_web_on_the_etl_login_is_warned_at_every_start(clean_env):
    """Without a web login of its own the web unit's check says so (the journal, at each
    start): the web would log in with rights to write."""
    env = {
        "WEBSTATS_ENV_FILE": "/dev/null",
        "WEBSTATS_STATE_DIR": str(clean_env / "state"),
        "WEBSTATS_DB_SERVER": "127.0.0.1",
        "WEBSTATS_DB_PORT": "1",  # nothing listens: the warning comes before the database
        "WEBSTATS_DB_DBUSER": "runner",
        "WEBSTATS_DB_PASSWORD": "r-pw",
    }
    warning = "bioc-webstats: warning: no db/web_credentials (nor db/web_dbuser): the web logs in"
    shared = run("check", "--login", "web", **env)
    assert shared.stderr.startswith(warning), shared.stderr
    assert "r-pw" not in shared.stderr
    own = run("check", "--login", "web", WEBSTATS_DB_WEB_DBUSER="reader", **env)
    assert "no db/web_credentials" not in own.stderr, own.stderr
    assert "warning" not in run("check", **env).stderr  # the ETL's own login


def test_the_web_starts_while_the_database_is_down(clean_env):
    """The web unit's check (its ExecStartPre) failed while the database was down: the socket
    then held every request nginx passed on until nginx's 504, 150 s later. The web starts,
    says why in one line, and answers 503 at once; the ETL's check still fails."""
    env = {
        "WEBSTATS_ENV_FILE": "/dev/null",
        "WEBSTATS_STATE_DIR": str(clean_env / "state"),
        "WEBSTATS_DATABASE_URL": "postgresql://reader:s3cr3t@127.0.0.1:1/stats",
    }
    web = run("check", "--login", "web", **env)
    assert web.returncode == 0, web.stderr
    assert web.stderr == (
        'bioc-webstats: warning: database: connection to server at "127.0.0.1", port 1 failed: '
        "Connection refused; the web starts and answers 503 until the database is back\n"
    )
    etl = run("check", **env)
    assert etl.returncode == 1 and "Connection refused" in etl.stderr


def test_a_rotated_password_is_picked_up_without_a_restart(
    pg_password_server, clean_env, aws_env, monkeypatch
):
    url = new_pg_database(pg_password_server)
    dbname = url.rsplit("/", 1)[1]
    role(pg_password_server, dbname, "rot", "first-pw")
    secrets = boto3.client("secretsmanager")
    secrets.create_secret(
        Name="/bioc/rdb/0/login/rot",
        SecretString=json.dumps({"username": "rot", "password": "first-pw"}),
    )
    host, port = parts(pg_password_server)
    for k, v in {
        "WEBSTATS_DB_SERVER": host,
        "WEBSTATS_DB_PORT": str(port),
        "WEBSTATS_DB_DBNAME": dbname,
        "WEBSTATS_DB_CREDENTIALS": "/bioc/rdb/0/login/rot",
    }.items():
        monkeypatch.setenv(k, v)
    settings = load_settings()
    assert "first-pw" not in repr(settings)
    engine = db.get_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT current_user")) == "rot"
        # Rotation: the database and the secret get a new password; live sessions end.
        admin = sa.create_engine(f"{pg_password_server}/{dbname}", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text("ALTER ROLE rot PASSWORD 'second-pw'"))
            conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'rot'"
            ))  # fmt: skip
            wait_for(
                lambda: (
                    not conn.scalar(
                        sa.text("SELECT count(*) FROM pg_stat_activity WHERE usename = 'rot'")
                    )
                ),
                30,
                what="the old sessions to end",
            )
        admin.dispose()
        secrets.put_secret_value(
            SecretId="/bioc/rdb/0/login/rot",
            SecretString=json.dumps({"username": "rot", "password": "second-pw"}),
        )
        with engine.connect() as conn:  # the same engine: no restart
            assert conn.scalar(sa.text("SELECT current_user")) == "rot"
    finally:
        db.dispose_engine(settings.database_url)


# --- the web's own env file (config write-web): its login only, and a rotation followed ------


def test_the_webs_file_holds_its_settings_and_its_own_login_only(clean_env, tmp_path):
    """What bioc-webstats-web-config.service writes for the web, which cannot reach the
    instance role: the web's settings and its login, none of the other secrets, no SSM path,
    no AWS setting; mode 0600; the web loads the same configuration from it."""
    env = {
        "WEBSTATS_ENV_FILE": "/dev/null",
        "WEBSTATS_STATE_DIR": str(tmp_path),
        "WEBSTATS_DB_SERVER": "db.example",
        "WEBSTATS_DB_DBUSER": "runner",
        "WEBSTATS_DB_PASSWORD": "r-pw",
        "WEBSTATS_DB_OWNER_DBUSER": "owner",
        "WEBSTATS_DB_OWNER_PASSWORD": "o-pw",
        "WEBSTATS_DB_WEB_DBUSER": "reader",
        "WEBSTATS_DB_WEB_PASSWORD": HARD,
        "WEBSTATS_DB_SSLMODE": "require",
        "WEBSTATS_IP_HASH_KEY": "hash-key-secret",
        "WEBSTATS_FLASK_SECRET_KEY": "flask-secret",
        "WEBSTATS_GUNICORN_WORKERS": "3",
        "WEBSTATS_WEB_CACHE_MAX_AGE": "60",
        "WEBSTATS_ALERTS_MAX_DATA_AGE": "12",
        "WEBSTATS_ETL_LOGS_SINCE": "2024-01-01",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
    }
    out = tmp_path / "web.env"
    res = run("config", "write-web", str(out), **env)
    assert res.returncode == 0 and res.stdout == f"written: {out}\n", res.stderr
    assert out.stat().st_mode & 0o777 == 0o640  # the web reads it through its group
    text = out.read_text()
    for secret in ("r-pw", "o-pw", "hash-key-secret", "flask-secret", "runner", "owner"):
        assert secret not in text, secret
    for name in ("WEBSTATS_SSM_PATH", "AWS_", "WEBSTATS_ETL_", "WEBSTATS_DB_"):
        assert name not in text, name
    web = load_settings({"WEBSTATS_ENV_FILE": str(out)}, login="web")
    direct = load_settings(env, login="web")
    assert web.database_url == direct.database_url  # the password with every URL character
    assert sa.engine.make_url(web.database_url).password == HARD
    for name in ("gunicorn/workers", "web/cache_max_age", "alerts/max_data_age", "db/sslmode"):
        if name.startswith("db/"):
            assert "sslmode=require" in web.database_url
        else:
            assert web.get(name) == direct.get(name), name
    again = run("config", "write-web", str(out), **env)
    assert again.returncode == 0 and again.stdout == f"unchanged: {out}\n"
    # an old file of ours that is not UTF-8 (a Latin-1 value) is replaced: it was a traceback
    out.write_bytes(text.encode() + b"WEBSTATS_X=caf\xe9\n")
    res = run("config", "write-web", str(out), **env)
    assert res.returncode == 0 and res.stdout == f"written: {out}\n", res.stderr
    assert out.read_text() == text
    # a file that is not one it wrote (a typo: the main env file) is left as it is
    main = tmp_path / "webstats.env"
    main.write_text("WEBSTATS_DB_SERVER=db.example.org\n" + "# x\n" * 100_000)
    res = run("config", "write-web", str(main), **env)
    assert res.returncode == 1 and res.stderr == (
        f"bioc-webstats: error: cannot write {main}: it holds something else than what "
        "'config write-web' writes; give the web's env file, or remove it first\n"
    )
    assert main.read_text().startswith("WEBSTATS_DB_SERVER=db.example.org\n")
    # not over a FIFO or a link (as root, "config write-web /dev/null" made /dev/null a file)
    fifo, link = tmp_path / "fifo", tmp_path / "link"
    os.mkfifo(fifo)
    link.symlink_to(out)
    for path in (fifo, link):
        res = run("config", "write-web", str(path), **env)
        assert res.returncode == 1, path
        assert res.stderr == (
            f"bioc-webstats: error: cannot write {path}: exists and is not a regular file\n"
        )
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and link.is_symlink()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"WEBSTATS_GUNICORN_WORKERS": "1000"}, "parameter gunicorn/workers must be at most 64"),
        ({"WEBSTATS_ALERTS_SNS_TOPIC": "arn:a\nWEBSTATS_X=1"}, "alerts/sns_topic must be an SNS"),
        # the reader's lines are str.splitlines()'s: the web could not read what was written
        ({"WEBSTATS_ALERTS_HEALTH_URL": "http://x/\u2028y"}, "alerts/health_url: a value cannot"),
        ({"WEBSTATS_WEB_PUBLISH_DIR": "/srv/a\x0bb"}, "web/publish_dir: a value cannot"),
        ({"WEBSTATS_DB_PORT": "x"}, "parameter db/port must be a port number"),
    ],
)
def test_a_web_configuration_that_cannot_be_written_keeps_the_last_file(
    clean_env, tmp_path, setting, message
):
    """A bad value fails the writer with one line (the unit's failure alarms) and leaves the
    file the web runs with as it was."""
    env = {
        "WEBSTATS_ENV_FILE": "/dev/null",
        "WEBSTATS_STATE_DIR": str(tmp_path),
        "WEBSTATS_DB_SERVER": "db.example",
        "WEBSTATS_DB_WEB_DBUSER": "reader",
        "WEBSTATS_DB_WEB_PASSWORD": "w-pw",
    }
    out = tmp_path / "run" / "web.env"
    out.parent.mkdir()
    assert run("config", "write-web", str(out), **env).returncode == 0
    kept = out.read_text()
    res = run("config", "write-web", str(out), **env, **setting)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert len(res.stderr.splitlines()) == 1 and message in res.stderr, res.stderr
    assert out.read_text() == kept
    assert [p.name for p in out.parent.iterdir()] == ["web.env"]  # no temporary file left


def test_a_value_the_reader_would_change_is_written_quoted(clean_env, tmp_path, monkeypatch):
    """Spaces or a quote pair at a value's ends: the reader strips them, so the ETL published
    into '/srv/site ' while the web read '/srv/site'. Quoted, the web reads what the ETL has."""
    tricky = {
        "WEBSTATS_WEB_PUBLISH_DIR": "/srv/site ",
        "WEBSTATS_ALERTS_HEALTH_URL": "'http://127.0.0.1:8000/healthz'",
        "WEBSTATS_FLASK_LOG_LEVEL": "info",
    }
    env = {"WEBSTATS_ENV_FILE": "/dev/null", "WEBSTATS_STATE_DIR": str(tmp_path), **tricky}
    out = tmp_path / "web.env"
    assert run("config", "write-web", str(out), **env).returncode == 0
    for name in [*tricky, *env]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WEBSTATS_ENV_FILE", str(out))
    read = load_settings(login="web")
    assert read.get("web/publish_dir") == "/srv/site "
    assert read.get("alerts/health_url") == "'http://127.0.0.1:8000/healthz'"
    assert read.get("flask/log_level") == "info"


def test_the_web_follows_a_password_rotated_in_its_file(pg_password_server, clean_env, tmp_path):
    """The web has no way to the secret: after a failed login it reads its file again, which
    the writer (every 5 minutes, and db-bootstrap.yml) has rewritten with the new password."""
    url = new_pg_database(pg_password_server)
    dbname = url.rsplit("/", 1)[1]
    role(pg_password_server, dbname, "webrot", "first-pw")
    host, port = parts(pg_password_server)
    env = {
        "WEBSTATS_ENV_FILE": "/dev/null",
        "WEBSTATS_STATE_DIR": str(tmp_path),
        "WEBSTATS_DB_SERVER": host,
        "WEBSTATS_DB_PORT": str(port),
        "WEBSTATS_DB_DBNAME": dbname,
        "WEBSTATS_DB_WEB_DBUSER": "webrot",
        "WEBSTATS_DB_WEB_PASSWORD": "first-pw",
    }
    out = tmp_path / "web.env"
    assert run("config", "write-web", str(out), **env).returncode == 0
    settings = load_settings({"WEBSTATS_ENV_FILE": str(out)}, login="web")
    engine = db.get_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT current_user")) == "webrot"
        admin = sa.create_engine(f"{pg_password_server}/{dbname}", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text("ALTER ROLE webrot PASSWORD 'second-pw'"))
        admin.dispose()
        engine.dispose()  # the old sessions end (a failover, an idle timeout)
        rotated = {**env, "WEBSTATS_DB_WEB_PASSWORD": "second-pw"}
        res = run("config", "write-web", str(out), **rotated)
        assert res.returncode == 0 and "written" in res.stdout
        with engine.connect() as conn:  # the same engine: no restart
            assert conn.scalar(sa.text("SELECT current_user")) == "webrot"
    finally:
        db.dispose_engine(settings.database_url)


def test_the_web_login_reads_only_what_the_site_shows(pg_password_server, clean_env, monkeypatch):
    """The web's login holds no grant of its own: it is in ``<database>_web_reads``
    (db-bootstrap.yml makes the role), to which the owner grants what the pages and files show
    at every ``db upgrade`` (a restore runs one): not the download records (the clients'
    hashes), the ledger, the counting's own tables. A login set up before 0.3.24 (SELECT on
    every table, through the owner's default privileges) loses that at its next upgrade."""
    base = new_pg_database(pg_password_server)
    dbname = base.rsplit("/", 1)[1]
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    owner, web = f"{dbname}_owner", f"{dbname}_web"
    host, port = parts(pg_password_server)
    with admin.connect() as conn:
        for name in (owner, web):
            conn.execute(sa.text(f'CREATE ROLE "{name}" LOGIN PASSWORD :pw'), {"pw": HARD})
        conn.execute(sa.text(f'CREATE ROLE "{dbname}_web_reads" NOLOGIN'))
        conn.execute(sa.text(f'GRANT "{dbname}_web_reads" TO "{web}"'))
        conn.execute(sa.text(f'ALTER SCHEMA public OWNER TO "{owner}"'))
        # as db-bootstrap.yml sets the role up now, and set the web's login up before 0.3.24
        for grantee in (f"{dbname}_web_reads", web):
            conn.execute(sa.text(
                f'ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" IN SCHEMA public '
                f'GRANT SELECT ON TABLES TO "{grantee}"'
            ))  # fmt: skip
    admin.dispose()
    url = {
        login: f"postgresql://{name}:{HARD}@{host}:{port}/{dbname}"
        for login, name in (("owner", owner), ("web", web))
    }
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", url["owner"])  # the ETL's: here, the owner's
    monkeypatch.setenv("WEBSTATS_DATABASE_URL_OWNER", url["owner"])
    monkeypatch.setenv("WEBSTATS_DATABASE_URL_WEB", url["web"])
    monkeypatch.setenv("WEBSTATS_ENV_FILE", "/dev/null")
    owner_url = load_settings(login="owner").database_url
    web_url = load_settings(login="web").database_url

    def readable() -> set[str]:
        with db.get_engine(owner_url).connect() as conn:
            return set(conn.execute(sa.text(
                "SELECT c.relname FROM pg_class c WHERE c.relkind IN ('r', 'p') "
                "AND c.relnamespace = 'public'::regnamespace "
                "AND has_table_privilege(:web, c.oid, 'SELECT')"
            ), {"web": web}).scalars())  # fmt: skip

    def own_grants() -> list:
        with db.get_engine(owner_url).connect() as conn:
            return conn.execute(sa.text(
                "SELECT table_name FROM information_schema.role_table_grants WHERE grantee = :w "
                "UNION ALL SELECT 'default' FROM pg_default_acl a "
                "WHERE array_to_string(a.defaclacl, ',') LIKE '%' || :w || '=%'"
            ), {"w": web}).all()  # fmt: skip

    shown = {"packages", "package_stats", "category_stats", "meta", "alembic_version"}
    res = run("db", "upgrade", **{k: v for k, v in os.environ.items() if "WEBSTATS" in k})
    assert res.returncode == 0, res.stderr
    assert readable() == shown and own_grants() == []
    with db.session_factory(owner_url)() as s:
        webref.load_direct(s, valid_thru=dt.date(2024, 3, 31))
    settings = load_settings()
    publish(settings)
    web_settings = load_settings(login="web")
    client = create_app(web_settings).test_client()
    for path in (
        "/packages/stats/",
        "/packages/stats/bioc/bioc_pkg_stats.tab",
        "/packages/stats/bioc/affy/",  # built on request, as the web's login
        "/packages/stats/bioc/affy/affy_2024_stats.tab",
        "/healthz",
    ):
        r = client.get(path)
        assert r.status_code == 200, (path, r.status_code, r.data[:300])
    with db.get_engine(web_url).connect() as conn:
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            conn.execute(sa.text("SELECT count(*) FROM download_records"))
    # A restore makes the tables anew (no grant in the backup): the owner grants them again.
    dump = clean_env / "webstats.dump"
    env = {k: v for k, v in os.environ.items() if "WEBSTATS" in k}
    assert run("db", "backup", str(dump), **env).returncode == 0
    res = run("db", "restore", str(dump), **env)
    assert res.returncode == 0, res.stderr
    assert readable() == shown and own_grants() == []
    db.dispose_engine(web_url)
    r = create_app(web_settings).test_client().get("/packages/stats/bioc/affy/affy_stats.tab")
    assert r.status_code == 200
    # A restore by a release before 0.3.24 (a rollback; its db upgrade grants nothing): the
    # tables made anew are the role's by default, the web keeps serving; `check` then exits 3,
    # and the deploy's `db upgrade` narrows it again.
    restored = subprocess.run(
        ["pg_restore", "--clean", "--if-exists", "--no-owner", "--no-privileges",
         "--single-transaction", "--exit-on-error", "-h", host, "-p", str(port), "-U", owner,
         "-d", dbname, str(dump)],
        env={**os.environ, "PGPASSWORD": HARD}, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    db.dispose_engine(web_url)
    assert readable() > shown and "download_records" in readable()
    r = create_app(web_settings).test_client().get("/packages/stats/bioc/affy/affy_stats.tab")
    assert r.status_code == 200
    res = run("check", **env)
    assert res.returncode == 3, res.stderr
    assert "_web_reads may read download_records" in res.stderr, res.stderr
    assert run("db", "upgrade", **env).returncode == 0
    assert readable() == shown and own_grants() == []
    # What the owner makes that this release's models do not name (a newer release's tables,
    # restored by an older one; a view; partitions; a name to quote): not the web's either.
    with db.get_engine(owner_url).begin() as conn:
        conn.execute(sa.text('CREATE TABLE "Secret Hashes" (h text)'))
        conn.execute(sa.text("CREATE TABLE parted (d date) PARTITION BY RANGE (d)"))
        conn.execute(sa.text(
            "CREATE TABLE parted_2026 PARTITION OF parted FOR VALUES FROM ('2026-01-01') "
            "TO ('2027-01-01')"
        ))  # fmt: skip
        conn.execute(sa.text("CREATE VIEW records_view AS SELECT * FROM download_records"))
    res = run("check", **env)
    assert res.returncode == 3 and '"Secret Hashes"' not in res.stderr, res.stderr
    assert "may read Secret Hashes, parted, parted_2026, records_view" in res.stderr, res.stderr
    assert run("db", "upgrade", **env).returncode == 0
    assert readable() == shown and run("check", **env).returncode == 0
    with db.get_engine(web_url).connect() as conn:
        for relation in ('"Secret Hashes"', "parted_2026", "records_view"):
            with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
                conn.execute(sa.text(f"SELECT * FROM {relation}"))
            conn.rollback()
    # A grant of its own (a bootstrap before 0.3.24, a hand): `check` exits 3, as for a schema
    # behind, so that the deploy runs `db upgrade`, which takes it back.
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'GRANT SELECT ON download_records TO "{web}"'))
    res = run("check", **env)
    assert res.returncode == 3, res.stderr
    assert f"{web} holds grants of its own on the tables (bioc-webstats db upgrade" in res.stderr
    assert run("db", "upgrade", **env).returncode == 0
    res = run("check", **env)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert readable() == shown and own_grants() == []
    # No such role and no login that only reads (one login for everything: a laptop, the
    # demo): nothing to say. A database bootstrapped before 0.3.24 (a web login that reads
    # every table): a warning, the deploy goes on.
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP OWNED BY "{dbname}_web_reads"'))
        conn.execute(sa.text(f'DROP ROLE "{dbname}_web_reads"'))
        res = run("check", **env)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        conn.execute(sa.text(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{web}"'))
        res = run("check", **env)
    admin.dispose()
    assert res.returncode == 0, res.stderr
    assert "warning: the database has no role <database>_web_reads" in res.stderr


def owner_and_etl(server: str) -> tuple[sa.Engine, str, str, str, str, int]:
    """A new database whose schema an owner login owns, and an ETL login that may use it (both
    with the password HARD): (the administrator's engine, database, owner, etl, host, port)."""
    base = new_pg_database(server)
    dbname = base.rsplit("/", 1)[1]
    owner, etl = f"{dbname}_owner", f"{dbname}_etl"
    host, port = parts(server)
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in (owner, etl):
            conn.execute(sa.text(f'CREATE ROLE "{name}" LOGIN PASSWORD :pw'), {"pw": HARD})
        conn.execute(sa.text(f'ALTER SCHEMA public OWNER TO "{owner}"'))
        conn.execute(sa.text(f'GRANT USAGE ON SCHEMA public TO "{etl}"'))
    return admin, dbname, owner, etl, host, port


def test_only_the_owners_migrations_write_the_schema_revision(pg_password_server, clean_env):
    """The ETL's login may write every table the owner makes (default privileges), and so got
    alembic_version too: one UPDATE, and every release would take the schema for another
    revision. `db upgrade` leaves it SELECT there (its `check` reads the revision); `check`
    exits 3 on a grant back (a restore by an older release, a hand), and the deploy's
    `db upgrade` takes it back again."""
    admin, dbname, owner, etl, host, port = owner_and_etl(pg_password_server)
    with admin.connect() as conn:
        conn.execute(sa.text(  # as db-bootstrap.yml does
            f'ALTER DEFAULT PRIVILEGES FOR ROLE "{owner}" IN SCHEMA public '
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO "{etl}"'
        ))  # fmt: skip
    url = {n: f"postgresql://{n}:{HARD}@{host}:{port}/{dbname}" for n in (owner, etl)}
    env = {
        "WEBSTATS_ENV_FILE": "/dev/null",
        "WEBSTATS_STATE_DIR": str(clean_env / "state"),
        "WEBSTATS_DATABASE_URL": url[etl],
        "WEBSTATS_DATABASE_URL_OWNER": url[owner],
    }
    assert run("db", "upgrade", **env).returncode == 0
    etl_url = normalize_database_url(url[etl])

    def etl_can(statement: str) -> bool:
        with db.get_engine(etl_url).connect() as conn:
            try:
                conn.execute(sa.text(statement))
            except sa.exc.ProgrammingError as exc:
                assert "permission denied" in str(exc)
                return False
            finally:
                conn.rollback()
        return True

    writes = (
        "UPDATE alembic_version SET version_num = 'x'",
        "INSERT INTO alembic_version VALUES ('x')",
        "DELETE FROM alembic_version",
        "TRUNCATE alembic_version",
    )
    assert etl_can("SELECT version_num FROM alembic_version")
    assert not any(etl_can(w) for w in writes)
    assert etl_can("INSERT INTO meta (key, value) VALUES ('k', 'v')")  # its rows stay its own
    res = run("check", **env)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    with admin.connect() as conn:
        conn.execute(sa.text(f'GRANT UPDATE, TRUNCATE ON alembic_version TO "{etl}"'))
    assert etl_can(writes[0])
    res = run("check", **env)
    assert res.returncode == 3, res.stderr
    assert f"{etl} may write alembic_version, which only the owner's migrations" in res.stderr
    # db upgrade as a login that is not the owner (db/owner_credentials unset: the runner's)
    # says so; PostgreSQL alone would warn, change nothing, and let the deploy loop on exit 3.
    res = run("db", "upgrade", **{**env, "WEBSTATS_DATABASE_URL_OWNER": url[etl]})
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res.stderr
    assert f"the login {etl} is not the tables' owner {owner}" in res.stderr, res.stderr
    assert HARD not in res.stderr and etl_can(writes[0])
    assert run("db", "upgrade", **env).returncode == 0
    assert not any(etl_can(w) for w in writes) and etl_can("SELECT * FROM alembic_version")
    assert run("check", **env).returncode == 0
    admin.dispose()


def test_the_owners_login_given_on_stdin_is_the_one_used_and_no_secret_is_read(
    pg_password_server, clean_env
):
    """The deploy reads the owner's secret on the controller and gives it to `db upgrade`,
    `db backup` and `db restore` on standard input (the instance role may not read it): that
    login is used whatever the configuration names, and the secret it names is never read. A
    bad input is one line that does not quote it."""
    admin, dbname, owner, etl, host, port = owner_and_etl(pg_password_server)
    # production's form: db/* parameters, the owner's secret named, AWS out of reach
    env = {
        "WEBSTATS_ENV_FILE": "/dev/null",
        "WEBSTATS_STATE_DIR": str(clean_env / "state"),
        "WEBSTATS_DB_SERVER": host,
        "WEBSTATS_DB_PORT": str(port),
        "WEBSTATS_DB_DBNAME": dbname,
        "WEBSTATS_DB_DBUSER": etl,
        "WEBSTATS_DB_PASSWORD": HARD,
        "WEBSTATS_DB_OWNER_CREDENTIALS": "/bioc/rdb/0/login/webstats_owner",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    }
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBSTATS_", "AWS_"))}

    def cli(*args: str, given: str | bytes | None, **more: str) -> subprocess.CompletedProcess:
        data = given.encode() if isinstance(given, str) else given
        res = subprocess.run([CLI, *args], env={**base_env, **env, **more}, input=data,
                             capture_output=True, timeout=120)  # fmt: skip
        return subprocess.CompletedProcess(
            res.args, res.returncode, res.stdout.decode(), res.stderr.decode()
        )

    def table_owners() -> set[str]:
        with admin.connect() as conn:
            rows = conn.execute(sa.text("SELECT tableowner FROM pg_tables "
                                        "WHERE schemaname = 'public'"))  # fmt: skip
            return {r[0] for r in rows}

    res = cli("db", "upgrade", given=None)
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "cannot read database secret /bioc/rdb/0/login/webstats_owner (db/owner_cred" in (
        res.stderr
    )
    secret = json.dumps({"username": owner, "password": HARD})
    res = cli("db", "upgrade", "--owner-secret-stdin", given=secret)
    assert res.returncode == 0, res.stderr
    assert table_owners() == {owner}
    dump = clean_env / "owner.dump"
    res = cli("db", "backup", str(dump), "--owner-secret-stdin", given=secret)
    assert res.returncode == 0 and dump.stat().st_size > 0, res.stderr
    # by hand on the host, where no owner's login is configured: the ETL's, with the rights
    # db-bootstrap.yml gives it (SELECT on the sequences too: pg_dump reads their values)
    with admin.connect() as conn:
        conn.execute(sa.text(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{etl}"'))
        conn.execute(sa.text(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{etl}"'))
    by_hand = {"WEBSTATS_DB_OWNER_CREDENTIALS": ""}
    res = cli("db", "backup", str(clean_env / "etl.dump"), given=None, **by_hand)
    assert res.returncode == 1 and "permission denied for sequence" in res.stderr, res.stderr
    with admin.connect() as conn:
        conn.execute(sa.text(f'GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO "{etl}"'))
    res = cli("db", "backup", str(clean_env / "etl.dump"), given=None, **by_hand)
    assert res.returncode == 0, res.stderr
    assert (clean_env / "etl.dump").stat().st_size > 0
    # the local form: the owner's URL in the configuration, here a wrong one; the given login
    # replaces its user and password
    wrong = f"postgresql://{etl}:wrong@{host}:{port}/{dbname}"
    res = cli("db", "upgrade", "--owner-secret-stdin", given=secret,
              WEBSTATS_DATABASE_URL_OWNER=wrong)  # fmt: skip
    assert res.returncode == 0 and "schema at revision" in res.stdout, res.stderr
    for bad, says in (
        ("", "must be a JSON object"),
        (f"{HARD}\n", "must be a JSON object"),
        (json.dumps({"username": owner}), 'with a "password" string'),
        (json.dumps({"password": HARD}), 'must name its "username"'),
        (json.dumps({"username": 7, "password": HARD}), '"username" not a string'),
        (b"\xff" + HARD.encode(), "must be a JSON object"),
        ("x" * 70_000, "is over 65536 bytes"),
    ):
        res = cli("db", "upgrade", "--owner-secret-stdin", given=bad)
        assert res.returncode == 1 and len(res.stderr.splitlines()) == 1, res.stderr
        assert says in res.stderr and "(--owner-secret-stdin)" in res.stderr, res.stderr
        assert HARD not in res.stderr and "Traceback" not in res.stderr
    # the command's arguments are checked first, and a terminal is not read from (no prompt)
    res = cli("db", "backup", "--owner-secret-stdin", given=secret)
    assert res.returncode == 2 and "Missing argument 'DEST'" in res.stderr, res.stderr
    primary, secondary = os.openpty()
    try:
        tty = subprocess.run([CLI, "db", "upgrade", "--owner-secret-stdin"], stdin=secondary,
                             env={**base_env, **env}, capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    finally:
        os.close(primary)
        os.close(secondary)
    assert tty.returncode == 1 and "standard input is a terminal" in tty.stderr, tty.stderr
    closed = subprocess.run(["sh", "-c", 'exec "$0" db upgrade --owner-secret-stdin <&-', CLI],
                            env={**base_env, **env}, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert closed.returncode == 1 and "standard input is closed" in closed.stderr, closed.stderr
    admin.dispose()
