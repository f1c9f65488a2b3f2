"""Engine and sessions, the schema (through Alembic) and the small facts kept in ``meta``."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ..config import PASSWORD_SOURCES, FilePassword, SecretPassword
from ..errors import WebstatsError, first_line
from . import grants
from .models import Meta

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig
# Alembic is imported where the schema is handled, not at start-up: commands that do not
# touch the schema (etl run, web workers) start 0.2 s sooner.

VALID_THRU = "valid_thru"
DATA_VERSION = "data_version"
DATA_TOKEN = "data_token"  # noqa: S105 - random, new with every data version: never the same in two databases

log = logging.getLogger(__name__)

_engines: dict[tuple[str, str | None], Engine] = {}

# A server that goes away without a word (a failover, a network partition) must not hold a
# request or a run for the kernel's quarter of an hour of retransmissions: data it does not
# acknowledge, or keepalive probes it does not answer, end the connection after this many
# seconds (libpq's tcp_user_timeout and keepalives; a long query's silence is not a failure,
# the server's kernel answers the probes).
TCP_TIMEOUT = 30

# Who each session is, in pg_stat_activity (the CLI sets its command; the web its own): what
# SysOps, and a migration that waits, name.
APPLICATION_NAME = "bioc-webstats"

# One migration at a time (two deploys, a deploy and a restore): the second waits, then finds
# the schema current. A table the migration changes may be in use (a long ETL transaction, a
# psql session): each try waits this long for its lock, without holding up the sessions that
# queue behind it for longer, and after the last one the upgrade stops, changing nothing.
MIGRATE_LOCK = 0x5EE7_0DB5
MIGRATE_LOCK_WAIT = "30s"
MIGRATE_TRIES = 10


def what_happened(exc: SQLAlchemyError) -> SQLAlchemyError:
    """The database error to report: not the rollback or close that failed after the
    connection dropped ("connection already closed", raised while the drop was handled)."""
    while isinstance(exc, InterfaceError) and isinstance(exc.__context__, SQLAlchemyError):
        exc = exc.__context__
    return exc


# How long a web request waits for a table another session holds alone (a migration, a
# restore's single-transaction pg_restore --clean): then it answers from what is published,
# or 503, instead of nginx's 504 minutes later. The ETL takes no such lock on what the web reads.
WEB_LOCK_TIMEOUT = "5s"


def get_engine(url: str, lock_timeout: str | None = None) -> Engine:
    """One engine per URL (and lock timeout, PostgreSQL's: how long a statement waits for a
    lock) and process (gunicorn workers each build their own after fork)."""
    key = (url, lock_timeout)
    engine = _engines.get(key)
    if engine is None:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "do_connect", _sqlite_file)
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            connect_args: dict[str, object] = {
                "connect_timeout": 10,
                "keepalives": 1,
                "keepalives_idle": TCP_TIMEOUT,
                "keepalives_interval": 5,
                "keepalives_count": 3,
                "tcp_user_timeout": TCP_TIMEOUT * 1000,
                "application_name": APPLICATION_NAME[:63],
            }
            if lock_timeout is not None:  # set as the session starts: no round trip of its own
                given = make_url(url).query.get("options")
                given = given[-1] if isinstance(given, tuple) else given
                connect_args["options"] = f"{given or ''} -c lock_timeout={lock_timeout}".strip()
            engine = create_engine(
                url,
                pool_pre_ping=True,
                pool_size=5,
                max_overflow=5,
                connect_args=connect_args,
            )
            source = PASSWORD_SOURCES.get(url)
            if source is not None:
                event.listen(engine, "do_connect", _secret_login(source))
        _engines[key] = engine
    return engine


def _secret_login(source: SecretPassword | FilePassword):
    """Connect with the secret's current login; after a failed login, read the secret again
    and retry once: a rotated password is picked up without a restart."""

    def connect(dialect, _conn_rec, cargs, cparams):
        for refresh in (False, True):
            user, password = source.get(refresh=refresh)
            cparams["password"] = password
            if user:
                cparams["user"] = user
            try:
                return dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as exc:
                if refresh or "authentication failed" not in str(exc):
                    raise
        raise AssertionError("unreachable")

    return connect


def dispose_engine(url: str) -> None:
    """Close the pooled connections of ``url``'s engines and forget them."""
    for key in [key for key in _engines if key[0] == url]:
        _engines.pop(key).dispose()


