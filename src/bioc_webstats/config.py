"""Configuration: built-in defaults → env file → SSM Parameter Store path → process environment.

Every setting has one parameter name under the SSM path (``topic/key``) and one environment
variable (``WEBSTATS_TOPIC_KEY``, plus the aliases fixed in interfaces.md). The env file holds the
same ``WEBSTATS_…=value`` lines as the environment.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

DEFAULT_ENV_FILE = "/etc/bioc-webstats/webstats.env"
DEFAULT_STATE_DIR = "/var/lib/bioc-webstats"


@dataclass(frozen=True)
class Param:
    """One setting: its SSM name, environment variable, default, and whether it is secret."""

    name: str  # SSM name under the path, e.g. "db/server"
    env: str  # environment / env-file variable
    default: str | None = None
    secret: bool = False


PARAMS: tuple[Param, ...] = (
    Param("db/dbname", "WEBSTATS_DB_DBNAME", "webstats"),
    Param("db/dbuser", "WEBSTATS_DB_DBUSER", "webstats_runner"),
    Param("db/server", "WEBSTATS_DB_SERVER"),
    Param("db/port", "WEBSTATS_DB_PORT", "5432"),
    Param("db/credentials", "WEBSTATS_DB_CREDENTIALS", "/bioc/rdb/0/login/webstats_runner"),
    Param("db/password", "WEBSTATS_DB_PASSWORD", None, secret=True),
    # Unused (the app keeps no sessions); known so that the original design's SSM parameter
    # is not reported as unknown.
    Param("flask/secret_key", "WEBSTATS_FLASK_SECRET_KEY", None, secret=True),
    Param("flask/log_level", "WEBSTATS_FLASK_LOG_LEVEL", "INFO"),
    Param("gunicorn/bind_port", "WEBSTATS_GUNICORN_BIND_PORT", "0.0.0.0:8000"),
    Param(
        "gunicorn/access_log", "WEBSTATS_GUNICORN_ACCESS_LOG", "/var/log/bioc-webstats/access.log"
    ),
    Param("gunicorn/error_log", "WEBSTATS_GUNICORN_ERROR_LOG", "/var/log/bioc-webstats/error.log"),
    Param("etl/s3_download_logs", "WEBSTATS_LOG_SOURCE"),
    Param("etl/cloudfront_distribution", "WEBSTATS_ETL_CLOUDFRONT_DISTRIBUTION"),
    Param("etl/ip_hash_key", "WEBSTATS_IP_HASH_KEY", None, secret=True),
    Param("etl/packages_source", "WEBSTATS_ETL_PACKAGES_SOURCE", "https://bioconductor.org"),
    Param("etl/lookback_days", "WEBSTATS_ETL_LOOKBACK_DAYS", "3"),
    Param("etl/logs_since", "WEBSTATS_ETL_LOGS_SINCE", None),
    Param("etl/sync_change_limit", "WEBSTATS_ETL_SYNC_CHANGE_LIMIT", "50"),
    Param("etl/workers", "WEBSTATS_ETL_WORKERS", None),  # parse processes; default: CPUs, max 4
    Param("etl/athena_database", "WEBSTATS_ETL_ATHENA_DATABASE", "bioc_webstats"),
    Param("etl/athena_workgroup", "WEBSTATS_ETL_ATHENA_WORKGROUP", "primary"),
    Param("etl/athena_output", "WEBSTATS_ETL_ATHENA_OUTPUT"),  # s3://bucket/prefix/ for results
    Param("gunicorn/workers", "WEBSTATS_GUNICORN_WORKERS", None),  # default: 2 x CPUs + 1
    Param("gunicorn/threads", "WEBSTATS_GUNICORN_THREADS", "4"),
    Param("web/cache_max_age", "WEBSTATS_WEB_CACHE_MAX_AGE", "3600"),
    # Where the published pages and files are (nginx serves <publish_dir>/current);
    # default: <state_dir>/site.
    Param("web/publish_dir", "WEBSTATS_WEB_PUBLISH_DIR", None),
    Param("alerts/sns_topic", "WEBSTATS_ALERTS_SNS_TOPIC"),
)

BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}


# Parameters without which a unit must not start once an SSM path is configured (the list can
# be replaced with WEBSTATS_SSM_REQUIRED="name,name"; db/server is not needed when
# WEBSTATS_DATABASE_URL is set).
DEFAULT_REQUIRED: tuple[str, ...] = ("db/server", "etl/ip_hash_key")


@dataclass
class Settings:
    """The effective configuration: values by parameter name and where each came from.

    ``repr`` leaves out values and the database URL so that secrets never reach a log line.
    """

    values: dict[str, str | None] = field(repr=False)
    sources: dict[str, str]
    database_url: str = field(repr=False)
    state_dir: Path
    ssm_path: str | None = None
    extra: dict[str, str] = field(default_factory=dict, repr=False)
    ignored: list[str] = field(default_factory=list)  # names under the SSM path we do not know
    aws_region: str | None = None  # from the env file when boto3's own chain has none

    def get(self, name: str) -> str | None:
        """The value of a parameter by its SSM name (``db/server``)."""
        return self.values.get(name)

    def get_int(self, name: str, minimum: int | None = None) -> int:
        """An integer parameter; a bad value is a ConfigError naming it."""
        raw = self.values.get(name)
        try:
            value = int(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"parameter {name} must be an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"parameter {name} must be at least {minimum}, got {value}")
        return value

    @property
    def publish_dir(self) -> Path:
        """Where the published site is (``web/publish_dir``, else ``<state_dir>/site``)."""
        value = self.values.get("web/publish_dir")
        return Path(value) if value else self.state_dir / "site"


def read_env_file(path: Path) -> dict[str, str]:
    """Parse ``KEY=value`` lines (``#`` comments, optional quotes); errors name the line."""
    out: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read env file {path}: {exc.strerror}") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        if not sep or not key:
            raise ConfigError(f"{path}:{lineno}: expected KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key] = value
    return out


def state_dir(env: dict[str, str]) -> Path:
    """Where the embedded database and caches live (systemd's StateDirectory when set)."""
    return Path(
        env.get("WEBSTATS_STATE_DIR")
        or env.get("STATE_DIRECTORY", "").split(":")[0]
        or DEFAULT_STATE_DIR
    )


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Build the effective configuration in precedence order (lowest first).

    Defaults → env file → SSM path (``WEBSTATS_SSM_PATH``) → process environment. With an SSM
    path, a required parameter that no level provides is a ConfigError naming it.
    """
    env = dict(os.environ if environ is None else environ)
    values: dict[str, str | None] = {p.name: p.default for p in PARAMS}
    sources: dict[str, str] = {p.name: "default" for p in PARAMS}

    env_file = env.get("WEBSTATS_ENV_FILE")
    file_vars: dict[str, str] = {}
    if env_file:
        file_vars = read_env_file(Path(env_file))
    elif Path(DEFAULT_ENV_FILE).is_file():
        env_file = DEFAULT_ENV_FILE
        file_vars = read_env_file(Path(env_file))
    for p in PARAMS:
        if p.env in file_vars:
            values[p.name], sources[p.name] = file_vars[p.env], f"env file {env_file}"

    # Settings outside PARAMS that may come from the env file too.
    merged = {**file_vars, **env}
    if environ is None:
        _export_aws_settings(file_vars)
    region = merged.get("AWS_REGION") or merged.get("AWS_DEFAULT_REGION") or None
    ssm_path = merged.get("WEBSTATS_SSM_PATH") or None
    ignored: list[str] = []
    if ssm_path:
        from .aws import load_ssm_parameters, normalize_path  # boto3 only when SSM is used

        ssm_path = normalize_path(ssm_path)
        for name, value in sorted(load_ssm_parameters(ssm_path, region).items()):
            if name in BY_NAME:
                values[name], sources[name] = value, f"ssm {ssm_path}/{name}"
            else:
                ignored.append(name)

    for p in PARAMS:
        if p.env in env:
            values[p.name], sources[p.name] = env[p.env], f"environment {p.env}"

    db_url = merged.get("WEBSTATS_DATABASE_URL")
    if ssm_path:
        _check_required(ssm_path, values, merged, has_db_url=bool(db_url))

    sdir = state_dir(merged)
    if db_url:
        in_env = "WEBSTATS_DATABASE_URL" in env
        sources["database_url"] = (
            "environment WEBSTATS_DATABASE_URL" if in_env else f"env file {env_file}"
        )
    elif values.get("db/server"):
        # The password comes from Secrets Manager when SSM is in use or db/credentials was
        # set explicitly; otherwise (local demo) libpq's own means apply (trust, .pgpass).
        use_secret = values.get("db/password") is None and bool(
            values.get("db/credentials") and (ssm_path or sources["db/credentials"] != "default")
        )
        db_url = _postgres_url(values, sources, region if use_secret else None, use_secret)
        sources["database_url"] = "db/* parameters" + (
            f" + secret {values['db/credentials']}" if use_secret else ""
        )
    else:
        db_url = f"sqlite:///{sdir / 'webstats.sqlite3'}"
        sources["database_url"] = "default (embedded SQLite)"
    return Settings(
        values=values,
        sources=sources,
        database_url=db_url,
        state_dir=sdir,
        ssm_path=ssm_path,
        ignored=ignored,
        aws_region=region,
    )


def _export_aws_settings(file_vars: dict[str, str]) -> None:
    """Hand the env file's ``AWS_*`` lines (region, endpoints) to boto3, which reads only the
    process environment; the process environment keeps precedence. The instance metadata is
    read with IMDSv2 only (no fallback to v1) unless configured otherwise."""
    for key, value in file_vars.items():
        if key.startswith("AWS_"):
            os.environ.setdefault(key, value)
    os.environ.setdefault("AWS_EC2_METADATA_V1_DISABLED", "true")


def required_parameters(merged_env: dict[str, str], has_db_url: bool) -> list[str]:
    """The parameters that must have a value when an SSM path is configured."""
    raw = merged_env.get("WEBSTATS_SSM_REQUIRED")
    if raw is None:
        names = list(DEFAULT_REQUIRED)
    else:
        names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ConfigError(f"WEBSTATS_SSM_REQUIRED names unknown parameters: {', '.join(unknown)}")
    if has_db_url:  # an explicit database URL replaces the db/* parameters
        names = [n for n in names if not n.startswith("db/")]
    return names


def _check_required(
    ssm_path: str, values: dict[str, str | None], merged_env: dict[str, str], has_db_url: bool
) -> None:
    missing = [
        f"{ssm_path}/{n}" for n in required_parameters(merged_env, has_db_url) if not values.get(n)
    ]
    if len(missing) == 1:
        raise ConfigError(f"missing SSM parameter {missing[0]}")
    if missing:
        raise ConfigError(f"missing SSM parameters {', '.join(missing)}")


def _postgres_url(
    values: dict[str, str | None], sources: dict[str, str], region: str | None, use_secret: bool
) -> str:
    from sqlalchemy.engine import URL

    password = values.get("db/password")
    if use_secret:
        from .aws import read_db_secret

        secret_id = values["db/credentials"]
        user, password = read_db_secret(secret_id, region)  # type: ignore[arg-type]
        if user:
            values["db/dbuser"], sources["db/dbuser"] = user, f"secret {secret_id}"
    try:
        port = int(values.get("db/port") or 5432)
    except ValueError:
        raise ConfigError(
            f"parameter db/port must be an integer, got {values['db/port']!r}"
        ) from None
    url = URL.create(
        "postgresql+psycopg2",
        username=values["db/dbuser"],
        password=password,
        host=values["db/server"],
        port=port,
        database=values["db/dbname"],
    )
    return url.render_as_string(hide_password=False)


_URL_PASSWORD_QUERY = re.compile(r"(?i)([?&]password=)[^&]*")


def redact_url(url: str) -> str:
    """A database URL with its password replaced by ``***``.

    Done on the text, not with a URL parser: a password typed without escaping (``p@ss/w:d``)
    makes the URL malformed, and a parser would then show part of it as the host.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<unparsable URL>"
    at = rest.rfind("@")  # the last one: a host never holds "@", a raw password may
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        rest = f"{user}{':***' if colon else ''}@{rest[at + 1 :]}"
    return _URL_PASSWORD_QUERY.sub(r"\1***", f"{scheme}://{rest}")


def render_settings(settings: Settings) -> str:
    """Text for ``config show``: one ``name = value  (source)`` line each, secrets redacted."""
    lines = []
    shown_url = redact_url(settings.database_url)
    lines.append(f"database_url = {shown_url}  ({settings.sources.get('database_url')})")
    lines.append(f"state_dir = {settings.state_dir}")
    lines.append(f"ssm_path = {settings.ssm_path or '-'}")
    for p in PARAMS:
        value = settings.values.get(p.name)
        shown = "-" if value is None else ("<redacted>" if p.secret else value)
        lines.append(f"{p.name} = {shown}  ({settings.sources.get(p.name)})")
    for name in settings.ignored:  # names only: an unknown parameter may well be a secret
        lines.append(f"# ignored: unknown SSM parameter {settings.ssm_path}/{name}")
    return "\n".join(lines) + "\n"
