"""Configuration: built-in defaults → env file → SSM Parameter Store path → process environment.

Every setting has one parameter name under the SSM path (``topic/key``) and one environment
variable (``WEBSTATS_TOPIC_KEY``, plus the aliases fixed in interfaces.md). The env file holds the
same ``WEBSTATS_…=value`` lines as the environment.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, printable
from .files import is_text

DEFAULT_ENV_FILE = "/etc/bioc-webstats/webstats.env"
DEFAULT_STATE_DIR = "/var/lib/bioc-webstats"
# Where a login's user and password came from when the caller gave them (load_settings).
GIVEN_LOGIN = "standard input"


# An SNS topic's ARN; the group is its region (alerts publish there).
SNS_ARN = re.compile(r"^arn:aws[a-z-]*:sns:([a-z0-9-]+):[0-9]{12}:[A-Za-z0-9_-]{1,256}\Z")


def topic_region(topic: str) -> str:
    """The region of an SNS topic's ARN (``alerts/sns_topic``); else a ConfigError."""
    match = SNS_ARN.match(topic)
    if not match:
        raise ConfigError(
            "parameter alerts/sns_topic must be an SNS topic ARN "
            f"(arn:aws:sns:REGION:ACCOUNT:NAME), got {quoted(topic)}"
        )
    return match.group(1)


@dataclass(frozen=True)
class Param:
    """One setting: its SSM name, environment variable, default, whether it is secret, and
    what a value must be (checked where it is read, and all at once by ``bioc-webstats
    check``: :meth:`Settings.problems`)."""

    name: str  # SSM name under the path, e.g. "db/server"
    env: str  # environment / env-file variable
    default: str | None = None
    secret: bool = False
    # "int", "number" (of unit, 0 or more), "day" (YYYY-MM-DD), "level" (a logging level),
    # "bind" (gunicorn's: HOST:PORT, [IPv6]:PORT, unix:PATH, fd://N) or "topic" (an SNS ARN)
    kind: str = "text"
    minimum: int | None = None  # of an "int"
    maximum: int | None = None  # of an "int" or a "number"
    unit: str = ""  # of a "number"