def forget_inherited_connections() -> None:
    """In a forked child: drop the parent's pooled connections without closing them
    (closing would end the parent's sessions; SQLAlchemy's recipe for multiprocessing)."""
    for engine in _engines.values():
        engine.dispose(close=False)


def _sqlite_file(_dialect, _record, cargs, _cparams) -> None:
    """SQLite says only "unable to open database file": name the file and why (as the
    driver's own error, so every caller handles it as a database error)."""
    name = str(cargs[0]) if cargs else ""
    if not name or name == ":memory:" or name.startswith("file:"):
        return
    path = Path(name)
    if path.is_dir():
        raise sqlite3.OperationalError(f"unable to open database file {path}: a directory")
    if not path.parent.is_dir():
        raise sqlite3.OperationalError(
            f"unable to open database file {path}: no directory {path.parent}"
        )
    # SQLite opens it read-write (and writes its WAL beside it) for every command, reading
    # ones too: "unable to open" or "attempt to write a readonly database" named no cause.
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise sqlite3.OperationalError(
                f"unable to open database file {path}: this user may not read and write it"
            )
    elif not os.access(path.parent, os.W_OK | os.X_OK):
        raise sqlite3.OperationalError(
            f"unable to open database file {path}: this user may not create it in {path.parent}"
        )


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def session_factory(url: str, lock_timeout: str | None = None) -> sessionmaker[Session]:
    """A sessionmaker bound to the engine of ``url`` (see get_engine)."""
    return sessionmaker(get_engine(url, lock_timeout), expire_on_commit=False)


def _alembic_config(url: str) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option(
        "script_location", str(resources.files("bioc_webstats.store") / "migrations")
    )
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> str:
    """Create or migrate the schema to the newest revision (idempotent); return the revision."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    from alembic import command
    from alembic.util.exc import CommandError

    if current_revision(url) is not None:
        status = schema_status(url)
        if not status.behind:  # this release's, or a later release's (compatible or not)
            if not status.ok:
                raise WebstatsError(status.reason)
            assert status.revision is not None
            grants.apply(get_engine(url))
            return status.revision  # nothing to do: a newer schema is never downgraded
    cfg = _alembic_config(url)
    pg = not url.startswith("sqlite")
    for attempt in range(1, MIGRATE_TRIES + 1):
        blockers: dict[int, str] = {}
        try:
            with get_engine(url).begin() as conn, _watching_blockers(url, conn, blockers, pg):
                if pg:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATE_LOCK})
                    conn.execute(text(f"SET LOCAL lock_timeout = '{MIGRATE_LOCK_WAIT}'"))
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")  # reads the revision again, under the lock
            break
        except CommandError as exc:  # a revision no release knows: alembic_version edited
            raise WebstatsError(f"db upgrade: {first_line(exc)}") from None
        except (ValueError, KeyError, NotImplementedError) as exc:
            # A migration that finds the schema other than its revision says (alembic_version
            # edited by hand; SQLite's batch mode: "No such constraint"): rolled back.
            raise WebstatsError(
                f"db upgrade: a migration from {current_revision(url)} failed: "
                f"{first_line(exc)}; nothing was changed (the schema is not what its "
                "alembic_version says: restore the last backup)"
            ) from None
        except DBAPIError as exc:
            if getattr(exc.orig, "pgcode", None) != LOCK_NOT_AVAILABLE:
                raise
            named = [f"pid {pid} {who}" for pid, who in sorted(blockers.items())[:3]]
            holders = (
                "held by " + ", ".join(named) + (" and others" if len(blockers) > 3 else "")
                if named
                else "by a session that has ended since"
            )
            if attempt == MIGRATE_TRIES:
                raise WebstatsError(
                    f"db upgrade: the tables it changes stayed in use for {MIGRATE_TRIES} x "
                    f"{MIGRATE_LOCK_WAIT} ({holders}); nothing was changed. Let that finish "
                    "(bioc-webstats status; systemctl status bioc-webstats-etl.service) or "
                    "stop it, then run it again"
                ) from None
            log.warning("db upgrade: waiting for tables in use (%s), try %d", holders, attempt)
    grants.apply(get_engine(url))
    return head_revision()


LOCK_NOT_AVAILABLE = "55P03"  # SQLSTATE of a lock_timeout
BLOCKER_POLL = 1.0


@contextlib.contextmanager
def _watching_blockers(
    url: str, conn: Connection, seen: dict[int, str], pg: bool
) -> Iterator[None]:
    """While the migration runs, note every session that blocks it (``pg_blocking_pids``, from
    a second session; as pg_stat_activity shows them to any login: pid, user, application
    name, never the query): once it has given up waiting, it blocks nothing any more."""
    if not pg:
        yield
        return
    pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    stop = threading.Event()

    def watch() -> None:
        try:
            with get_engine(url).connect() as watcher:
                while not stop.wait(BLOCKER_POLL):
                    for p, user, app in watcher.execute(
                        text(
                            "SELECT pid, usename, application_name FROM pg_stat_activity "
                            "WHERE pid = ANY(pg_blocking_pids(:p))"
                        ),
                        {"p": pid},
                    ):
                        seen[p] = f"{user or '?'} '{app or '?'}'"
                    watcher.rollback()  # a fresh view of pg_stat_activity each time
        except DBAPIError:
            pass  # no names then: the message says so

    thread = threading.Thread(target=watch, name="db-upgrade-blockers", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def head_revision() -> str:
    """The newest revision shipped in this package."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config("sqlite://"))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(url: str, lock_timeout: str | None = None) -> str | None:
    """The revision the database is at (None: no schema yet). Raises if unreachable."""
    from alembic.runtime.migration import MigrationContext
    from alembic.util.exc import CommandError

    with get_engine(url, lock_timeout).connect() as conn:
        try:
            return MigrationContext.configure(conn).get_current_revision()
        except CommandError as exc:  # e.g. two rows in alembic_version
            raise WebstatsError(f"the database's schema revision: {first_line(exc)}") from None


