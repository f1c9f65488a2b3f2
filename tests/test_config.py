"""Configuration: precedence, SSM by path (moto server on loopback), Secrets Manager, redaction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import pytest

from bioc_webstats.config import PARAMS, ConfigError, load_settings, render_settings
from conftest import free_port

PATH = "/bioc/webstats/prod"
SECRET_KEY = "flask-Secret-4b1d9e0c7a"  # values that must never be printed
HASH_KEY = "iphash-Secret-93aa1e6f52"
DB_PASSWORD = "db-Pa55@word/7e:21%c0"  # URL-special characters on purpose
CLI = str(Path(sys.executable).parent / "bioc-webstats")


def put(name: str, value: str, secure: bool = False) -> None:
    boto3.client("ssm").put_parameter(
        Name=f"{PATH}/{name}",
        Value=value,
        Type="SecureString" if secure else "String",
        Overwrite=True,
    )


def put_required(server: str = "db.example.internal") -> None:
    put("db/server", server)
    put("flask/secret_key", SECRET_KEY, secure=True)
    put("etl/ip_hash_key", HASH_KEY, secure=True)


def make_db_secret(secret_id: str = "/bioc/rdb/0/login/webstats_runner", body=None) -> None:
    if body is None:
        body = json.dumps({"username": "runner_from_secret", "password": DB_PASSWORD})
    boto3.client("secretsmanager").create_secret(Name=secret_id, SecretString=body)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, env=dict(os.environ), timeout=120
    )


def test_defaults_without_ssm_use_embedded_sqlite(clean_env):
    s = load_settings()
    for p in PARAMS:
        assert s.get(p.name) == p.default
        assert s.sources[p.name] == "default"
    assert s.ssm_path is None
    assert s.database_url == f"sqlite:///{clean_env / 'state' / 'webstats.sqlite3'}"
    assert s.sources["database_url"] == "default (embedded SQLite)"


@pytest.mark.parametrize(
    "name", ["WEBSTATS_DB_PASSWORD", "WEBSTATS_IP_HASH_KEY", "WEBSTATS_DATABASE_URL"]
)
def test_a_variable_that_is_not_utf8_is_one_line(clean_env, name):
    """Bytes that are not UTF-8 in the process environment (a password pasted from a Latin-1
    file) were a 40-line traceback from the first use of the value."""
    env = {k.encode(): v.encode() for k, v in os.environ.items()}
    env[b"WEBSTATS_DB_SERVER"] = b"db.example"
    env[name.encode()] = b"sqlite:////tmp/S3cr3t\xff" if "URL" in name else b"S3cr3t\xff"
    for args in (["check"], ["etl", "reingest", "x"]):
        res = subprocess.run([CLI, *args], capture_output=True, env=env, timeout=120)
        assert res.returncode == 1, args
        assert (
            res.stderr
            == (
                f"bioc-webstats: error: environment {name}: not UTF-8 (the value is not shown)\n"
            ).encode()
        ), res.stderr[-2000:]


def test_env_file_with_a_bom_and_names_that_are_no_variables(clean_env, monkeypatch):
    """An editor's byte-order mark made the first line's name "\\ufeffWEBSTATS_…": set, never
    read, and the default database used without a word. The mark is dropped; a name that is
    no variable name is one line naming it."""
    env = clean_env / "webstats.env"
    monkeypatch.setenv("WEBSTATS_ENV_FILE", str(env))
    env.write_bytes(b"\xef\xbb\xbfWEBSTATS_WEB_CACHE_MAX_AGE=60\nWEBSTATS_ETL_LOOKBACK_DAYS=5\n")
    s = load_settings()
    assert (s.get("web/cache_max_age"), s.sources["web/cache_max_age"]) == ("60", f"env file {env}")
    assert s.get("etl/lookback_days") == "5"
    for line, shown in [
        ("WEBSTATS ETL LOOKBACK DAYS=5", "'WEBSTATS' is followed by ' '"),
        ("\u200bWEBSTATS_ETL_LOOKBACK_DAYS=5", "a name begins with '\\u200b'"),
        ("1WEBSTATS=5", ""),
        ("q8Zr0xVHk3mP9sLw2TnQ7y+/ab=", ""),  # a key wrapped onto a line of its own
        # the first "=" in the value: the secret before it was in the message
        (
            "WEBSTATS_IP_HASH_KEY: q8Zr+0xV/Hk3mP9sLw2TnQ7y=",
            "'WEBSTATS_IP_HASH_KEY' is followed by ':'",
        ),
        ("WEBSTATS_DB_PASSWORD S3cr3t=PW", "'WEBSTATS_DB_PASSWORD' is followed by ' '"),
    ]:
        env.write_text(f"# settings\n{line}\n", encoding="utf-8")
        with pytest.raises(ConfigError) as err:
            load_settings()
        what = f"{shown}: " if shown else ""
        assert str(err.value) == (
            f"{env}:2: {what}not NAME=value (the rest of the line is not shown)"
        )
        assert "S3cr3t" not in str(err.value) and "q8Zr" not in str(err.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", 36.0), ("1.5", 1.5), ("0", 0.0), ("-1", None), ("inf", None), ("nan", None), ("x", None)],
)
def test_get_float_takes_finite_numbers_from_zero_and_empty_is_the_default(
    clean_env, monkeypatch, raw, expected
):
    monkeypatch.setenv("WEBSTATS_ALERTS_MAX_DATA_AGE", raw)
    s = load_settings()
    if expected is not None:
        assert s.get_float("alerts/max_data_age") == expected
        return
    with pytest.raises(
        ConfigError, match=f"alerts/max_data_age must be a number of hours, got '{raw}'"
    ):
        s.get_float("alerts/max_data_age")


@pytest.mark.parametrize(("raw", "ok"), [("100", True), ("99.5", True), ("100.1", False),
                                         ("150", False)])  # fmt: skip
def test_a_percentage_is_at_most_100(clean_env, monkeypatch, raw, ok):
    """alerts/min_free_disk 150 passed `config show`, then every watchdog run raised disk-low
    ("28.2% free (limit 150%)")."""
    monkeypatch.setenv("WEBSTATS_ALERTS_MIN_FREE_DISK", raw)
    s = load_settings()
    if ok:
        assert s.get_float("alerts/min_free_disk") == float(raw)
        return
    with pytest.raises(ConfigError, match=f"of percent from 0 to 100, got '{raw}'"):
        s.get_float("alerts/min_free_disk")


def test_each_level_overrides_the_previous(clean_env, aws_env, monkeypatch):
    env_file = clean_env / "webstats.env"
    env_file.write_text(
        "# written by the playbook\n"
        "WEBSTATS_SSM_PATH=/bioc/webstats/prod/\n"
        "WEBSTATS_DB_DBNAME=from_file\n"
        'WEBSTATS_FLASK_LOG_LEVEL="WARNING"\n'
        "WEBSTATS_ETL_LOOKBACK_DAYS=5\n"
    )
    monkeypatch.setenv("WEBSTATS_ENV_FILE", str(env_file))
    put_required()
    put("flask/log_level", "ERROR")
    put("etl/lookback_days", "7")
    make_db_secret()
    monkeypatch.setenv("WEBSTATS_ETL_LOOKBACK_DAYS", "9")

    s = load_settings()
    assert (s.get("db/port"), s.sources["db/port"]) == ("5432", "default")
    assert (s.get("db/dbname"), s.sources["db/dbname"]) == ("from_file", f"env file {env_file}")
    assert (s.get("flask/log_level"), s.sources["flask/log_level"]) == (
        "ERROR",
        f"ssm {PATH}/flask/log_level",
    )
    assert (s.get("etl/lookback_days"), s.sources["etl/lookback_days"]) == (
        "9",
        "environment WEBSTATS_ETL_LOOKBACK_DAYS",
    )
    assert s.ssm_path == PATH  # trailing slash normalized


def test_ssm_does_not_move_what_the_deploy_wired_for_this_host(clean_env, aws_env, monkeypatch):
    """The publish directory nginx serves (and the other host settings the deploy lists in
    WEBSTATS_HOST_SETTINGS) stays the env file's: an SSM parameter of the same name, shared by
    every instance of the environment, is reported and not applied."""
    env_file = clean_env / "webstats.env"
    env_file.write_text(
        f"WEBSTATS_SSM_PATH={PATH}\n"
        "WEBSTATS_WEB_PUBLISH_DIR=/var/lib/bioc-webstats-site\n"
        "WEBSTATS_GUNICORN_ERROR_LOG=/var/log/bioc-webstats/error.log\n"
        "WEBSTATS_HOST_SETTINGS=WEBSTATS_WEB_PUBLISH_DIR,WEBSTATS_GUNICORN_ERROR_LOG,"
        "WEBSTATS_WEB_CACHE_MAX_AGE\n"
    )
    monkeypatch.setenv("WEBSTATS_ENV_FILE", str(env_file))
    put_required()
    make_db_secret()
    put("web/publish_dir", "/srv/elsewhere")
    put("gunicorn/error_log", "/tmp/error.log")
    put("web/cache_max_age", "60")  # listed, but not in the file: the file wires nothing
    put("gunicorn/threads", "8")  # not a host setting

    s = load_settings()
    assert s.publish_dir == Path("/var/lib/bioc-webstats-site")
    assert s.sources["web/publish_dir"] == f"env file {env_file}"
    assert s.get("gunicorn/error_log") == "/var/log/bioc-webstats/error.log"
    assert (s.get("web/cache_max_age"), s.get("gunicorn/threads")) == ("60", "8")
    assert s.overruled == ["gunicorn/error_log", "web/publish_dir"]
    monkeypatch.setenv("WEBSTATS_WEB_PUBLISH_DIR", "/srv/by-hand")  # the environment still wins
    assert load_settings().publish_dir == Path("/srv/by-hand")
    monkeypatch.delenv("WEBSTATS_WEB_PUBLISH_DIR")

    line = (
        f"SSM parameter {PATH}/web/publish_dir: this host's value is the deploy's "
        "(WEBSTATS_WEB_PUBLISH_DIR in the env file)"
    )
    assert f"# ignored: {line}" in run_cli("config", "show").stdout.splitlines()
    res = run_cli("check")  # the web unit's start and the deploy's smoke test say it too
    assert f"bioc-webstats: warning: {line}" in res.stderr.splitlines(), res.stderr


def test_ssm_by_path_paginates_recurses_and_decrypts(clean_env, aws_env, monkeypatch):
    from bioc_webstats.aws import load_ssm_parameters

    put_required()
    known = {
        "db/dbname": "webstats_prod",
        "db/port": "6543",
        "gunicorn/bind_port": "127.0.0.1:8001",
        "etl/s3_download_logs": "s3://bioc-cloudfront-logs/cf",
        "etl/cloudfront_distribution": "E1TVLJONPTUXV3",
        "alerts/sns_topic": "arn:aws:sns:us-east-1:123456789012:webstats-alerts",
        "etl/lookback_days": "4",
    }
    for name, value in known.items():
        put(name, value)
    unknown = [f"legacy/deep/level{i}/p{i}" for i in range(8)]
    for name in unknown:
        put(name, f"v-{name}")
    put("other", "outside")  # /bioc/webstats/prod/other is under the path too: ignored
    boto3.client("ssm").put_parameter(
        Name="/bioc/webstats/prodx/db/server", Value="no", Type="String"
    )
    boto3.client("ssm").put_parameter(
        Name="/bioc/webstats/dev/db/server", Value="no", Type="String"
    )

    raw = load_ssm_parameters(PATH)
    assert len(raw) == 3 + len(known) + len(unknown) + 1  # more than one page of 10
    assert raw["flask/secret_key"] == SECRET_KEY  # SecureString decrypted
    assert raw["legacy/deep/level7/p7"] == "v-legacy/deep/level7/p7"

    monkeypatch.setenv("WEBSTATS_SSM_PATH", PATH)
    monkeypatch.setenv("WEBSTATS_DB_PASSWORD", DB_PASSWORD)  # no Secrets Manager in this test
    s = load_settings()
    for name, value in known.items():
        assert s.get(name) == value and s.sources[name] == f"ssm {PATH}/{name}"
    assert s.get("etl/ip_hash_key") == HASH_KEY
    assert s.get("db/server") == "db.example.internal"
    assert sorted(s.ignored) == sorted([*unknown, "other"])
    assert "level3" in render_settings(s) and "v-legacy" not in render_settings(s)


def test_ssm_paginator_reads_every_page(clean_env, aws_env):
    from bioc_webstats.aws import load_ssm_parameters

    for i in range(37):
        put(f"bulk/p{i:02d}", str(i))
    raw = load_ssm_parameters(PATH + "/bulk")
    assert raw == {f"p{i:02d}": str(i) for i in range(37)}


@pytest.mark.parametrize(
    "missing, message",
    [
        ("etl/ip_hash_key", f"missing SSM parameter {PATH}/etl/ip_hash_key"),
        ("db/server", f"missing SSM parameter {PATH}/db/server"),
    ],
)
def test_missing_required_parameter_is_one_line(clean_env, aws_env, monkeypatch, missing, message):
    put_required()
    boto3.client("ssm").delete_parameter(Name=f"{PATH}/{missing}")
    monkeypatch.setenv("WEBSTATS_SSM_PATH", PATH)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert str(exc.value) == message


def test_all_missing_named_and_environment_can_supply_one(clean_env, aws_env, monkeypatch):
    monkeypatch.setenv("WEBSTATS_SSM_PATH", PATH)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert str(exc.value) == (f"missing SSM parameters {PATH}/db/server, {PATH}/etl/ip_hash_key")
    # An explicit database URL replaces db/*; the environment may supply a secret.
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", "sqlite:///" + str(clean_env / "x.db"))
    with pytest.raises(ConfigError, match=f"^missing SSM parameter {PATH}/etl/ip_hash_key$"):
        load_settings()
    monkeypatch.setenv("WEBSTATS_IP_HASH_KEY", HASH_KEY)
    assert load_settings().get("etl/ip_hash_key") == HASH_KEY
    monkeypatch.setenv("WEBSTATS_SSM_REQUIRED", "flask/secret_key")
    with pytest.raises(ConfigError, match=f"^missing SSM parameter {PATH}/flask/secret_key$"):
        load_settings()
    # The required list is configurable.
    monkeypatch.setenv("WEBSTATS_SSM_REQUIRED", "etl/ip_hash_key")
    assert load_settings().get("etl/ip_hash_key") == HASH_KEY
    monkeypatch.setenv("WEBSTATS_SSM_REQUIRED", "etl/nope")
    with pytest.raises(ConfigError, match="unknown parameters: etl/nope"):
        load_settings()


def test_cli_missing_parameter_exit_1_one_line_no_secret(clean_env, aws_env, monkeypatch):
    put("flask/secret_key", SECRET_KEY, secure=True)
    put("db/server", "db.example.internal")
    monkeypatch.setenv("WEBSTATS_SSM_PATH", PATH)
    res = run_cli("config", "show")
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr == f"bioc-webstats: error: missing SSM parameter {PATH}/etl/ip_hash_key\n"
    assert SECRET_KEY not in res.stderr


def test_config_show_shows_a_value_the_commands_refuse_and_says_so(clean_env, monkeypatch):
    """config show listed `etl/lookback_days = abc` and exited 0, as if it were taken."""
    monkeypatch.setenv("WEBSTATS_ETL_LOOKBACK_DAYS", "abc")
    res = run_cli("config", "show")
    assert "etl/lookback_days = abc  (environment WEBSTATS_ETL_LOOKBACK_DAYS)" in res.stdout
    assert res.returncode == 1
    assert res.stderr == (
        "bioc-webstats: error: parameter etl/lookback_days must be an integer, got 'abc'\n"
    )
    monkeypatch.setenv("WEBSTATS_ETL_LOOKBACK_DAYS", "3")
    assert run_cli("config", "show").returncode == 0


@pytest.mark.parametrize(
    "name, value",
    [
        # an Expires past year 9999: every page and file was a 500, while check said ok
        ("WEBSTATS_WEB_CACHE_MAX_AGE", "253402300799"),
        ("WEBSTATS_GUNICORN_WORKERS", "100000"),  # a process each
        ("WEBSTATS_GUNICORN_THREADS", "100000"),
    ],
)
def test_check_refuses_web_settings_far_out_of_range(clean_env, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    res = run_cli("check")
    assert res.returncode == 1, res.stdout
    param = name.removeprefix("WEBSTATS_").lower().replace("_", "/", 1)
    assert (
        res.stderr
        == f"bioc-webstats: error: parameter {param} must be at most "
        + ("31536000" if "MAX_AGE" in name else "64" if "WORKERS" in name else "256")
        + f", got {value}\n"
    )


def test_check_refuses_an_alert_topic_that_is_no_arn(clean_env, monkeypatch):
    """A topic's name instead of its ARN: check said ok, and every alert (the failure hook's,
    the watchdog's) was refused when it was to be sent."""
    monkeypatch.setenv("WEBSTATS_ALERTS_SNS_TOPIC", "webstats-alerts")
    res = run_cli("check")
    assert res.returncode == 1, res.stdout
    assert res.stderr == (
        "bioc-webstats: error: parameter alerts/sns_topic must be an SNS topic ARN "
        "(arn:aws:sns:REGION:ACCOUNT:NAME), got 'webstats-alerts'\n"
    )
    arn = "arn:aws:sns:us-east-1:123456789012:webstats-alerts"
    monkeypatch.setenv("WEBSTATS_ALERTS_SNS_TOPIC", arn)
    assert load_settings().problems() == []
    monkeypatch.setenv("WEBSTATS_ALERTS_SNS_TOPIC", arn + "\n")  # ($ took a line end)
    assert len(load_settings().problems()) == 1