PARAMS: tuple[Param, ...] = (
    Param("db/dbname", "WEBSTATS_DB_DBNAME", "webstats"),
    Param("db/dbuser", "WEBSTATS_DB_DBUSER", "webstats_runner"),
    Param("db/server", "WEBSTATS_DB_SERVER"),
    Param("db/port", "WEBSTATS_DB_PORT", "5432"),
    Param("db/credentials", "WEBSTATS_DB_CREDENTIALS", "/bioc/rdb/0/login/webstats_runner"),
    Param("db/password", "WEBSTATS_DB_PASSWORD", None, secret=True),
    # The other two logins of the original design (unset: the one above serves them too):
    # the schema owner, which runs the migrations, and the web's read-only login.
    Param("db/owner_dbuser", "WEBSTATS_DB_OWNER_DBUSER", None),
    Param("db/owner_credentials", "WEBSTATS_DB_OWNER_CREDENTIALS", None),
    Param("db/owner_password", "WEBSTATS_DB_OWNER_PASSWORD", None, secret=True),
    Param("db/web_dbuser", "WEBSTATS_DB_WEB_DBUSER", None),
    Param("db/web_credentials", "WEBSTATS_DB_WEB_CREDENTIALS", None),
    Param("db/web_password", "WEBSTATS_DB_WEB_PASSWORD", None, secret=True),
    # TLS of every database connection (libpq's sslmode and sslrootcert, for each login and
    # for pg_dump/pg_restore): verify-full against the database's CA in production, which the
    # deploy writes (webstats_base_db_ca_bundle); unset, libpq's default (prefer).
    Param("db/sslmode", "WEBSTATS_DB_SSLMODE", None),
    Param("db/sslrootcert", "WEBSTATS_DB_SSLROOTCERT", None),
    # Unused (the app keeps no sessions); known so that the original design's SSM parameter
    # is not reported as unknown.
    Param("flask/secret_key", "WEBSTATS_FLASK_SECRET_KEY", None, secret=True),
    Param("flask/log_level", "WEBSTATS_FLASK_LOG_LEVEL", "INFO", kind="level"),
    Param("gunicorn/bind_port", "WEBSTATS_GUNICORN_BIND_PORT", "0.0.0.0:8000", kind="bind"),
    Param(
        "gunicorn/access_log", "WEBSTATS_GUNICORN_ACCESS_LOG", "/var/log/bioc-webstats/access.log"
    ),
    Param("gunicorn/error_log", "WEBSTATS_GUNICORN_ERROR_LOG", "/var/log/bioc-webstats/error.log"),
    Param("etl/s3_download_logs", "WEBSTATS_LOG_SOURCE"),
    Param("etl/cloudfront_distribution", "WEBSTATS_ETL_CLOUDFRONT_DISTRIBUTION"),
    Param("etl/ip_hash_key", "WEBSTATS_IP_HASH_KEY", None, secret=True),
    Param("etl/packages_source", "WEBSTATS_ETL_PACKAGES_SOURCE", "https://bioconductor.org"),
    # At least 2: an object holds lines up to 48 h after its name's hour, and a run holds it
    # back until they are over (ingest.RunSummary.hold_after); the next run must still list it.
    Param(
        "etl/lookback_days", "WEBSTATS_ETL_LOOKBACK_DAYS", "3", kind="int", minimum=2, maximum=3660
    ),
    Param("etl/logs_since", "WEBSTATS_ETL_LOGS_SINCE", None, kind="day"),
    # Above a release's removals from devel (the shipped history: up to 109 at once, 3.13),
    # far below a lost PACKAGES file (thousands).
    Param("etl/sync_change_limit", "WEBSTATS_ETL_SYNC_CHANGE_LIMIT", "200", kind="int", minimum=0),
    # parse processes; default: CPUs, at most 4
    Param("etl/workers", "WEBSTATS_ETL_WORKERS", None, kind="int", minimum=1, maximum=64),
    Param("etl/athena_database", "WEBSTATS_ETL_ATHENA_DATABASE", "bioc_webstats"),
    Param("etl/athena_workgroup", "WEBSTATS_ETL_ATHENA_WORKGROUP", "primary"),
    Param("etl/athena_output", "WEBSTATS_ETL_ATHENA_OUTPUT"),  # s3://bucket/prefix/ for results
    # Upper bounds: a typo must fail check (the deploy's smoke test), not fork a thousand
    # workers or send an Expires past year 9999 (a 500 on every file). Workers' default: 2 x
    # CPUs + 1.
    Param("gunicorn/workers", "WEBSTATS_GUNICORN_WORKERS", None, kind="int", minimum=1, maximum=64),
    Param("gunicorn/threads", "WEBSTATS_GUNICORN_THREADS", "4", kind="int", minimum=1, maximum=256),
    Param(
        "web/cache_max_age",
        "WEBSTATS_WEB_CACHE_MAX_AGE",
        "3600",
        kind="int",
        minimum=0,
        maximum=31_536_000,  # a year: HTTP/1.1's (RFC 2616) longest Expires
    ),
    # Where the published pages and files are (nginx serves <publish_dir>/current);
    # default: <state_dir>/site.
    Param("web/publish_dir", "WEBSTATS_WEB_PUBLISH_DIR", None),
    Param("alerts/sns_topic", "WEBSTATS_ALERTS_SNS_TOPIC", kind="topic"),
    # The watchdog's limits (hours, hours, percent) and the URL it checks the web at.
    Param("alerts/max_data_age", "WEBSTATS_ALERTS_MAX_DATA_AGE", "36", kind="number", unit="hours"),
    Param("alerts/max_run_age", "WEBSTATS_ALERTS_MAX_RUN_AGE", "26", kind="number", unit="hours"),
    # (above 100 % every check would fail)
    Param(
        "alerts/min_free_disk",
        "WEBSTATS_ALERTS_MIN_FREE_DISK",
        "10",
        kind="number",
        unit="percent",
        maximum=100,
    ),
    Param("alerts/health_url", "WEBSTATS_ALERTS_HEALTH_URL", "http://127.0.0.1:8000/healthz"),
    Param("alerts/cloudwatch_namespace", "WEBSTATS_ALERTS_CLOUDWATCH_NAMESPACE"),
)

BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}


# Parameters without which a unit must not start once an SSM path is configured (the list can
# be replaced with WEBSTATS_SSM_REQUIRED="name,name"; db/server is not needed when
# WEBSTATS_DATABASE_URL is set).
DEFAULT_REQUIRED: tuple[str, ...] = ("db/server", "etl/ip_hash_key")
# Which database login a process uses: "etl" (the ETL and every other command: writes the
# data), "web" (gunicorn: reads only), "owner" (``db upgrade``: owns the schema).
LOGINS = ("etl", "web", "owner")
_LOGIN_PREFIX = {"etl": "db/", "web": "db/web_", "owner": "db/owner_"}
# The env file's list of the variables the deploy derived from the host's layout
# (roles/webstats_config: webstats_config_host_settings); an SSM parameter does not override
# them (Settings.overruled).
HOST_SETTINGS = "WEBSTATS_HOST_SETTINGS"


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
    # names under the SSM path whose value is a fact of this host (HOST_SETTINGS): not applied
    overruled: list[str] = field(default_factory=list)
    aws_region: str | None = None  # from the env file when boto3's own chain has none
    login: str = "etl"  # the database login of database_url (LOGINS)
    shared_login: bool = False  # no db/<login>_* of its own: the ETL's login (db/*) is used

    def get(self, name: str) -> str | None:
        """The value of a parameter by its SSM name (``db/server``)."""
        return self.values.get(name)

    def get_int(self, name: str) -> int:
        """An integer parameter within its bounds (:class:`Param`); a bad value is a
        ConfigError naming it."""
        minimum, maximum = BY_NAME[name].minimum, BY_NAME[name].maximum
        raw = self.values.get(name)
        try:
            value = int(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"parameter {name} must be an integer, got {quoted(raw)}") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"parameter {name} must be at least {minimum}, got {quoted(value)}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"parameter {name} must be at most {maximum}, got {quoted(value)}")
        return value

    def get_float(self, name: str) -> float:
        """A finite number of the parameter's unit, 0 or more (empty: its default); a bad
        value is a ConfigError naming it."""
        unit = BY_NAME[name].unit
        raw = self.values.get(name) or BY_NAME[name].default
        try:
            value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            value = math.nan
        top = BY_NAME[name].maximum
        if not (0 <= value < math.inf and (top is None or value <= top)):
            within = "" if top is None else f" from 0 to {top}"
            raise ConfigError(
                f"parameter {name} must be a number of {unit}{within}, got {quoted(raw)}"
            )
        return value

    def get_day(self, name: str) -> dt.date | None:
        """A day parameter (YYYY-MM-DD), None when unset; a bad value is a ConfigError."""
        value = self.values.get(name)
        if not value:
            return None
        try:
            return parse_day(value)
        except ValueError:
            raise ConfigError(f"parameter {name} must be {DAY_TEXT}, got {quoted(value)}") from None

    def get_level(self, name: str) -> str:
        """A logging level (upper-cased; empty: the default); else a ConfigError."""
        level = (self.values.get(name) or BY_NAME[name].default or "").upper()
        if level not in LOG_LEVELS:
            raise ConfigError(
                f"parameter {name} must be one of {', '.join(LOG_LEVELS)}, got {quoted(level)}"
            )
        return level

    def get_bind(self, name: str) -> str:
        """An address gunicorn can bind, as gunicorn parses it (checked here: gunicorn died on
        a port past 65535 with a traceback after check had said ok); else a ConfigError."""
        from gunicorn.util import parse_address

        value = self.values.get(name) or BY_NAME[name].default or ""
        try:
            address = parse_address(value, "8000")
        except (RuntimeError, ValueError):
            address = None
        if isinstance(address, tuple):
            host, port = address
            # ("8000": a host named 8000 to gunicorn, which cannot bind it)
            if not 0 <= port <= 65535 or str(host).isdigit():
                address = None
        if address is None:
            raise ConfigError(
                f"parameter {name} must be HOST:PORT (a port up to 65535), [IPv6]:PORT, "
                f"unix:PATH or fd://N, got {quoted(value)}"
            )
        return value

    def get_topic(self, name: str) -> str:
        """An SNS topic ARN (a name alone silenced every alert: each was refused, at the first
        failure, while check said ok); else a ConfigError."""
        value = self.values.get(name) or ""
        topic_region(value)
        return value

    def problems(self, topics: tuple[str, ...] = ()) -> list[str]:
        """What is wrong with the typed parameters' values (each as its getter says it), of
        the ``topics`` given (``("gunicorn/", "web/")``; none: all): ``bioc-webstats check``
        fails on them at the deploy, not the unit that reads one at 01:00."""
        found = []
        for p in PARAMS:
            if p.kind == "text" or (p.default is None and not self.values.get(p.name)):
                continue
            if topics and not p.name.startswith(topics):
                continue
            try:
                {
                    "int": self.get_int,
                    "number": self.get_float,
                    "day": self.get_day,
                    "level": self.get_level,
                    "bind": self.get_bind,
                    "topic": self.get_topic,
                }[p.kind](p.name)
            except ConfigError as exc:
                found.append(str(exc))
        return found

    @property
    def publish_dir(self) -> Path:
        """Where the published site is (``web/publish_dir``, else ``<state_dir>/site``);
        a relative one from the working directory (Flask's send_file would take it from the
        package's directory: a 500 for every page built on request)."""
        value = self.values.get("web/publish_dir")
        return Path(value).absolute() if value else self.state_dir / "site"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_QUOTED_MAX = 80  # characters of a bad value an error shows: a 1 MB one was the whole line