SCHEMA_FLOOR = "schema_floor"


@dataclass(frozen=True)
class SchemaStatus:
    """Whether this release can run on the database's schema, and why not."""

    revision: str | None
    ok: bool
    reason: str
    behind: bool = False  # no schema yet, or older than this release's: `db upgrade` fixes it


def _revision_number(rev: str) -> int | None:
    return int(rev) if rev.isascii() and rev.isdigit() else None


def schema_status(url: str, lock_timeout: str | None = None) -> SchemaStatus:
    """Compare the database's schema with this release's migrations (the web: through its
    engine, see get_engine). Raises if unreachable.

    Revisions are numbered (0001, 0002, …). The schema at this release's head is fine. A NEWER
    schema is fine too, unless a later migration raised the ``schema_floor`` meta key above this
    release's head: migrations are written expand-only (old code keeps working) so that a release
    can be rolled back after its successor migrated; one that breaks old code sets the floor.
    """
    head = head_revision()
    current = current_revision(url, lock_timeout)
    if current == head:
        return SchemaStatus(current, True, f"schema {head}")
    if current is None:
        return SchemaStatus(
            None,
            False,
            f"no schema yet, this release needs {head}: run 'bioc-webstats db upgrade'",
            behind=True,
        )
    cur_n, head_n = _revision_number(current), _revision_number(head)
    from alembic.script import ScriptDirectory

    known = ScriptDirectory.from_config(_alembic_config("sqlite://")).get_revision
    try:
        is_known = known(current) is not None
    except Exception:  # noqa: BLE001 - alembic raises several types for unknown revisions
        is_known = False
    if is_known or cur_n is None or head_n is None or cur_n < head_n:
        return SchemaStatus(
            current,
            False,
            f"schema is at {current}, this release needs {head}: run 'bioc-webstats db upgrade'",
            behind=True,
        )
    with session_factory(url, lock_timeout)() as session:
        floor = get_meta(session, SCHEMA_FLOOR)
    if floor and floor.isascii() and floor.isdigit() and int(floor) > head_n:
        return SchemaStatus(
            current,
            False,
            f"schema {current} needs a release with schema "
            f"{floor} or later, this release has {head}: deploy a newer release",
        )
    return SchemaStatus(
        current, True, f"schema {current} (newer than this release's {head}, compatible)"
    )


def get_meta(session: Session, key: str) -> str | None:
    """Value of a ``meta`` key, or None."""
    return session.scalar(select(Meta.value).where(Meta.key == key))


def set_meta(session: Session, key: str, value: str) -> None:
    """Insert or replace a ``meta`` key (within the caller's transaction)."""
    row = session.get(Meta, key)
    if row is None:
        session.add(Meta(key=key, value=value))
    else:
        row.value = value