BIND_TEXT = "must be HOST:PORT (a port up to 65535), [IPv6]:PORT, unix:PATH or fd://N"


@pytest.mark.parametrize(
    "name, value, message",
    [  # each passed check (and the web's own), then the web failed: gunicorn's traceback
        ("WEBSTATS_FLASK_LOG_LEVEL", "LOUD", "must be one of DEBUG, INFO, WARNING, ERROR, "
         "CRITICAL, got 'LOUD'"),
        ("WEBSTATS_GUNICORN_BIND_PORT", "0.0.0.0:99999", f"{BIND_TEXT}, got '0.0.0.0:99999'"),
        ("WEBSTATS_GUNICORN_BIND_PORT", "fd://x", f"{BIND_TEXT}, got 'fd://x'"),
        ("WEBSTATS_GUNICORN_BIND_PORT", "::1:8000", f"{BIND_TEXT}, got '::1:8000'"),
        # a host named 8000 to gunicorn: it cannot bind it
        ("WEBSTATS_GUNICORN_BIND_PORT", "8000", f"{BIND_TEXT}, got '8000'"),
    ],
)  # fmt: skip
def test_check_refuses_what_the_web_cannot_start_with(clean_env, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    param = name.removeprefix("WEBSTATS_").lower().replace("_", "/", 1)
    for login in ("etl", "web"):
        res = run_cli("check", "--login", login)
        assert res.returncode == 1, res
        assert res.stderr == f"bioc-webstats: error: parameter {param} {message}\n"
    good_ones = ("127.0.0.1:8000", "[::1]:8000", "[::1]", "tcp://0.0.0.0:8000", "unix:/run/x")
    for good in (*good_ones, "fd://3", "localhost", ":8000"):
        monkeypatch.setenv("WEBSTATS_GUNICORN_BIND_PORT", good)
        assert load_settings().get_bind("gunicorn/bind_port") == good


def test_check_refuses_a_state_directory_that_is_a_file(clean_env, monkeypatch, tmp_path):
    """It passed check; the ETL then failed with 'cannot open the lock …/etl.lock: File exists'."""
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("WEBSTATS_STATE_DIR", str(tmp_path / "afile"))
    res = run_cli("check")
    assert res.returncode == 1 and res.stderr == (
        f"bioc-webstats: error: state directory {tmp_path / 'afile'}: not a directory\n"
    ), res


def test_a_bad_value_is_shown_cut_short(clean_env, monkeypatch):
    """A value of 100,000 characters (or a megabyte in the env file) was the whole error line."""
    monkeypatch.setenv("WEBSTATS_ETL_LOOKBACK_DAYS", "9" * 100_000)
    res = run_cli("check")
    assert res.returncode == 1 and len(res.stderr) < 200, len(res.stderr)
    assert res.stderr.startswith("bioc-webstats: error: parameter etl/lookback_days must be ")
    assert res.stderr.endswith("…999'\n")


def test_an_ipv6_database_server_is_given_to_libpq_bare(clean_env, monkeypatch):
    """``[::1]`` passed the check and libpq took it for a host name; ``::1`` was refused."""
    from sqlalchemy.engine import make_url

    monkeypatch.setenv("WEBSTATS_DB_PASSWORD", "pw")
    for server in ("[::1]", "::1", "fd00:ec2::254"):
        monkeypatch.setenv("WEBSTATS_DB_SERVER", server)
        url = make_url(load_settings().database_url)
        assert url.host == server.strip("[]"), url
    for server in ("10.0.0.5:5432", "db:5432", ":::", "[::1"):  # a port is db/port's
        monkeypatch.setenv("WEBSTATS_DB_SERVER", server)
        with pytest.raises(ConfigError, match="must be a host name or address"):
            load_settings()


def test_an_env_file_without_end_is_one_line(clean_env, monkeypatch):
    """/dev/zero (or any file far larger than an env file) is refused, not read into memory."""
    monkeypatch.setenv("WEBSTATS_ENV_FILE", "/dev/zero")
    res = run_cli("check")
    assert (res.returncode, res.stderr) == (
        1, "bioc-webstats: error: env file /dev/zero: larger than 1024 KiB\n"
    )  # fmt: skip


def test_unreachable_endpoint_is_one_line_naming_path(clean_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("WEBSTATS_SSM_PATH", PATH)
    res = run_cli("check")
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(
        f"bioc-webstats: error: cannot read SSM path {PATH}: EndpointConnectionError"
    )
    assert "Traceback" not in res.stderr


def test_no_credentials_is_one_line(clean_env, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance profile here
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("WEBSTATS_SSM_PATH", PATH)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert str(exc.value).startswith(f"cannot read SSM path {PATH}: NoCredentialsError")


def test_db_password_from_secrets_manager(clean_env, aws_env, monkeypatch):
    put_required("rds.example.internal")
    put("db/port", "5433")
    make_db_secret()
    monkeypatch.setenv("WEBSTATS_SSM_PATH", PATH)
    s = load_settings()
    from sqlalchemy.engine import make_url

    url = make_url(s.database_url)
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "runner_from_secret",
        DB_PASSWORD,
        "rds.example.internal",
        5433,
        "webstats",
    )
    assert s.sources["db/dbuser"] == "secret /bioc/rdb/0/login/webstats_runner"
    for secret in (DB_PASSWORD, SECRET_KEY, HASH_KEY):
        assert secret not in repr(s)
    from bioc_webstats.config import render_settings

    shown = render_settings(s)  # the user logged in as, not the default it replaced
    assert "db/dbuser = runner_from_secret  (secret /bioc/rdb/0/login/webstats_runner)" in shown


def test_db_secret_named_by_parameter(clean_env, aws_env, monkeypatch):
    put_required()
    put("db/credentials", "/bioc/rdb/1/login/other")
    make_db_secret("/bioc/rdb/1/login/other", json.dumps({"password": DB_PASSWORD}))
    monkeypatch.setenv("WEBSTATS_SSM_PATH", PATH)
    s = load_settings()
    from sqlalchemy.engine import make_url

    url = make_url(s.database_url)
    assert (url.username, url.password) == ("webstats_runner", DB_PASSWORD)  # user: db/dbuser


def test_missing_db_secret_is_one_line(clean_env, aws_env, monkeypatch):
    put_required()
    monkeypatch.setenv("WEBSTATS_SSM_PATH", PATH)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    msg = str(exc.value)
    assert msg.startswith(
        "cannot read database secret /bioc/rdb/0/login/webstats_runner (db/credentials): "
        "ResourceNotFoundException"
    )
    assert "\n" not in msg


@pytest.mark.parametrize(
    "body", [f"not json {DB_PASSWORD}", json.dumps(["x", DB_PASSWORD]), json.dumps({"pw": 1})]
)
def test_bad_db_secret_is_one_line_without_its_content(clean_env, aws_env, monkeypatch, body):
    put_required()
    make_db_secret(body=body)
    monkeypatch.setenv("WEBSTATS_SSM_PATH", PATH)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    msg = str(exc.value)
    assert msg == (
        "database secret /bioc/rdb/0/login/webstats_runner (db/credentials) must be a JSON "
        'object with a "password" string (and optionally "username")'
    )
    assert DB_PASSWORD not in msg


def test_a_nul_character_in_a_value_is_one_line(clean_env, aws_env, monkeypatch):
    """A NUL in the env file, an SSM value or the database secret: psycopg2 (and every path
    call) raised a bare ValueError: tracebacks in check and status, every page a 500. Now one
    line at the configuration's load, the value not shown."""
    env_file = clean_env / "nul.env"
    env_file.write_text(f"WEBSTATS_DB_SERVER=db\nWEBSTATS_DB_PASSWORD={DB_PASSWORD}\0x\n")
    monkeypatch.setenv("WEBSTATS_ENV_FILE", str(env_file))
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert str(exc.value) == f"{env_file}:2: holds a NUL character (the line is not shown)"
    monkeypatch.setenv("WEBSTATS_ENV_FILE", "/dev/null")
    monkeypatch.setenv("WEBSTATS_SSM_PATH", PATH)
    put_required()
    put("web/publish_dir", "/srv/site\0x")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert str(exc.value) == (
        f"parameter web/publish_dir (ssm {PATH}/web/publish_dir): holds a NUL character (not shown)"
    )
    put("web/publish_dir", "/srv/site")
    make_db_secret(body=json.dumps({"username": "u", "password": DB_PASSWORD + "\0"}))
    res = run_cli("status")
    assert res.returncode == 1 and res.stderr == (
        "bioc-webstats: error: database secret /bioc/rdb/0/login/webstats_runner "
        "(db/credentials): holds a NUL character\n"
    ), res


def test_a_value_with_a_line_break_is_shown_on_its_line(clean_env, monkeypatch):
    """A line break (or an escape sequence) in a value forged a line of `config show`
    (``db/password = …``) and of an error; each is written as its escape now."""
    monkeypatch.setenv("WEBSTATS_ALERTS_HEALTH_URL", "http://x/\ndb/password = hunter2")
    monkeypatch.setenv("WEBSTATS_ALERTS_CLOUDWATCH_NAMESPACE", "\x1b[2Jred\a")
    lines = run_cli("config", "show").stdout.splitlines()
    assert (
        "alerts/health_url = http://x/\\ndb/password = hunter2  (environment "
        "WEBSTATS_ALERTS_HEALTH_URL)" in lines
    )
    assert not [ln for ln in lines if ln.startswith("db/password = h")]
    assert (
        "alerts/cloudwatch_namespace = \\x1b[2Jred\\x07  (environment "
        "WEBSTATS_ALERTS_CLOUDWATCH_NAMESPACE)" in lines
    )
    monkeypatch.setenv("WEBSTATS_STATE_DIR", str(clean_env / "s\ndb/password = x"))
    lines = run_cli("config", "show").stdout.splitlines()
    assert not [ln for ln in lines if ln.startswith("db/password = x")], lines
    monkeypatch.setenv("WEBSTATS_STATE_DIR", str(clean_env / "state"))  # not the host's own
    res = run_cli("etl", "run", "--dry-run", "--source", "x\nERROR forged")
    assert res.returncode == 1 and res.stderr == (
        "bioc-webstats: error: log source x\\nERROR forged: not a directory nor an s3:// URL\n"
    )


def test_local_postgres_without_ssm_does_not_ask_secrets_manager(clean_env, monkeypatch):
    monkeypatch.setenv("WEBSTATS_DB_SERVER", "127.0.0.1")
    s = load_settings()  # no AWS configured at all: must not try Secrets Manager
    assert s.database_url == "postgresql+psycopg2://webstats_runner@127.0.0.1:5432/webstats"


def test_config_show_redacts_every_secret(clean_env, aws_env, monkeypatch):
    put_required()
    put("alerts/sns_topic", "arn:aws:sns:us-east-1:123456789012:alerts")
    put("secret/unknown_token", "unknown-Secret-0f0f", secure=True)
    make_db_secret()
    monkeypatch.setenv("WEBSTATS_SSM_PATH", PATH)
    res = run_cli("config", "show")
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    for secret in (SECRET_KEY, HASH_KEY, DB_PASSWORD, "unknown-Secret-0f0f"):
        assert secret not in out
    lines = res.stdout.splitlines()
    assert f"flask/secret_key = <redacted>  (ssm {PATH}/flask/secret_key)" in lines
    assert f"etl/ip_hash_key = <redacted>  (ssm {PATH}/etl/ip_hash_key)" in lines
    assert f"db/server = db.example.internal  (ssm {PATH}/db/server)" in lines
    assert "db/port = 5432  (default)" in lines
    assert (
        "database_url = postgresql+psycopg2://runner_from_secret:***@db.example.internal:5432/"
        "webstats  (db/* parameters + secret /bioc/rdb/0/login/webstats_runner)"
    ) in lines
    assert f"# ignored: unknown SSM parameter {PATH}/secret/unknown_token" in lines


def test_config_show_redacts_password_in_explicit_url(clean_env, monkeypatch):
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", f"postgresql://u:{DB_PASSWORD}@h/d")
    monkeypatch.setenv("WEBSTATS_FLASK_SECRET_KEY", SECRET_KEY)
    res = run_cli("config", "show")
    assert res.returncode == 0, res.stderr
    assert DB_PASSWORD not in res.stdout and SECRET_KEY not in res.stdout
    assert (
        "database_url = postgresql+psycopg2://u:***@h/d  (environment WEBSTATS_DATABASE_URL)"
        in (res.stdout.splitlines())
    )
    assert "flask/secret_key = <redacted>  (environment WEBSTATS_FLASK_SECRET_KEY)" in (
        res.stdout.splitlines()
    )


def _moto_auth(endpoint: str, count: str) -> None:
    """Switch moto's IAM enforcement: "0" checks every request from now on, "inf" none."""
    req = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(req, timeout=10).read()


def test_access_denied_is_one_line_naming_path_and_code(clean_env, aws_env, monkeypatch):
    iam = boto3.client("iam")
    iam.create_user(UserName="no-ssm")
    only_sns = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "sns:Publish", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="no-ssm", PolicyName="p", PolicyDocument=json.dumps(only_sns))
    key = iam.create_access_key(UserName="no-ssm")["AccessKey"]
    put_required()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.setenv("WEBSTATS_SSM_PATH", PATH)
    _moto_auth(aws_env, "0")
    try:
        res = run_cli("config", "show")
    finally:
        _moto_auth(aws_env, "inf")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == (
        f"bioc-webstats: error: cannot read SSM path {PATH}: AccessDenied: User: "
        "arn:aws:iam::123456789012:user/no-ssm is not authorized to perform: "
        "ssm:GetParametersByPath\n"
    )


def test_service_endpoint_variable_and_region_from_env_file(clean_env, aws_env, monkeypatch):
    # boto3's own AWS_ENDPOINT_URL_SSM wins over AWS_ENDPOINT_URL (dead here) for SSM, and a
    # region written in the env file (no AWS_DEFAULT_REGION in the unit's environment) is used.
    ssm = boto3.client("ssm", region_name="eu-west-1")
    for name, value in (("db/server", "h"), ("flask/secret_key", "s"), ("etl/ip_hash_key", "k")):
        ssm.put_parameter(Name=f"{PATH}/{name}", Value=value, Type="SecureString")
    env_file = clean_env / "webstats.env"
    env_file.write_text(f"WEBSTATS_SSM_PATH={PATH}\nAWS_REGION=eu-west-1\nWEBSTATS_DB_PASSWORD=x\n")
    monkeypatch.setenv("WEBSTATS_ENV_FILE", str(env_file))
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", aws_env)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    s = load_settings()
    assert s.aws_region == "eu-west-1"
    assert (s.get("db/server"), s.sources["db/server"]) == ("h", f"ssm {PATH}/db/server")


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://u:p%40ss@h:5432/d", "postgresql://u:***@h:5432/d"),
        (f"postgresql://u:{DB_PASSWORD}@h/d", "postgresql://u:***@h/d"),  # unescaped: malformed
        (
            "postgresql://u@h/d?password=pw&sslmode=require",
            "postgresql://u@h/d?password=***&sslmode=require",
        ),
        (
            "postgresql://u@h/d?sslmode=verify-full&sslpassword=KeyPass&sslkey=/k",
            "postgresql://u@h/d?sslmode=verify-full&sslpassword=***&sslkey=/k",
        ),
        ("postgresql://h/d", "postgresql://h/d"),
        (
            "sqlite:////var/lib/bioc-webstats/webstats.sqlite3",
            "sqlite:////var/lib/bioc-webstats/webstats.sqlite3",
        ),
        ("not a url p@ss", "<unparsable URL>"),
    ],
)
def test_redact_url(url, shown):
    from bioc_webstats.config import redact_url

    assert redact_url(url) == shown


