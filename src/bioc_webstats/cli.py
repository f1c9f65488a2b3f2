"""``bioc-webstats …``: the one door into the app for systemd units, playbooks and SysOps.

Exit status: 0 success, 1 the work failed (one line on stderr), 2 bad usage, 3 (``check``)
the schema is missing or behind (``db upgrade`` is the fix).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import stat
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from . import __version__
from .config import Settings, load_settings, overruled_lines, parse_login_secret
from .errors import WebstatsError, first_line, printable
from .files import shown
from .proc import keep_memory_private
from .store import db, grants

log = logging.getLogger("bioc_webstats")


class Context:
    """Settings are loaded lazily so that ``--help`` works without any configuration."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self._settings: Settings | None = None
        # --owner-secret-stdin: the owner's login is read from standard input when needed
        self.owner_from_stdin = False
        self._owner_secret: tuple[str | None, str] | None = None

    @property
    def settings(self) -> Settings:
        """The configuration with the ETL's database login (every command but three)."""
        return self.settings_for("etl")

    def settings_for(self, login: str) -> Settings:
        if self._settings is None or self._settings.login != login:
            given = None
            if login == "owner" and self.owner_from_stdin:
                if self._owner_secret is None:
                    self._owner_secret = _read_owner_secret()
                given = self._owner_secret
            self._settings = load_settings(login=login, login_secret=given)
        return self._settings


# A secret is a few hundred bytes; more is not one (and is not read into memory).
SECRET_MAX_BYTES = 64 * 1024


