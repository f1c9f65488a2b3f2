"""The package installs, migrates on both databases and answers /healthz."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bioc_webstats import __version__, create_app
from bioc_webstats.config import load_settings
from bioc_webstats.store import db


def test_upgrade_is_idempotent_and_check_passes(db_url):
    head = db.head_revision()
    assert db.current_revision(db_url) == head
    assert db.upgrade(db_url) == head  # second run: nothing to do
    assert db.current_revision(db_url) == head


def test_healthz_ok_on_empty_database(db_url, clean_env, monkeypatch):
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    client = create_app(load_settings()).test_client()
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json == {
        "status": "ok",
        "version": __version__,
        "database": True,
        "schema": db.head_revision(),
        "valid_thru": None,
        "stale": False,  # ours, beside the contract's five (operations.md: says when stale)
    }


def test_healthz_503_when_schema_missing(clean_env, monkeypatch):
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", f"sqlite:///{clean_env / 'empty.db'}")
    resp = create_app(load_settings()).test_client().get("/healthz")
    assert resp.status_code == 503
    assert resp.json["status"] == "error" and resp.json["schema"] is None


def test_cli_check_fails_with_one_line_before_upgrade(clean_env):
    env = {
        "PATH": "/usr/bin:/bin",
        "WEBSTATS_ENV_FILE": str(clean_env / "none.env"),
        "WEBSTATS_DATABASE_URL": f"sqlite:///{clean_env / 'c.db'}",
    }
    exe = str(Path(sys.executable).parent / "bioc-webstats")
    r = subprocess.run([exe, "check"], env=env, capture_output=True, text=True)
    assert r.returncode == 3  # the schema is behind: `db upgrade` is the fix (the deploy migrates)
    assert r.stderr.count("\n") == 1 and "db upgrade" in r.stderr
    r = subprocess.run([exe, "db", "upgrade"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe, "check"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ok:")


def test_cli_check_fails_on_a_value_its_parameter_does_not_take(clean_env):
    """`check` (the deploy's smoke test) said ok with WEBSTATS_ETL_LOOKBACK_DAYS=abc; the
    ETL unit then failed on it at 01:00. Every typed parameter is checked, all in one line."""
    env = {
        "PATH": "/usr/bin:/bin",
        "WEBSTATS_ENV_FILE": str(clean_env / "none.env"),
        "WEBSTATS_DATABASE_URL": f"sqlite:///{clean_env / 'c.db'}",
    }
    exe = str(Path(sys.executable).parent / "bioc-webstats")
    assert subprocess.run([exe, "db", "upgrade"], env=env, capture_output=True).returncode == 0
    bad = {
        "WEBSTATS_ETL_LOOKBACK_DAYS": ("abc", "parameter etl/lookback_days must be an integer"),
        "WEBSTATS_ETL_LOGS_SINCE": ("2024-13-01", "parameter etl/logs_since must be a date"),
        "WEBSTATS_ETL_WORKERS": ("1e3", "parameter etl/workers must be an integer"),
        "WEBSTATS_GUNICORN_THREADS": ("0", "parameter gunicorn/threads must be at least 1"),
        "WEBSTATS_ETL_SYNC_CHANGE_LIMIT": ("-1", "etl/sync_change_limit must be at least 0"),
        "WEBSTATS_ALERTS_MIN_FREE_DISK": ("x", "alerts/min_free_disk must be a number of percent"),
    }
    for name, (value, message) in bad.items():
        r = subprocess.run([exe, "check"], env={**env, name: value}, capture_output=True, text=True)
        assert r.returncode == 1, (name, r.stdout)
        assert r.stderr.count("\n") == 1 and message in r.stderr, (name, r.stderr)
    both = {**env, **{n: v for n, (v, _) in list(bad.items())[:2]}}
    r = subprocess.run([exe, "check"], env=both, capture_output=True, text=True)
    assert r.stderr.count("\n") == 1 and r.stderr.count("parameter ") == 2, r.stderr
    r = subprocess.run([exe, "check"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ok:")
    # the web unit's own check (its ExecStartPre): only what the web reads
    web = [exe, "check", "--login", "web"]
    r = subprocess.run(web, env=both, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stderr
    r = subprocess.run(
        web, env={**env, "WEBSTATS_GUNICORN_THREADS": "0"}, capture_output=True, text=True
    )
    assert r.returncode == 1 and "gunicorn/threads must be at least 1" in r.stderr


def test_a_path_the_cli_cannot_reach_is_one_line(clean_env):
    """A path argument the system refuses (here a name too long; on a host, a root-only folder
    given to a command that runs as the service user) was a traceback from pathlib's
    is_dir/is_file; it is one line naming the path, exit 1."""
    env = {
        "PATH": "/usr/bin:/bin",
        "WEBSTATS_ENV_FILE": str(clean_env / "none.env"),
        "WEBSTATS_DATABASE_URL": f"sqlite:///{clean_env / 'c.db'}",
        "WEBSTATS_ETL_LOGS_SINCE": "2024-01-01",
        "WEBSTATS_STATE_DIR": str(clean_env / "state"),
    }
    exe = str(Path(sys.executable).parent / "bioc-webstats")
    assert subprocess.run([exe, "db", "upgrade"], env=env, capture_output=True).returncode == 0
    far = f"{clean_env}/{'x' * 300}"
    for args in (
        ["etl", "run", "--dry-run", "--source", far],
        ["packages", "sync", "--dry-run", "--from", far],
        ["compare", "--against", far],
        ["db", "backup", f"{far}/out.dump"],
        ["db", "restore", f"{far}/in.dump"],
    ):
        r = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.startswith(f"bioc-webstats: error: {far}") and "Traceback" not in r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.rstrip().endswith("File name too long"), (
            args, r.stderr,
        )  # fmt: skip


def test_an_oserror_on_a_descriptor_is_one_line_too(clean_env, monkeypatch, capsys):
    """An OSError whose filename is a descriptor's number (os.stat(fd), os.read) gave a
    TypeError traceback from inside the handler that makes one line of it."""
    import errno

    import pytest

    from bioc_webstats import cli

    def broken(*_a, **_k):
        raise OSError(errno.EBADF, "Bad file descriptor", 3)

    monkeypatch.setattr(cli, "load_settings", broken)
    with pytest.raises(SystemExit) as exc:
        cli.main(["status"])
    assert exc.value.code == 1
    assert capsys.readouterr().err == "bioc-webstats: error: 3: Bad file descriptor\n"


@pytest.mark.parametrize("module", ["bioc_webstats", "bioc_webstats.cli"])
def test_python_dash_m_is_the_cli(module, tmp_path):
    """``python -m`` runs the CLI (``-m bioc_webstats.cli`` printed nothing and exited 0)."""
    res = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout == f"bioc-webstats, version {__version__}\n", res


def test_printable_escapes_what_breaks_a_line_and_tells_a_backslash_from_it():
    from bioc_webstats.errors import printable

    assert printable("a b/é") == "a b/é"  # nothing to escape: as it is, backslashes too
    assert printable("C:\\x") == "C:\\x"
    assert printable("x\nALARM y\x07") == "x\\nALARM y\\x07"
    assert printable("a\\nb\n") == "a\\\\nb\\n"  # a value's backslash-n, then a newline