def test_aws_settings_from_env_file_reach_boto3(clean_env, aws_env, monkeypatch):
    put_required()
    env_file = clean_env / "webstats.env"
    env_file.write_text(
        f"WEBSTATS_SSM_PATH={PATH}\nAWS_ENDPOINT_URL={aws_env}\nWEBSTATS_DB_PASSWORD=x\n"
    )
    monkeypatch.setenv("WEBSTATS_ENV_FILE", str(env_file))
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the env file says where AWS is
    monkeypatch.delenv("AWS_EC2_METADATA_V1_DISABLED", raising=False)
    before = dict(os.environ)
    s = load_settings()
    assert s.get("flask/secret_key") == SECRET_KEY
    assert dict(os.environ) == before  # handed to boto3, not written into the environment
    from bioc_webstats.aws import client

    ssm = client("ssm")
    assert ssm.meta.endpoint_url == aws_env
    # The process environment keeps precedence over the env file.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match="EndpointConnectionError"):
        load_settings()


def test_verbose_never_logs_secret_values(clean_env, aws_env, monkeypatch):
    put_required()
    make_db_secret()
    monkeypatch.setenv("WEBSTATS_SSM_PATH", PATH)
    res = run_cli("--verbose", "config", "show")
    assert res.returncode == 0, res.stderr
    for secret in (SECRET_KEY, HASH_KEY, DB_PASSWORD):
        assert secret not in res.stdout + res.stderr