def _read_owner_secret() -> tuple[str | None, str]:
    """The owner's (user, password) from standard input, as its secret holds them; read once
    the command's arguments are taken (an error there comes first, not a wait for input)."""
    where = "from standard input (--owner-secret-stdin)"
    if sys.stdin is None:  # started with it closed
        raise WebstatsError(f"the owner's secret {where}: standard input is closed, pipe it in")
    if sys.stdin.isatty():  # no prompt: the secret is piped in (the playbooks do)
        raise WebstatsError(f"the owner's secret {where}: standard input is a terminal, pipe it in")
    raw = sys.stdin.buffer.read(SECRET_MAX_BYTES + 1)
    if len(raw) > SECRET_MAX_BYTES:
        raise WebstatsError(f"the owner's secret {where} is over {SECRET_MAX_BYTES} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = None  # (parse_login_secret says what it must be)
    user, password = parse_login_secret(text, where)
    if user is None:  # else the ETL's user name would go with the owner's password
        raise WebstatsError(f'database secret {where} must name its "username"')
    return user, password


pass_ctx = click.make_pass_decorator(Context)
F = TypeVar("F", bound=Callable[..., Any])
SCHEMA_BEHIND = 3  # exit status of `check` when the schema needs `bioc-webstats db upgrade`


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", is_flag=True, help="Debug logging; tracebacks on failure.")
@click.version_option(__version__, prog_name="bioc-webstats")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Download statistics of Bioconductor packages: web service and ETL."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # alembic narrates every step at INFO; SysOps want the outcome only
        logging.getLogger("alembic").setLevel(logging.WARNING)
    # boto3's DEBUG log holds response bodies (decrypted parameters, the DB secret): never
    # below INFO, even with --verbose; without it, credential discovery is not news either.
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    ctx.obj = Context(verbose)


def _command_path(args: list[str]) -> list[str]:
    """The command's names (``etl run``), never its arguments: a session's application name
    is shown to every login of the database."""
    names: list[str] = []
    cmd: click.Command = cli
    for arg in args:
        if arg.startswith("-"):
            continue
        sub = cmd.commands.get(arg) if isinstance(cmd, click.Group) else None
        if sub is None:
            break
        names.append(arg)
        cmd = sub
    return names


# The daily job waits this long for a command SysOps started by hand (a backfill, a reingest)
# before it gives up: it runs once a day, so refusing at once meant a failed day and an alarm.
# Its unit's TimeoutStartSec (4 h) leaves it the rest.
DAILY_LOCK_WAIT = 2 * 3600.0
LOCK_POLL = 5.0


@contextlib.contextmanager
def writer_lock(settings: Settings, what: str, wait: float = 0) -> Iterator[None]:
    """One command that writes records or statistics at a time on this host (``daily``,
    ``etl run``, ``etl reingest``, ``stats rebuild``, ``import legacy-db``, ``db restore``,
    ``packages sync``, ``packages load``): a second one stops and says who holds the lock,
    instead of working through the same objects; at once, or after ``wait`` seconds of
    waiting for it."""
    import datetime as dt
    import fcntl

    path = settings.state_dir / "etl.lock"
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    except OSError as exc:
        raise WebstatsError(f"cannot open the lock {path}: {exc.strerror}") from None
    with os.fdopen(fd, "r+") as f:
        deadline, told = time.monotonic() + wait, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" after waiting {wait / 60:g} minutes" if wait else ""
                raise WebstatsError(
                    f"{what}: not started{waited}, {holder} holds {path} (one writer at a "
                    "time); try again when it is done"
                )
            if not told:
                log.warning("%s: waiting for %s to finish (one writer at a time)", what, holder)
                told = True
            time.sleep(min(LOCK_POLL, left))
        since = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        f.truncate(0)
        try:  # who holds it, for the next one: unbuffered, and not needed (the flock is the
            # lock): a full disk failed every writer here with a bare "No space left on device"
            os.pwrite(f.fileno(), f"'{what}' (pid {os.getpid()}, since {since})\n".encode(), 0)
        except OSError as exc:
            log.warning("%s: cannot write its name into the lock %s: %s", what, path, exc.strerror)
        try:
            yield
        finally:
            f.truncate(0)


# --- db -------------------------------------------------------------------------------------


@cli.group("db")
def db_group() -> None:
    """The database schema."""


def _owner_from_stdin(ctx: click.Context, _param: click.Parameter, given: bool) -> None:
    ctx.ensure_object(Context).owner_from_stdin = given


# The deploy reads the owner's secret on the controller and gives it here: the instance role
# may not read it (iam/), so the ETL's host never holds the schema owner's password at rest.
owner_secret_option = click.option(
    "--owner-secret-stdin",
    is_flag=True,
    expose_value=False,
    callback=_owner_from_stdin,
    help="Read the owner's login from standard input, as its secret holds it "
    '({"username": …, "password": …}), instead of from the configuration.',
)


@db_group.command("upgrade")
@owner_secret_option
@pass_ctx
def db_upgrade(ctx: Context) -> None:
    """Create or migrate the schema to the newest revision (idempotent), as the schema's
    owner (db/owner_*: the other logins may not change the schema)."""
    revision = db.upgrade(ctx.settings_for("owner").database_url)
    click.echo(f"schema at revision {revision}")


@db_group.command("backup")
@click.argument("dest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--s3", "s3_url", help="Also upload it to s3://bucket/prefix.")
@owner_secret_option
@pass_ctx
def db_backup(ctx: Context, dest: Path, s3_url: str | None) -> None:
    """Dump the database to DEST (0600; pg_dump of the server's major version), as the
    schema owner."""
    from .backup import backup

    click.echo(backup(ctx.settings_for("owner"), dest, s3_url).line())


@db_group.command("restore")
@click.argument("source")
@owner_secret_option
@pass_ctx
def db_restore(ctx: Context, source: str) -> None:
    """Replace the database's contents with a backup, a FILE or s3://bucket/key (all or
    nothing), migrate it to this release's schema, and publish it under a new version
    directory. Stop the ETL timer first (playbooks/restore.yml does all of it)."""
    import shutil

    from .backup import fetch, restore
    from .publish import publish

    owner = ctx.settings_for("owner")
    work = owner.state_dir / f"restore-{os.getpid()}"
    with writer_lock(owner, "db restore"):
        try:
            path = fetch(source, work) if source.startswith("s3://") else Path(source)
            click.echo(restore(owner, path))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        click.echo(f"schema at revision {db.upgrade(owner.database_url)}")
    click.echo(publish(ctx.settings, force=True).line())


# --- packages -------------------------------------------------------------------------------


@cli.group("packages")
def packages_group() -> None:
    """The packages table (which names count in which category)."""


@packages_group.command("load")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_ctx
def packages_load(ctx: Context, csv_file: Path) -> None:
    """Load/merge the packages table from a CSV (package,category,first_version,last_version)."""
    from .etl.packages import load_csv
    from .publish import after_change

    # It recounts the packages it changes, like a sync: one writer at a time.
    with writer_lock(ctx.settings, "packages load"), after_change(ctx.settings):
        summary = load_csv(ctx.settings, csv_file)
    click.echo(summary)


@packages_group.command("seed")
@pass_ctx
def packages_seed(ctx: Context) -> None:
    """Load the packages history shipped with the release into an EMPTY table (deploy, demo);
    a table with rows is left as it is. Safe to run on every deploy."""
    from .etl.packages import seed
    from .publish import after_change

    with after_change(ctx.settings):
        click.echo(seed(ctx.settings))


def _not_empty(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An option that names a place: given empty (a shell variable unset) it is a usage
    error, not a silent fall-back to the configured place."""
    if value is not None and not value.strip():
        raise click.BadParameter("empty: name a directory or a URL", param=param)
    return value


@packages_group.command("sync")
@click.option(
    "--from",
    "source",
    callback=_not_empty,
    help="Base URL or directory with config.yaml and PACKAGES.",
)
@click.option("--dry-run", is_flag=True, help="Print the changes, write nothing.")
@click.option("--force", is_flag=True, help="Apply even past the change limit.")
@pass_ctx
def packages_sync(ctx: Context, source: str | None, dry_run: bool, force: bool) -> None:
    """Sync the packages table from Bioconductor's config.yaml and devel PACKAGES files."""
    from .etl.packages import sync
    from .publish import after_change

    # The daily job syncs too: a second sync at once (SysOps' --force) failed on a row the
    # other had added, or waited silently behind its count. A dry run writes nothing: it
    # neither waits for the lock nor publishes (a site behind an import still running).
    lock = contextlib.nullcontext() if dry_run else writer_lock(ctx.settings, "packages sync")
    with lock, contextlib.nullcontext() if dry_run else after_change(ctx.settings):
        click.echo(sync(ctx.settings, source=source, dry_run=dry_run, force=force))
    if not dry_run:  # published too: a sync by hand (the runbook's --force) is the daily's
        from .daily import LAST_SYNC_OK, record_success  # (the sync-not-run alarm clears)

        record_success(ctx.settings, LAST_SYNC_OK)


# --- etl ------------------------------------------------------------------------------------


@cli.group("etl")
def etl_group() -> None:
    """Ingest CloudFront logs."""


def _iso_date(value: str | None) -> str | None:
    """A YYYY-MM-DD option value, else a usage error (exit 2)."""
    from .config import DAY_TEXT, parse_day

    if value is not None:
        try:
            parse_day(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not {DAY_TEXT}") from None
    return value


def _date_option(name: str, text: str) -> Callable[[F], F]:
    """A YYYY-MM-DD option (``--since``, ``--until``) with its help ``text``: a bad date is
    a usage error."""
    return click.option(name, callback=lambda _ctx, _param, value: _iso_date(value), help=text)


@etl_group.command("run")
@click.option(
    "--source",
    callback=_not_empty,
    help="Directory or s3://bucket/prefix (default: configuration).",
)
@_date_option(
    "--since",
    "Also consider objects dated on or after this date (YYYY-MM-DD); no line dated before "
    "etl/logs_since is counted.",
)
@_date_option(
    "--until", "Only objects dated on or before this date (YYYY-MM-DD): a backfill in slices."
)
@click.option("--dry-run", is_flag=True, help="List what would be ingested, write nothing.")
@click.option(
    "--engine",
    type=click.Choice(["local", "athena"]),
    default="local",
    show_default=True,
    help="Where logs are read and counted: this process, or Amazon Athena over the bucket.",
)
@pass_ctx
def etl_run(
    ctx: Context,
    source: str | None,
    since: str | None,
    until: str | None,
    dry_run: bool,
    engine: str,
) -> None:
    """Ingest new log objects and update the statistics."""
    if since and until and until < since:  # both YYYY-MM-DD: the text order is the date order
        raise click.UsageError(f"--until {until} is before --since {since}")
    if engine == "athena":
        from .etl.athena import run
    else:
        from .etl.ingest import run

    from .publish import after_change

    changes = contextlib.nullcontext() if dry_run else after_change(ctx.settings)
    with writer_lock(ctx.settings, "etl run"), changes:  # (a dry run publishes nothing)
        ok = run(ctx.settings, source=source, since=since, dry_run=dry_run, until=until)
    if not ok:
        raise WebstatsError(
            "etl run: some objects failed (see the messages above); "
            "they will be retried on the next run"
        )


@etl_group.command("reingest")
@click.argument("keys", nargs=-1, required=True)
@click.option(
    "--source",
    callback=_not_empty,
    help="Directory or s3://bucket/prefix (default: configuration).",
)
@pass_ctx
def etl_reingest(ctx: Context, keys: tuple[str, ...], source: str | None) -> None:
    """Replace the records of already ingested objects."""
    from .etl.ingest import reingest
    from .publish import after_change

    with writer_lock(ctx.settings, "etl reingest"), after_change(ctx.settings):
        reingest(ctx.settings, list(keys), source=source)


# --- import ---------------------------------------------------------------------------------


@cli.group("import")
def import_group() -> None:
    """Load history kept elsewhere."""


@import_group.command("legacy-db")
@click.argument("files", nargs=-1, required=True)
@_date_option(
    "--until",
    "The cut-over day (YYYY-MM-DD): rows dated on or after it are skipped, the logs cover "
    "them. Default: etl/logs_since.",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Replace the records of units whose rows changed since they were imported "
    "(default: refuse them).",
)
@pass_ctx
def import_legacy_db(
    ctx: Context, files: tuple[str, ...], until: str | None, replace: bool
) -> None:
    """Load the legacy stats server's download_db_YYYY.sqlite history."""
    from .etl.legacy import import_files
    from .publish import after_change

    with writer_lock(ctx.settings, "import legacy-db"), after_change(ctx.settings):
        ok = import_files(ctx.settings, list(files), until=until, replace=replace)
    if not ok:
        raise WebstatsError(
            "import legacy-db: some files failed or were refused (see the messages above); "
            "the others are imported"
        )


# --- the daily job, status -----------------------------------------------------------------


@cli.command("daily")
@click.option(
    "--source",
    callback=_not_empty,
    help="Log directory or s3://bucket/prefix (default: configuration).",
)
@click.option(
    "--packages-from", callback=_not_empty, help="Base URL or directory of the packages sync."
)
@pass_ctx
def daily_cmd(ctx: Context, source: str | None, packages_from: str | None) -> None:
    """The daily job (the ETL timer runs it): packages sync, then etl run. A failed sync is
    reported and does not stop the ETL; either failure makes the exit status 1 (systemd's
    OnFailure hook). Successes are recorded (meta last_sync_ok / last_etl_ok)."""
    from .alerts import remember_topic
    from .daily import run_daily

    remember_topic(ctx.settings)  # the failure hook alerts there if this run fails
    # the same lock as etl run (one writer at a time); a command run by hand is waited for
    with writer_lock(ctx.settings, "daily", wait=DAILY_LOCK_WAIT):
        result = run_daily(ctx.settings, source=source, packages_from=packages_from)
    click.echo(result.line())
    if not result.ok:
        raise WebstatsError("; ".join(f"{step}: {why}" for step, why in result.failures.items()))


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (for a watchdog).")
@pass_ctx
def status_cmd(ctx: Context, as_json: bool) -> None:
    """ValidThru, the last successful sync and ETL run, the published data version."""
    from .daily import status, status_lines

    facts = status(ctx.settings)
    if as_json:
        import json

        click.echo(json.dumps(facts, sort_keys=True))
    else:
        click.echo("\n".join(status_lines(facts)))
    if facts.get("config_error"):  # the facts first: they matter most at such a time
        raise WebstatsError(str(facts["config_error"]))


# --- stats ----------------------------------------------------------------------------------


@cli.group("stats")
def stats_group() -> None:
    """The statistics tables."""


@stats_group.command("rebuild")
@pass_ctx
def stats_rebuild(ctx: Context) -> None:
    """Recompute all statistics from the stored records."""
    from .publish import after_change
    from .store.stats import rebuild

    with writer_lock(ctx.settings, "stats rebuild"), after_change(ctx.settings):
        click.echo(rebuild(ctx.settings))


# --- publish --------------------------------------------------------------------------------


@cli.command("publish")
@click.option("--all", "all_files", is_flag=True, help="Also every package page and file now.")
@click.option("--force", is_flag=True, help="A new version directory even if one is current.")
@pass_ctx
def publish_cmd(ctx: Context, all_files: bool, force: bool) -> None:
    """Publish the current data version for nginx: pages and files on disk, then switch
    (every command that changes the statistics does it; run it after a restore, a change
    made by hand in the database, or a deploy)."""
    from .publish import publish

    click.echo(publish(ctx.settings, all_files=all_files, force=force).line())


# --- compare ---------------------------------------------------------------------------------


def _csv_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _names(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A comma-separated list that names something: empty (",", "") is a usage error, not
    a selection of nothing that passes, nor of everything."""
    if value is not None and not _csv_list(value):
        raise click.BadParameter("names nothing: give one or more, comma-separated", param=param)
    return value


def _category_names(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--categories: names something, and only categories (a usage error, exit 2)."""
    from .compare import categories_named

    try:
        categories_named(_csv_list(_names(ctx, param, value)))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None
    return value


def _finite(_ctx: click.Context, param: click.Parameter, value: float) -> float:
    if value != value:  # NaN slips through FloatRange's comparisons
        raise click.BadParameter("not a number", param=param)
    return value


@cli.command("compare")
@click.option(
    "--against",
    required=True,
    callback=_not_empty,
    help="The other site: a base URL (https://bioconductor.org/packages/stats/) or a "
    "directory copy of it.",
)
@click.option(
    "--ours",
    callback=_not_empty,
    help="Read this side from a URL (e.g. http://127.0.0.1:8000/packages/stats/) instead of "
    "building it from the database.",
)
@click.option("--categories", callback=_category_names,
              help="Only these categories (comma-separated: bioc,workflows).")  # fmt: skip
@click.option("--packages", callback=_names, help="Only these packages' files (comma-separated).")
@click.option("--jobs", type=click.IntRange(1, 16), default=4, show_default=True,
              help="Requests at a time to a remote site.")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(1, 600), default=30.0, show_default=True,
              callback=_finite, help="Seconds per request.")  # fmt: skip
@pass_ctx
def compare_cmd(
    ctx: Context,
    against: str,
    ours: str | None,
    categories: str | None,
    packages: str | None,
    jobs: int,
    timeout: float,
) -> None:
    """Compare every published text file, byte for byte, with another site (the legacy one):
    one line per differing file, then 'N files compared, M differ'; exit 0 only when files
    were compared, none differs and none could not be compared."""
    from .compare import DatabaseSide, compare, open_side

    there = open_side(against, timeout)
    here = open_side(ours, timeout) if ours else DatabaseSide(ctx.settings)
    try:
        result = compare(
            here, there, _csv_list(categories), _csv_list(packages), jobs, echo=click.echo
        )
    finally:
        here.close()
    click.echo(result.summary())
    if result.failed:
        raise WebstatsError(
            f"compare: {result.differ} of {result.compared} files differ from {there.name}; "
            f"{result.failed} could not be compared"
        )
    if result.differ:
        raise WebstatsError(
            f"compare: {result.differ} of {result.compared} files differ from {there.name}"
        )
    if not result.compared:  # not a pass: an empty directory, a typo in a URL
        raise WebstatsError(
            f"compare: nothing was compared: neither {there.name} nor {here.name} publishes "
            "any file of the selected categories"
        )


# --- config / check -------------------------------------------------------------------------


SHARED_WEB_LOGIN = (
    "bioc-webstats: warning: no db/web_credentials (nor db/web_dbuser): the web logs in with "
    'the ETL\'s login, which may write; create the web login (RUNBOOK, "Database logins") and '
    "set db/web_credentials"
)


@cli.group("config")
def config_group() -> None:
    """The effective configuration."""


@config_group.command("show")
@pass_ctx
def config_show(ctx: Context) -> None:
    """Print each setting, its value (secrets redacted) and where it came from; exit 1 after
    them when a value is not one its parameter takes (as ``check`` would)."""
    from .config import render_settings

    click.echo(render_settings(ctx.settings), nl=False)
    problems = ctx.settings.problems(())
    if problems:  # shown above as they were given; the commands refuse them
        raise WebstatsError("; ".join(problems))


@config_group.command("write-web")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
def config_write_web(ctx: Context, path: Path) -> None:
    """Write the web service's env file to PATH (mode 0640, atomically: the web service's
    account reads it through the group the writer runs with): its settings and its own
    database login, no other secret, no SSM path. bioc-webstats-web-config.service runs it
    before each start of the web and every 5 minutes (a rotated password)."""
    from .config import WEB_ENV_HEADER, web_env_text
    from .files import write_atomic

    settings = ctx.settings_for("web")
    if settings.shared_login:  # the journal of every start of the web
        click.echo(SHARED_WEB_LOGIN, err=True)
    text = web_env_text(settings)
    try:
        # Not over a device or a FIFO (config write-web /dev/null, as root, replaced it with
        # a file) nor a link; an old file that is not UTF-8 is replaced, not a traceback.
        try:
            st: os.stat_result | None = path.lstat()
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise WebstatsError(f"cannot write {path}: exists and is not a regular file")
        if st is not None and st.st_size:
            with path.open("rb") as fh:  # as much as tells (a 1.5 GB file was read whole)
                old = fh.read(len(text.encode()) + 1)  # (the text starts with the header)
            if old == text.encode():
                click.echo(f"unchanged: {path}")
                return
            if not old.startswith(WEB_ENV_HEADER.split("\n", 1)[0].encode()):
                # a typo in the path (the main env file, any file): not replaced
                raise WebstatsError(
                    f"cannot write {path}: it holds something else than what "
                    "'config write-web' writes; give the web's env file, or remove it first"
                )
        write_atomic(path, text, mode=0o640)
    except OSError as exc:
        raise WebstatsError(f"cannot write {path}: {exc.strerror}") from None
    click.echo(f"written: {path}")


@cli.command("check")
@click.option(
    "--login",
    type=click.Choice(["etl", "web", "owner"]),
    default="etl",
    show_default=True,
    help="The database login to check with (the web unit checks its own).",
)
@pass_ctx
def check(ctx: Context, login: str) -> None:
    """Smoke test: configuration loads (every value what its parameter takes; with --login
    web, the flask/*, gunicorn/* and web/* ones), database reachable (with --login web, the
    web's start, an unreachable one is a warning: the web answers 503), schema current, the
    web's reads as this release sets them (exit 3 when either is not: 'bioc-webstats db
    upgrade' is the fix; the deploy runs it then)."""
    from .alerts import remember_topic

    settings = ctx.settings_for(login)
    if login == "web" and settings.shared_login:  # the check before a deploy switches
        click.echo(SHARED_WEB_LOGIN, err=True)
    for line in overruled_lines(settings):  # a parameter someone set in SSM that has no effect
        click.echo(f"bioc-webstats: warning: {line}", err=True)
    remember_topic(settings)  # where the failure hook and the watchdog alert, without SSM
    # At the deploy, not in the unit that reads one at 01:00; the web's own start looks only
    # at what the web reads (a bad ETL parameter must not take the site down).
    problems = settings.problems(("flask/", "gunicorn/", "web/") if login == "web" else ())
    if settings.state_dir.exists() and not settings.state_dir.is_dir():  # (a typo: a file)
        problems.append(f"state directory {shown(str(settings.state_dir))}: not a directory")
    if problems:
        raise WebstatsError("; ".join(problems))
    try:
        status = db.schema_status(settings.database_url)
    except (OperationalError, InterfaceError) as exc:
        if login != "web":
            raise
        # The web's start (its ExecStartPre): failed, the socket held every request nginx
        # passed on until nginx's 504 (150 s); started, the app answers 503 at once and
        # follows the database back (a new connection each try).
        click.echo(
            f"bioc-webstats: warning: database: {first_line(exc)}; the web starts and answers "
            "503 until the database is back",
            err=True,
        )
        return
    if not status.ok:
        if status.behind:  # exit 3: 'db upgrade' is the fix (the deploy migrates on it)
            click.echo(f"bioc-webstats: error: {status.reason}", err=True)
            sys.exit(SCHEMA_BEHIND)
        raise WebstatsError(status.reason)
    # The logins' rights: the web's start does not wait on them (it reads what it was granted).
    pending = grants.pending(db.get_engine(settings.database_url)) if login != "web" else None
    if pending is not None:
        line, upgrade_fixes = pending
        if upgrade_fixes:  # exit 3 too: the deploy runs 'db upgrade' on it
            click.echo(f"bioc-webstats: error: {line}", err=True)
            sys.exit(SCHEMA_BEHIND)
        click.echo(f"bioc-webstats: warning: {line}", err=True)
    click.echo(f"ok: bioc-webstats {__version__}, {status.reason}")


@cli.command("notify-failure")
@click.argument("unit")
def notify_failure(unit: str) -> None:
    """Record that UNIT failed and alert (the OnFailure= hook). It reads no SSM (the topic
    kept on the instance is used); an alert SNS does not take is kept and logged at crit,
    and the watchdog sends it again."""

    from .alerts import RETRYING_UNITS, last_alert, record_alert, send
    from .aws import clean_unit, failure_alert, use_env_file
    from .config import DEFAULT_ENV_FILE, read_env_file, state_dir

    # The env file's AWS_* settings (region, endpoints) as every other command takes them; SSM
    # is not read, and an unreadable env file does not stop the alert.
    try:
        use_env_file(read_env_file(Path(os.environ.get("WEBSTATS_ENV_FILE") or DEFAULT_ENV_FILE)))
    except WebstatsError:
        pass
    unit = clean_unit(unit)  # one line whatever systemd (or a hand) passed
    subject, message = failure_alert(unit)
    click.echo(f"bioc-webstats: {message.splitlines()[0]}", err=True)  # the journal record
    sdir = state_dir(dict(os.environ))
    now = time.time()
    if unit in RETRYING_UNITS:
        last = last_alert(sdir, unit, now)
        if last is not None:  # failing again and again: the first alert stands
            when = dt.datetime.fromtimestamp(last, dt.UTC).strftime("%H:%M:%S UTC")
            click.echo(f"{unit} failed again: alerted at {when}, not repeated within an hour")
            return
        record_alert(sdir, unit, now)
    outcome = send(sdir, subject, message)
    click.echo(outcome)
    if not outcome.startswith("alert sent"):
        raise WebstatsError(f"{unit} failure: {outcome}")


@cli.command("watchdog")
def watchdog_cmd() -> None:
    """Check data age, the daily job, the web, the published version and the disks; alert
    on each alarm (journal line + SNS; again every 6 h while it lasts; once when cleared)."""
    from .alerts import watchdog

    alarms, lines = watchdog()
    for line in lines:
        click.echo(line)
    click.echo(
        f"watchdog: {len(alarms)} alarms"
        + (": " + ", ".join(a.name for a in alarms) if alarms else "")
    )


# What SQLite and PostgreSQL say of a table or a column that is not there.
_SCHEMA_MISSING = re.compile(
    r"no such (table|column)|has no column named"
    r"|(relation|column) \S+ (of relation \S+ )?does not exist"
)


def _driver_message(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """What a C extension prints while it unwinds, with no Python frame (psycopg2, on a
    connection dropped in a COPY, a decode error it cannot raise): a debug line, not a dump
    before the command's one line. An exception with frames is Python's, as before."""
    if tb is not None:
        sys.__excepthook__(kind, value, tb)
        return
    logging.getLogger("bioc_webstats").debug("(not raised) %s: %s", kind.__name__, value)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected failures become one line on stderr and exit 1."""
    keep_memory_private()  # before any secret is read
    args = argv if argv is not None else sys.argv[1:]
    verbose = any(a in ("-v", "--verbose") for a in args)
    sys.excepthook = _driver_message
    db.APPLICATION_NAME = " ".join(["bioc-webstats", *_command_path(args)])
    try:
        cli.main(args=argv, prog_name="bioc-webstats", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except WebstatsError as exc:
        if verbose:
            traceback.print_exc()
        click.echo(f"bioc-webstats: error: {printable(str(exc))}", err=True)
        sys.exit(1)
    except SQLAlchemyError as exc:
        if verbose:
            traceback.print_exc()
        first = first_line(db.what_happened(exc))
        # A table or a column missing: no schema yet, or one behind this release (installed,
        # not migrated yet), which the hint named wrongly or not at all.
        if _SCHEMA_MISSING.search(first):
            first += (
                " (the schema is missing or older than this release? 'bioc-webstats check' "
                "tells; 'bioc-webstats db upgrade' fixes it)"
            )
        click.echo(f"bioc-webstats: error: database: {first}", err=True)
        sys.exit(1)
    except OSError as exc:  # a path given that this user may not reach, a full disk, …
        if verbose:
            traceback.print_exc()
        name = exc.filename  # a path, or a file descriptor's number, or none
        name = os.fsdecode(name) if isinstance(name, str | bytes | os.PathLike) else name
        where = f"{shown(str(name))}: " if name is not None else ""
        click.echo(f"bioc-webstats: error: {where}{exc.strerror or exc}", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":  # python -m bioc_webstats.cli
    main()