def quoted(value: object) -> str:
    """A bad value for an error line: its repr, cut to a few dozen characters."""
    text = repr(value)
    return text if len(text) <= _QUOTED_MAX else f"{text[: _QUOTED_MAX - 5]}…{text[-4:]}"


_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# A host name or an IPv4 address (what a database URL can carry; IPv6: _is_host).
_HOST = re.compile(r"[A-Za-z0-9._-]+")


def _is_host(server: str) -> bool:
    """A host name, an IPv4 address, or an IPv6 one bare or in brackets (db/server)."""
    if _HOST.fullmatch(server):
        return True
    bare = server[1:-1] if server.startswith("[") and server.endswith("]") else server
    try:
        ipaddress.IPv6Address(bare)
    except ValueError:
        return False
    return True


# The days any option or parameter may name: the statistics start in 2009; a day far outside
# (0001-01-01, 9999-12-31) would overflow the date arithmetic of the windows around it.
DAY_RANGE = (dt.date(1990, 1, 1), dt.date(2999, 12, 31))
DAY_TEXT = f"a date YYYY-MM-DD from {DAY_RANGE[0]} to {DAY_RANGE[1]}"


def parse_day(value: str) -> dt.date:
    """A day written YYYY-MM-DD within DAY_RANGE, else ValueError (``date.fromisoformat``
    alone also takes ``20240130`` and ``2024-W05-2``)."""
    if not _DAY.fullmatch(value):
        raise ValueError(value)
    day = dt.date.fromisoformat(value)
    if not DAY_RANGE[0] <= day <= DAY_RANGE[1]:
        raise ValueError(value)
    return day


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_ENV_FILE = 1024 * 1024  # a few dozen lines; /dev/zero must not take the memory


def read_env_file(path: Path) -> dict[str, str]:
    """Parse ``KEY=value`` lines (``#`` comments, optional quotes); errors name the line."""
    out: dict[str, str] = {}
    try:
        # (a FIFO or a pipe, <(…), is read as the shell would: SysOps may hand settings so)
        with path.open("rb") as fh:
            data = fh.read(MAX_ENV_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read env file {path}: {exc.strerror}") from None
    if len(data) > MAX_ENV_FILE:
        raise ConfigError(f"env file {path}: larger than {MAX_ENV_FILE >> 10} KiB")
    try:
        text = data.decode("utf-8-sig")  # an editor's BOM is no part of a name
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"cannot read env file {path}: line {line} is not UTF-8") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "\0" in line:  # no path, URL nor password holds one: the drivers raise on it
            raise ConfigError(f"{path}:{lineno}: holds a NUL character (the line is not shown)")
        key, sep, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        if not sep or not key:
            raise ConfigError(f"{path}:{lineno}: expected KEY=value")
        if not _ENV_NAME.fullmatch(key):  # it would be set and never read
            # Nothing of a value is shown: in "NAME: secret=…", "NAME secret=…" or a key
            # wrapped onto a line of its own, the first "=" is in the value. Only a name of
            # ours, and a first character that is no letter or digit (an invisible one).
            m = _ENV_NAME.match(key)
            n = m.end() if m else 0
            bad = key[n].encode("ascii", "backslashreplace").decode()
            if key[:n].startswith(("WEBSTATS", "AWS_")):
                what = f"'{key[:n]}' is followed by '{bad}': "
            elif n == 0 and not key[0].isalnum():
                what = f"a name begins with '{bad}': "
            else:
                what = ""
            raise ConfigError(
                f"{path}:{lineno}: {what}not NAME=value (the rest of the line is not shown)"
            )
        out[key] = _env_value(value)
    return out


