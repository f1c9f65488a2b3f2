"""The Flask application: /packages/stats/… (web-contract.md) and /healthz.

Behind nginx, the app sees only what nginx has no published file for: redirects, 404s,
``/healthz``, and pages or files of the current data version that are not built yet. It
builds those into the current version directory of the published site (:mod:`.site`), where
nginx finds them from then on, and sends them with Flask's ``send_file`` (conditional: 304 on
``If-None-Match``/``If-Modified-Since``, HEAD without body). Without nginx (development, the
tests' embedded mode) it answers every URL the same way, from the same files.

The data version is read from the database on each request the app answers (one small query):
when the published ``current`` is not the database's version — a change nobody published
yet, a recreated or restored database — the app opens a directory for the database's version
and switches ``current`` to it, so no answer ever comes from another database's files.
While the database cannot be reached, the version last read stands (:meth:`StatsSite.state`):
what needs no new body still answers. A worker that starts during the outage (recycled, or
the service restarted) takes the published ``current`` version, its snapshot read from the
published ``<prefix>_pkg_stats.tab`` files.
"""

from __future__ import annotations

import calendar
import datetime as dt
import gc
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from urllib.parse import quote

from flask import Flask, Response, jsonify, request, send_file
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from .. import __version__
from ..config import Settings, load_settings
from ..errors import first_line
from ..store import db
from . import pages, report, tabfiles
from .site import PublishedSite, Version, file_etag, validators
from .targets import STATIC_FILES, Redirect, Target, build, exists, resolve

PREFIX = "/packages/stats"
TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
log = logging.getLogger(__name__)  # the app's logger (Flask names it after this module)


def http_datetime(when: dt.datetime) -> str:
    """RFC 7231 date of an aware datetime, locale-independent."""
    when = when.astimezone(dt.UTC)
    return tabfiles.http_date(when.date()).replace("00:00:00", when.strftime("%H:%M:%S"))


HEALTH_TIMEOUT = 5.0  # seconds /healthz waits for the database before it says 503