def delete_meta(session: Session, key: str) -> None:
    """Remove a ``meta`` key if present (within the caller's transaction)."""
    row = session.get(Meta, key)
    if row is not None:
        session.delete(row)


class DamagedMetaError(WebstatsError):
    """A ``meta`` value the app wrote that no longer parses (an edit by hand, a bad restore)."""


def _meta_date(key: str, value: str | None) -> dt.date | None:
    from ..config import parse_day

    try:
        return parse_day(value) if value else None
    except ValueError:
        raise DamagedMetaError(
            f"the database's meta {key} holds {value[:40]!r}, not a day YYYY-MM-DD: "
            "restore a backup, or set it right (docs/RUNBOOK.md)"
        ) from None


def _meta_int(key: str, value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        raise DamagedMetaError(
            f"the database's meta {key} holds {value[:40]!r}, not a number: "
            "restore a backup, or set it right (docs/RUNBOOK.md)"
        ) from None


RETRY_FROM = "retry_from"


def get_retry_from(session: Session) -> dt.date | None:
    """The name date of the oldest log object a run could not read (corrupt, cut short, in
    conflict), which every run lists again until it is read or gone; None when there is none."""
    return _meta_date(RETRY_FROM, get_meta(session, RETRY_FROM))


def set_retry_from(session: Session, day: dt.date | None) -> None:
    if day is None:
        delete_meta(session, RETRY_FROM)
    else:
        set_meta(session, RETRY_FROM, day.isoformat())


def get_valid_thru(session: Session) -> dt.date | None:
    """The latest date of any stored download record, as kept in ``meta``."""
    return _meta_date(VALID_THRU, get_meta(session, VALID_THRU))


def last_complete_day() -> dt.date:
    """Yesterday, UTC. A day's statistics (and ValidThru, which the pages show as "Data as
    of" and Last-Modified may not precede by a day) are only taken once the day is over: the
    ETL lists objects named up to it, and ValidThru stops there (a line of today in one of
    yesterday's objects is stored, and shown once today is over)."""
    return dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


def advance_valid_thru(session: Session, day: dt.date) -> dt.date:
    """Move ValidThru to ``day`` if that is later; it never moves backwards."""
    current = get_valid_thru(session)
    if current is None or day > current:
        set_meta(session, VALID_THRU, day.isoformat())
        return day
    return current


def get_data_version(session: Session) -> int:
    """A counter that changes whenever the statistics change (ETags and caches follow it)."""
    return _meta_int(DATA_VERSION, get_meta(session, DATA_VERSION))


def bump_data_version(session: Session) -> int:
    """Increment the data version inside the caller's transaction and return the new value.
    A new random token goes with it, so that a version number reached again by another
    database (recreated, or restored and changed) never names the same published files."""
    version = get_data_version(session) + 1
    set_meta(session, DATA_VERSION, str(version))
    set_meta(session, DATA_TOKEN, secrets.token_hex(8))
    return version


@dataclass(frozen=True)
class DataState:
    """What the published files depend on: the data version, its token, ValidThru."""

    version: int
    token: str
    valid_thru: dt.date | None

    @property
    def key(self) -> str:
        """The name of this data version among every database's: ``<version>-<token>``."""
        return f"{self.version}-{self.token}"


def valid_thru_end(valid_thru: dt.date) -> dt.datetime:
    """The end of ValidThru's day (the next midnight, UTC): what the data's age counts from,
    as the ETL takes whole days only."""
    return dt.datetime.combine(valid_thru + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


def data_age_hours(valid_thru: dt.date, now: dt.datetime) -> float:
    """How far the data is behind ``now`` (right after the 01:00 run: 1 h; a missed run: 25 h
    more)."""
    return (now - valid_thru_end(valid_thru)).total_seconds() / 3600


def data_state(session: Session) -> DataState:
    """The current :class:`DataState`, read in one query."""
    rows = dict(
        session.execute(
            select(Meta.key, Meta.value).where(Meta.key.in_((DATA_VERSION, DATA_TOKEN, VALID_THRU)))
        ).all()
    )
    vt = rows.get(VALID_THRU)
    return DataState(
        _meta_int(DATA_VERSION, rows.get(DATA_VERSION)),
        rows.get(DATA_TOKEN) or "0",
        _meta_date(VALID_THRU, vt),
    )