def _env_value(raw: str) -> str:
    """A value as read_env_file gives it: stripped, and unquoted when a quote pair encloses
    it (``config write-web`` quotes what this would change)."""
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return value


def state_dir(env: dict[str, str]) -> Path:
    """Where the embedded database and caches live (systemd's StateDirectory when set); a
    relative one from the working directory."""
    return Path(
        env.get("WEBSTATS_STATE_DIR")
        or env.get("STATE_DIRECTORY", "").split(":")[0]
        or DEFAULT_STATE_DIR
    ).absolute()


def parse_login_secret(raw: str | None, where: str) -> tuple[str | None, str]:
    """(username, password) from a login's secret value ``{"username":…,"password":…}`` (the
    form Secrets Manager holds); ``where`` names it in the error, which never quotes it."""
    try:
        data = json.loads(raw) if raw is not None else None
    except ValueError:
        data = None  # the parser's message could quote the secret: say only what is wrong
    if not isinstance(data, dict) or not isinstance(data.get("password"), str):
        raise ConfigError(
            f"database secret {where} must be a JSON object "
            'with a "password" string (and optionally "username")'
        )
    user = data.get("username")
    if user is not None and not isinstance(user, str):
        raise ConfigError(f'database secret {where}: "username" not a string')
    if "\0" in data["password"] or "\0" in (user or ""):  # the driver raises on it
        raise ConfigError(f"database secret {where}: holds a NUL character")
    return user or None, data["password"]