class BoundedCheck:
    """Runs a check on a thread of its own and waits for it at most ``timeout`` seconds.

    A database that hangs (it accepts, then never answers) would hold /healthz until nginx
    gives up with a 504 minutes later; the deploy and the watchdog need a 503 at once. A check
    that hangs keeps only its own (daemon) thread: a check that finds the previous one running
    waits for it (within the same bound) instead of starting another beside it.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._running: threading.Thread | None = None

    def run(self, fn: Callable[[], None]) -> None:
        failed: list[BaseException] = []
        done = threading.Event()

        def check() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                failed.append(exc)
            finally:
                done.set()

        previous = self._running  # (after a fork, the parent's thread is not alive here)
        if previous is not None and previous.is_alive():  # another request's, or a hung one
            previous.join(self.timeout)
            if previous.is_alive():
                raise TimeoutError("the previous check is still waiting for the database")
        with self._lock:
            self._running = threading.Thread(target=check, name="healthz", daemon=True)
            self._running.start()
        if not done.wait(self.timeout):
            raise TimeoutError(f"no answer from the database within {self.timeout:g} s")
        if failed:
            raise failed[0]


class StatsSite:
    """Per-process state: settings, the published site, the snapshot of the data version."""

    def __init__(self, settings: Settings, web: bool = False) -> None:
        self.settings = settings
        # The web only: with the database down and no data version read yet, answer from
        # the published one (a publish must not take the database's silence for a version);
        # and a request waits for a table's lock only so long (a publish waits its turn).
        self.from_published = web
        self.lock_timeout = db.WEB_LOCK_TIMEOUT if web else None
        self.site = PublishedSite(settings.publish_dir)
        self.max_age = settings.get_int("web/cache_max_age")
        # (data key, snapshot, whether it was read from published files)
        self._snap: tuple[str, report.Snapshot, bool] | None = None
        self._last_state: db.DataState | None = None
        self._db_down = False
        self._lock = threading.Lock()
        self._static: dict[str, tuple[bytes, str, str, float]] = {}

    def session(self) -> Session:
        return db.session_factory(self.settings.database_url, self.lock_timeout)()

    def state(self) -> db.DataState:
        """The database's data version; while the database cannot be reached, the last one
        read (its snapshot is in memory and its files on disk: redirects, 404s and what is
        published still answer; only a body not built yet needs the database)."""
        try:
            with self.session() as session:
                state = db.data_state(session)
        except SQLAlchemyError as exc:
            if self._last_state is None and self.from_published:  # started during the outage
                with self._lock:
                    if self._last_state is None:
                        self._last_state = self._published_state()
            if self._last_state is None:
                raise
            if not self._db_down:  # one line per outage, not one per request
                log.warning(
                    "database unavailable (%s): answering from data version %s until it is back",
                    type(exc).__name__,
                    self._last_state.key,
                )
                self._db_down = True
            return self._last_state
        if self._db_down:
            log.warning("database available again")
            self._db_down = False
        self._last_state = state
        return state

    def _published_state(self) -> db.DataState | None:
        """The data version ``current`` holds, with its snapshot read from its published
        files (None when they cannot be read): a worker that starts while the database is
        down answers redirects and 404s like the others, not 503."""
        cur = self.site.current()
        meta = self.site.meta(cur) if cur is not None else None
        if cur is None or meta is None or "valid_thru" not in meta:
            return None
        try:
            vt = dt.date.fromisoformat(meta["valid_thru"]) if meta["valid_thru"] else None
            version, token = cur.key.split("-", 1)

            def read(relpath: str) -> bytes | None:
                found = self.site.lookup(cur, relpath)
                return found.read_bytes() if found is not None else None

            snap = report.snapshot_from_files(read, int(version), vt)
        except (OSError, ValueError, TypeError):
            return None
        if snap is None:
            return None
        self._snap = (cur.key, snap, True)
        return db.DataState(int(version), token, vt)

    def snapshot(self, state: db.DataState) -> report.Snapshot:
        """The snapshot of this data version (loaded once per version and process; one read
        from published files is loaded again from the database once it answers)."""
        snap = self._snap
        if snap is None or snap[0] != state.key or (snap[2] and not self._db_down):
            with self._lock:
                snap = self._snap
                if snap is None or snap[0] != state.key or (snap[2] and not self._db_down):
                    with self.session() as session:
                        loaded = report.load_snapshot(session, state.version, state.valid_thru)
                    snap = self._snap = (state.key, loaded, False)
                    # Long-lived from here on: keep it out of the collector's full scans.
                    # Unfrozen and collected first: cycles that became garbage since the
                    # last freeze (the replaced snapshot's, a request's) would stay frozen,
                    # a few kilobytes a data version for the worker's lifetime.
                    gc.unfreeze()
                    gc.collect()
                    gc.freeze()
        return snap[1]

    def version(self, state: db.DataState) -> Version:
        """The published version directory of the database's data version and of this
        release (its code): ``current`` when it is both, else a new directory, with the
        shipped assets, that ``current`` is switched to. Pages of one release are never
        written among another's: a release rolled back after its health check failed left
        the pages it had built in the directory the release before it went on serving."""
        site = self.site
        cur = site.current()
        if cur is not None and cur.key == state.key and cur.code == site.code:
            return cur
        with self._lock:
            cur = site.current()
            if cur is not None and cur.key == state.key and cur.code == site.code:
                return cur
            version = site.open_version(state.key, valid_thru=state.valid_thru)
            self.write_assets(version)
            site.switch(version)
            return version

    def write_assets(self, version: Version) -> None:
        """The shipped assets (STATIC_FILES) into ``version``, those not there yet: nginx sends
        them from the directory like every published file."""
        for name in STATIC_FILES:
            if self.site.lookup(version, name) is None:
                self.site.write(version, name, self.static(name)[0])

    def build(self, target: Target, snap: report.Snapshot, key: str) -> tuple[bytes, bool]:
        """Generate one body from one consistent view of the database: (body, whether it
        is of data version ``key``). On PostgreSQL the transaction is REPEATABLE READ, so
        every query sees the same committed state, and the data version read first in it
        tells whether that state is still ``key`` (else the body is served, not stored)."""
        with self.session() as session:
            if session.get_bind().dialect.name == "postgresql":
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            same = db.data_state(session).key == key
            return build(session, target, snap).encode(), same

    def send_asset(self, name: str) -> Response:
        """A shipped asset as nginx sends it: the published copy, with its publish time and
        ETag (nginx hands the app a request it does not take, one with a query of raw bytes;
        answered from the package's file, the validators differed). The package's file
        answers only while nothing is published."""
        cur = self.site.current()
        found = self.site.lookup(cur, name) if cur is not None else None
        if found is not None:
            try:
                etag, mtime, _size = validators(found)
                return _send(found, STATIC_FILES[name][1], etag.strip('"'), mtime, self.max_age)
            except OSError:  # replaced meanwhile (an old version removed): the package's copy
                pass
        body, ctype, etag, mtime = self.static(name)
        return _send(body, ctype, etag, mtime, self.max_age)

    def static(self, name: str) -> tuple[bytes, str, str, float]:
        """(body, content type, etag, mtime) of a shipped asset, read once."""
        if name not in self._static:
            rel, ctype = STATIC_FILES[name]
            res = resources.files("bioc_webstats.web") / "static" / rel
            body = res.read_bytes()
            etag = "s-" + hashlib.sha256(body).hexdigest()[:20]
            self._static[name] = (body, ctype, etag, Path(str(res)).stat().st_mtime)
        return self._static[name]


def _stale(vt: dt.date | None, settings: Settings) -> bool:
    """Whether ValidThru is older than ``alerts/max_data_age`` hours (no data: not stale)."""
    if vt is None:
        return False
    try:
        limit = float(settings.get("alerts/max_data_age") or 36)
    except ValueError:
        limit = 36.0
    return db.data_age_hours(vt, dt.datetime.now(dt.UTC)) > limit


def _plain(status: int, title: str, message: str) -> Response:
    root = f"{PREFIX}/"
    body = pages.simple_page(title, message, status, root).encode()
    resp = Response(body, status=status, content_type=HTML)
    if status == 503:
        resp.headers["Retry-After"] = "60"
    resp.headers["Cache-Control"] = "no-store"
    return resp


# The longest Location a redirect carries: nginx takes an upstream's headers in one buffer of
# 32 KB (proxy_buffer_size in site.conf; a longer one is its 502), and a query escaped here
# grows to at most three times the 8 KB request line nginx accepts. Longer: 414.
MAX_LOCATION = 3 * 8192 + 1024
# The query nginx did not pass in the request line because it holds raw bytes (site.conf).
RAW_QUERY_HEADER = "X-Webstats-Raw-Query"


def _redirect(location: str, max_age: int) -> Response:
    """The contract's 301 to a canonical path, with the Cache-Control nginx gives its own
    (a cache treats both kinds of redirect alike)."""
    # Not request.script_root: gunicorn takes SCRIPT_NAME from a request header, and a
    # client talking to its socket could point the redirect at another host.
    target = f"{PREFIX}/{location}"
    # nginx passes a query holding raw bytes in a header (gunicorn refuses it in the request
    # line); both arrive decoded as latin-1, byte for byte, and are percent-encoded so
    qs = request.headers.get(RAW_QUERY_HEADER) or request.query_string.decode("latin-1")
    if qs:
        target += "?" + quote(qs, safe="/?&=+%;:@,$!*'()~", encoding="latin-1")
    if len(target) > MAX_LOCATION:
        return _plain(414, "URI Too Long", "The address is too long.")
    resp = Response(status=301)
    resp.headers["Location"] = target
    resp.headers["Cache-Control"] = f"public, max-age={max_age}"
    return resp


def _etag_listed(header: str, etag: str, weak: bool) -> bool:
    """Whether an If-Match (``weak`` False) or If-None-Match (True) list names ``etag`` (the
    tag unquoted, as send_file takes it), as nginx reads the list: ``*`` alone, or the quoted
    tag byte for byte (``W/`` ignored when weak), between commas and blanks."""
    header = header.strip(" \t")
    if header == "*":
        return True
    quoted = f'"{etag}"'
    for item in header.split(","):
        item = item.strip(" \t")
        if weak and item.startswith("W/"):
            item = item[2:]
        if item == quoted:
            return True
    return False


# The three forms nginx reads (ngx_parse_http_time): "Sun, 06 Nov 1994 08:49:37 GMT",
# "Sunday, 06-Nov-94 08:49:37 GMT" and "Sun Nov  6 08:49:37 1994"; the weekday is not
# checked, nor what follows the time, and a month is told by its first letter (and its second
# or third for J, M, A), as there.
_RFC_DATE = re.compile(r"[^ ,]*, *(\d\d)(?: ([JFMASOND]..) (\d{4})|-([JFMASOND]..)-(\d\d)) ")
_ASC_DATE = re.compile(r"[^ ,]* +([JFMASOND]..). ?(\d\d?) ")
_HMS = re.compile(r"(\d\d):(\d\d):(\d\d)")
_YEAR = re.compile(r" (\d{4})")
_MDAY = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _month(name: str) -> int:
    first = name[0]
    if first == "J":
        return 1 if name[1] == "a" else 6 if name[2] == "n" else 7
    if first == "M":
        return 3 if name[2] == "r" else 5
    if first == "A":
        return 4 if name[1] == "p" else 8
    return {"F": 2, "S": 9, "O": 10, "N": 11, "D": 12}[first]


def http_date(raw: str) -> dt.datetime | None:
    """An HTTP date as nginx reads it, else None: werkzeug's parse_date took any email date
    ("06 Dec 2026 15:56:16 +0100"), so the app answered 304 where nginx, for the same file on
    disk, ignored the header and sent 200."""
    if m := _RFC_DATE.match(raw):
        day, month = int(m[1]), _month(m[2] or m[4])
        year = int(m[3]) if m[3] else int(m[5]) + (2000 if int(m[5]) < 70 else 1900)
        hms = _HMS.match(raw, m.end())
    elif m := _ASC_DATE.match(raw):
        day, month = int(m[2]), _month(m[1])
        hms = _HMS.match(raw, m.end())
        found = _YEAR.match(raw, hms.end()) if hms else None
        if found is None:
            return None
        year = int(found[1])
    else:
        return None
    if hms is None:
        return None
    hour, minute, second = map(int, hms.groups())
    if year < 1 or hour > 23 or minute > 59 or second > 59 or day > _MDAY[month - 1]:
        return None
    if month == 2 and day == 29 and not calendar.isleap(year):
        return None
    # day 0 is the month's eve, as nginx counts it
    first = dt.datetime(year, month, 1, hour, minute, second, tzinfo=dt.UTC)
    try:
        return first + dt.timedelta(days=day - 1)
    except OverflowError:  # 00 Jan 0001 (a 500): older than any file, as None is to its callers
        return None


def _precondition_failed(etag: str, mtime: float) -> bool:
    """If-Match and If-Unmodified-Since, each judged as nginx judges them for a file on disk.
    If-Match is taken out of the request: werkzeug's send_file answers it inverted (412 when
    it matches)."""
    if_match = request.environ.pop("HTTP_IF_MATCH", None)
    if if_match is not None and not _etag_listed(if_match, etag, weak=False):
        return True
    raw = request.environ.get("HTTP_IF_UNMODIFIED_SINCE")
    if raw is None:
        return False
    since = http_date(raw)  # one that is no date fails, as in nginx
    return since is None or int(mtime) > since.timestamp()


def _not_modified(etag: str, mtime: float) -> bool:
    """If-None-Match and If-Modified-Since, judged as nginx judges them for a file on disk
    (``if_modified_since before``): 304 when one is there and neither says modified, so an
    older If-Modified-Since beside a matching tag is a 200, as from nginx (werkzeug followed
    RFC 9110 there, and matched a tag without its quotes). Both are taken out of the request:
    send_file is left the ranges."""
    tags = request.environ.pop("HTTP_IF_NONE_MATCH", None)
    raw = request.environ.pop("HTTP_IF_MODIFIED_SINCE", None)
    if tags is None and raw is None:
        return False
    if raw is not None:
        since = http_date(raw)
        if since is None or since.timestamp() < int(mtime):
            return False
    return tags is None or _etag_listed(tags, etag, weak=True)


def _send(path_or_body: Path | bytes, ctype: str, etag: str, mtime: float, max_age: int):
    """200 (or 304 when the request's validators match, 412 when a precondition fails) with
    nginx's headers."""
    import io

    if _precondition_failed(etag, mtime):
        return _plain(412, "Precondition Failed", "Precondition Failed.")
    if _not_modified(etag, mtime):  # (werkzeug sends no Last-Modified with a 304: RFC 9110)
        resp = Response(status=304)
        resp.headers["ETag"] = f'"{etag}"'
        resp.headers["Cache-Control"] = f"public, max-age={max_age}"
        return resp
    if isinstance(path_or_body, Path):
        resp = send_file(path_or_body, mimetype=ctype, etag=etag, last_modified=mtime,
                         max_age=max_age, conditional=True)  # fmt: skip
    else:
        resp = send_file(io.BytesIO(path_or_body), mimetype=ctype, etag=etag,
                         last_modified=mtime, max_age=max_age, conditional=True)  # fmt: skip
    if resp.status_code not in (200, 206, 304):  # e.g. 412 for an If-Match that fails
        resp.close()
        name = HTTP_STATUS_CODES.get(resp.status_code, "Error")
        plain = _plain(resp.status_code, name, f"{name}.")
        if "Content-Range" in resp.headers:  # 416: the size
            plain.headers["Content-Range"] = resp.headers["Content-Range"]
        return plain
    resp.headers.pop("Expires", None)
    resp.headers.pop("Content-Disposition", None)  # nginx sends none
    resp.headers["Cache-Control"] = f"public, max-age={max_age}"
    if resp.status_code in (200, 206):
        resp.headers["Content-Type"] = ctype  # exactly, as nginx sends it
    return resp


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app from the effective configuration (loaded once per process, with the
    web's read-only database login)."""
    settings = settings or load_settings(login="web")
    db.APPLICATION_NAME = "bioc-webstats web"  # its sessions, as pg_stat_activity names them
    app = Flask(__name__, static_folder=None)
    app.config["WEBSTATS"] = settings
    app.logger.setLevel(settings.get_level("flask/log_level"))
    app.url_map.merge_slashes = False
    site = StatsSite(settings, web=True)
    app.extensions["webstats"] = site

    health = BoundedCheck(HEALTH_TIMEOUT)

    def database_facts(facts: dict) -> None:
        """Fills ``facts`` as it learns them (what it learnt before a failure stands)."""
        status = db.schema_status(settings.database_url, site.lock_timeout)
        facts.update(database=True, schema=status.revision)
        if status.ok:
            with site.session() as session:
                vt = db.get_valid_thru(session)
            facts.update(
                valid_thru=vt.isoformat() if vt else None,
                status="ok",
                stale=_stale(vt, settings),
            )

    @app.get("/healthz")
    def healthz():
        body = {
            "status": "error",
            "version": __version__,
            "database": False,
            "schema": None,
            "valid_thru": None,
            "stale": False,
        }
        facts: dict = {}
        try:
            health.run(lambda: database_facts(facts))
        except TimeoutError as exc:  # the check may still write: its facts are not used
            app.logger.warning("healthz: %s", exc)
            facts = {}
        except SQLAlchemyError as exc:  # one line: a traceback a request filled error.log
            app.logger.warning("healthz: database check failed: %s", first_line(exc))
        except Exception:
            app.logger.warning("healthz: database check failed", exc_info=True)
        body.update(facts)
        resp = jsonify(body)
        resp.headers["Cache-Control"] = "no-store"
        # Stale data is still served (200, "ok": the contract's status has two values): a
        # health check must not take the only origin out for it; "stale" says it and the
        # watchdog alarms (docs/RUNBOOK.md).
        return resp, 503 if body["status"] == "error" else 200

    @app.get(PREFIX)
    def prefix_redirect():
        return _redirect("", site.max_age)

    @app.get(PREFIX + "/", defaults={"sub": ""})
    @app.get(PREFIX + "/<path:sub>")
    def stats(sub: str):
        resolved = resolve(sub)
        if resolved is None:
            return _plain(404, "Not Found", "No such page or file.")
        if isinstance(resolved, str):
            return site.send_asset(resolved)
        if isinstance(resolved, Redirect) and resolved.needs_package is None:
            return _redirect(resolved.location, site.max_age)
        try:
            state = site.state()
            snap = site.snapshot(state)
            if isinstance(resolved, Redirect):
                assert resolved.cat is not None
                if resolved.needs_package not in snap.categories[resolved.cat.prefix].years:
                    return _plain(404, "Not Found", "No such package.")
                return _redirect(resolved.location, site.max_age)
            target = resolved
            if not exists(target, snap):
                return _plain(404, "Not Found", "No such page or file.")
            try:
                version: Version | None = site.version(state)
            except OSError as exc:  # no usable publish directory: still answer, from memory
                app.logger.warning("cannot publish into %s: %s", settings.publish_dir, exc)
                version = None
            same: list[bool] = []  # whether a body built is of the data version served

            def make() -> tuple[bytes, bool]:
                body, storable = site.build(target, snap, state.key)
                same.append(storable)
                return body, storable

            if version is None:
                got: Path | bytes = make()[0]
            else:
                got = site.site.get_or_build(version, target.relpath, make)
        except SQLAlchemyError as exc:  # (one line each: an outage is many requests)
            app.logger.warning("database unavailable: %s", first_line(exc))
            return _plain(503, "Service Unavailable", "The statistics database is unavailable.")
        ctype = HTML if target.is_page else TEXT
        if isinstance(got, Path):
            tag, mtime, _size = validators(got)
        else:  # not stored: the disk refused it, or the data moved on meanwhile
            if version is not None and same == [True]:  # the bytes nginx will send once stored
                mtime = float(version.published)
            else:
                mtime = float(max(int(time.time()), version.published if version else 0))
            tag = file_etag(mtime, len(got))
        return _send(got, ctype, tag.strip('"'), mtime, site.max_age)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = exc.code or 500
        return _plain(code, exc.name, exc.description or exc.name)

    @app.errorhandler(SQLAlchemyError)
    def db_error(_exc: SQLAlchemyError):
        return _plain(503, "Service Unavailable", "The statistics database is unavailable.")

    @app.errorhandler(db.DamagedMetaError)
    def damaged(exc: db.DamagedMetaError):
        app.logger.error("%s", exc)  # one line for SysOps; the visitor gets no detail
        return _plain(503, "Service Unavailable", "The statistics database is unavailable.")

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        app.logger.error("unexpected error", exc_info=exc)
        return _plain(500, "Internal Server Error", "Something went wrong on our side.")

    return app