def load_settings(
    environ: dict[str, str] | None = None,
    login: str = "etl",
    login_secret: tuple[str | None, str] | None = None,
) -> Settings:
    """Build the effective configuration in precedence order (lowest first).

    Defaults → env file → SSM path (``WEBSTATS_SSM_PATH``) → process environment. With an SSM
    path, a required parameter that no level provides is a ConfigError naming it. The
    database URL is the one of ``login`` (see LOGINS); ``login_secret`` (its user and
    password, given by the caller: the deploy's, read on the controller) replaces whatever
    the configuration says they are, and no secret of that login is read.
    """
    if login not in LOGINS:
        raise ValueError(f"login must be one of {LOGINS}")
    env = dict(os.environ if environ is None else environ)
    for name, value in env.items():
        # Python keeps bytes that are not UTF-8 as surrogates: every later use of the value
        # (a URL, a hash key) was a traceback. The env file is checked as it is read.
        if name.startswith("WEBSTATS_") and not is_text(value):
            raise ConfigError(f"environment {name}: not UTF-8 (the value is not shown)")
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
        from .aws import use_env_file

        use_env_file(file_vars)
    region = merged.get("AWS_REGION") or merged.get("AWS_DEFAULT_REGION") or None
    ssm_path = merged.get("WEBSTATS_SSM_PATH") or None
    ignored: list[str] = []
    overruled: list[str] = []
    # What the deploy wrote as this host's layout (the publish directory nginx serves, the
    # socket, the log files): SSM, shared by every instance of an environment, cannot move it.
    host_fixed = {n.strip() for n in file_vars.get(HOST_SETTINGS, "").split(",")} & set(file_vars)
    if ssm_path:
        from .aws import load_ssm_parameters, normalize_path  # boto3 only when SSM is used

        ssm_path = normalize_path(ssm_path)
        for name, value in sorted(load_ssm_parameters(ssm_path, region).items()):
            if name not in BY_NAME:
                ignored.append(name)
            elif BY_NAME[name].env in host_fixed:
                overruled.append(name)
            elif "\0" in value:  # (the env file refuses its own; the environment cannot hold one)
                raise ConfigError(
                    f"parameter {name} (ssm {ssm_path}/{name}): holds a NUL character (not shown)"
                )
            else:
                values[name], sources[name] = value, f"ssm {ssm_path}/{name}"

    for p in PARAMS:
        if p.env in env:
            values[p.name], sources[p.name] = env[p.env], f"environment {p.env}"
    if login_secret is not None:
        prefix = _LOGIN_PREFIX[login]
        for key, value in (("dbuser", login_secret[0]), ("password", login_secret[1])):
            if value is not None:
                values[prefix + key], sources[prefix + key] = value, GIVEN_LOGIN

    url_var = "WEBSTATS_DATABASE_URL" + ("" if login == "etl" else f"_{login.upper()}")
    if not merged.get(url_var):
        url_var = "WEBSTATS_DATABASE_URL"
    db_url = merged.get(url_var)
    if ssm_path:
        _check_required(ssm_path, values, merged, has_db_url=bool(db_url))

    sdir = state_dir(merged)
    shared = False
    tls = tls_query(values)
    if db_url:
        sources["database_url"] = (
            f"environment {url_var}" if url_var in env else f"env file {env_file}"
        )
        db_url = normalize_database_url(db_url, url_var)
        if login_secret is not None and not db_url.startswith("sqlite"):
            from sqlalchemy.engine import make_url

            given = make_url(db_url)
            db_url = given.set(
                username=login_secret[0] or given.username, password=login_secret[1]
            ).render_as_string(hide_password=False)
            sources["database_url"] += f" + {GIVEN_LOGIN}"
        if tls and not db_url.startswith("sqlite"):
            from sqlalchemy.engine import make_url

            url = make_url(db_url)
            if "sslmode" not in url.query:  # the URL's own sslmode is the more specific
                db_url = url.update_query_dict(tls).render_as_string(hide_password=False)
        # the web's file, rewritten on a rotation (a login given by the caller is not in it)
        if url_var not in env and env_file and login_secret is None:
            _watch_file_password(db_url, Path(env_file), url_var)
    elif values.get("db/server"):
        db_url = _login_url(values, sources, login, region, bool(ssm_path), tls)
        shared = login != "etl" and not _own_login(values, login)
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
        overruled=overruled,
        aws_region=region,
        login=login,
        shared_login=shared,
    )


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


# libpq's sslmode values (https://www.postgresql.org/docs/current/libpq-ssl.html).
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def tls_query(values: dict[str, str | None]) -> dict[str, str]:
    """The libpq connection parameters of db/sslmode and db/sslrootcert (none when sslmode is
    unset); a bad value is a ConfigError naming it."""
    mode, root = values.get("db/sslmode") or "", values.get("db/sslrootcert") or ""
    if not mode:
        return {}
    if mode not in SSL_MODES:
        raise ConfigError(
            f"parameter db/sslmode must be one of {', '.join(SSL_MODES)}, got {quoted(mode)}"
        )
    if mode.startswith("verify-") and not root:
        raise ConfigError(f"parameter db/sslmode is {mode}: db/sslrootcert must name the CA file")
    if root and root != "system" and not Path(root).is_absolute():  # system: the OS's CAs
        raise ConfigError(
            f"parameter db/sslrootcert must be an absolute path or 'system', got {quoted(root)}"
        )
    return {"sslmode": mode, **({"sslrootcert": root} if root else {})}


def _own_login(values: dict[str, str | None], login: str) -> bool:
    """Whether ``login`` has a user, secret or password of its own (db/web_*, db/owner_*)."""
    prefix = _LOGIN_PREFIX[login]
    return any(values.get(f"{prefix}{k}") for k in ("dbuser", "credentials", "password"))


def _login_url(
    values: dict[str, str | None],
    sources: dict[str, str],
    login: str,
    region: str | None,
    ssm: bool,
    tls: dict[str, str],
) -> str:
    """The PostgreSQL URL of ``login`` from the db/* parameters: its own user, password or
    secret when configured, else the ETL login's. The password comes from Secrets Manager
    when SSM is in use or the login's credentials parameter was set explicitly; otherwise
    (local demo) from its password parameter, or libpq's own means (trust, .pgpass)."""
    prefix = _LOGIN_PREFIX[login] if _own_login(values, login) else "db/"
    cred_name, pw_name, user_name = f"{prefix}credentials", f"{prefix}password", f"{prefix}dbuser"
    secret_id = values.get(cred_name)
    use_secret = values.get(pw_name) is None and bool(
        secret_id and (ssm or sources[cred_name] != "default")
    )
    user, password = values.get(user_name) or values.get("db/dbuser"), values.get(pw_name)
    if use_secret:
        from .aws import read_db_secret

        secret_user, password = read_db_secret(secret_id, region, cred_name)  # type: ignore[arg-type]
        if secret_user:  # the user logged in as: what `config show` says too
            user, sources[user_name] = secret_user, f"secret {secret_id}"
            values[user_name] = secret_user
    try:
        port = int(values.get("db/port") or 5432)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"parameter db/port must be a port number, got {quoted(values['db/port'])}"
        ) from None
    server = values["db/server"] or ""
    if not _is_host(server):  # '/', '?', '@' would change what the URL means
        raise ConfigError(
            f"parameter db/server must be a host name or address, got {quoted(server)}"
        )
    from sqlalchemy.engine import URL

    url = URL.create(
        "postgresql+psycopg2",
        username=user,
        password=password,
        host=server.strip("[]"),  # libpq takes an IPv6 address bare ([::1] is a name to it)
        port=port,
        database=values["db/dbname"],
        query=tls,
    ).render_as_string(hide_password=False)
    sources["database_url"] = f"{prefix}* parameters" + (
        f" + secret {secret_id}" if use_secret else ""
    )
    if use_secret:  # a rotated secret is picked up by new connections (store/db.py)
        PASSWORD_SOURCES[url] = SecretPassword(secret_id, region, cred_name)  # type: ignore[arg-type]
    return url


class SecretPassword:
    """The current (user, password) of a Secrets Manager secret: read again after
    ``TTL`` seconds, or at once after a failed login (the password was rotated)."""

    TTL = 300.0

    def __init__(self, secret_id: str, region: str | None, param: str) -> None:
        self.secret_id, self.region, self.param = secret_id, region, param
        self._value: tuple[str | None, str] | None = None
        self._read_at = 0.0

    def get(self, refresh: bool = False) -> tuple[str | None, str]:
        if refresh or self._value is None or time.monotonic() - self._read_at > self.TTL:
            from .aws import read_db_secret

            self._value = read_db_secret(self.secret_id, self.region, self.param)
            self._read_at = time.monotonic()
        return self._value


class FilePassword:
    """The current (user, password) of the database URL an env file holds: read again after
    ``TTL`` seconds or a failed login. The web's file (``config write-web``) is rewritten when
    the login's secret changes, and the web, which cannot read the secret, follows it."""

    TTL = 300.0

    def __init__(self, path: Path, var: str, value: tuple[str | None, str]) -> None:
        self.path, self.var = path, var
        self._value = value
        self._read_at = time.monotonic()

    def get(self, refresh: bool = False) -> tuple[str | None, str]:
        if refresh or time.monotonic() - self._read_at > self.TTL:
            self._read_at = time.monotonic()
            try:
                url = _password_url(read_env_file(self.path).get(self.var) or "", self.var)
            except ConfigError:  # being rewritten, or gone: the last value stays
                url = None
            if url is not None and url.password:
                self._value = (url.username, str(url.password))
        return self._value


def _password_url(url: str, var: str):
    """The SQLAlchemy URL of a PostgreSQL ``url`` (None for another database)."""
    if not url or url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    return make_url(normalize_database_url(url, var))


def _watch_file_password(db_url: str, path: Path, var: str) -> None:
    url = _password_url(db_url, var)
    if url is not None and url.password:
        PASSWORD_SOURCES[db_url] = FilePassword(path, var, (url.username, str(url.password)))


# Database URL → where its password comes from now (filled by load_settings; read by
# store/db.py whenever it opens a connection).
PASSWORD_SOURCES: dict[str, SecretPassword | FilePassword] = {}

_DRIVERS = {"postgresql": "postgresql+psycopg2", "postgres": "postgresql+psycopg2",
            "postgresql+psycopg2": "postgresql+psycopg2", "sqlite": "sqlite"}  # fmt: skip


def normalize_database_url(url: str, name: str = "WEBSTATS_DATABASE_URL") -> str:
    """A database URL the package can use: ``postgresql://`` (and ``postgres://``) mean
    psycopg2, the driver it ships; a password holding ``@``, ``:`` or ``/`` unescaped is
    taken up to the last ``@``. Anything else wrong is one ConfigError line that never
    shows the password."""
    from urllib.parse import quote, unquote

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    scheme, sep, rest = url.strip().partition("://")
    driver = _DRIVERS.get(scheme.lower())
    shown = redact_url(url)
    if not sep or driver is None:
        raise ConfigError(
            f"{name} must be postgresql://user:password@host:port/dbname or "
            f"sqlite:///path, got {shown}"
        )
    if driver != "sqlite":
        at = rest.rfind("@")
        if at >= 0:
            user, colon, password = rest[:at].partition(":")
            userinfo = quote(unquote(user), safe="")
            if colon:
                userinfo += ":" + quote(unquote(password), safe="")
            rest = f"{userinfo}@{rest[at + 1 :]}"
    fixed = f"{driver}://{rest}"
    try:
        parsed = make_url(fixed)
        port = parsed.port
    except (ArgumentError, ValueError):
        raise ConfigError(
            f"{name} is not a valid database URL ({shown}): check the host, port and path"
        ) from None
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"{name} has an invalid port {port} ({shown})")
    if driver == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(
            f"{name} is an in-memory SQLite database ({shown}), which keeps nothing: "
            "give a file, sqlite:///path"
        )
    return fixed


# libpq's query parameters that hold a secret: the password, and the client key's passphrase
_URL_PASSWORD_QUERY = re.compile(r"(?i)([?&](?:password|sslpassword)=)[^&]*")


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
    lines.extend(f"# ignored: {line}" for line in overruled_lines(settings))
    return "\n".join(printable(line) for line in lines) + "\n"


# The web's own env file: what the web reads, and nothing it must not (the other logins'
# secrets, the IP hash key, the SSM path: the web unit has no way to the instance role).
WEB_ENV_HEADER = (
    "# Written by `bioc-webstats config write-web` (bioc-webstats-web-config.service) from the\n"
    "# configuration and SSM: the web service's settings and its own database login only.\n"
)


WEB_TOPICS = ("flask/", "gunicorn/", "web/", "alerts/")  # what the web reads (db/*: the URL)


def web_env_text(settings: Settings) -> str:
    """The env file of the web service: the non-secret settings of WEB_TOPICS (the typed ones
    checked) and the web login's database URL; a ConfigError names what cannot be written."""
    problems = settings.problems(WEB_TOPICS)
    if problems:
        raise ConfigError("; ".join(problems))
    lines = [WEB_ENV_HEADER]
    items = [
        (p.env, settings.values.get(p.name), p.name)
        for p in PARAMS
        if p.name.startswith(WEB_TOPICS) and not p.secret
    ]
    items.append(("WEBSTATS_DATABASE_URL_WEB", settings.database_url, "database_url"))
    for env, value, name in items:
        if value is None:
            continue
        # read back by read_env_file: its lines are str.splitlines()'s (U+2028, \v, \f …
        # break one too), each value as _env_value gives it
        if len(f"x{value}x".splitlines()) != 1:
            raise ConfigError(f"parameter {name}: a value cannot hold a line break")
        if _env_value(value) != value:  # quoted: read back as it is
            value = f'"{value}"'
        lines.append(f"{env}={value}\n")
    return "".join(lines)


def overruled_lines(settings: Settings) -> list[str]:
    """One line per SSM parameter not applied because the deploy set it for this host."""
    return [
        f"SSM parameter {settings.ssm_path}/{name}: this host's value is the deploy's "
        f"({BY_NAME[name].env} in the env file)"
        for name in settings.overruled
    ]
