"""The Flask application: /packages/stats/… (web-contract.md) and /healthz.

The data version and ValidThru come from the database. A worker remembers them while the
change stamp (``<state_dir>/data-changed``, touched right after every commit that changes the
statistics) is unchanged, and for at most ``META_TTL`` seconds (a change made by hand in the
database); so all workers of all processes follow a change at once without a query per
request. Pages and text files are generated once per data version into the disk cache
(``webcache``) and served from there; a small per-process snapshot of (category, package,
years) answers 404s and redirects without more queries. Cached answers (200 and 304) take a
short path that skips Flask: :class:`CachedFilesFastPath` here (WSGI) and the ASGI front of
the shipped gunicorn worker (``asgi``), both built on :meth:`StatsSite.cached_answer`.
"""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

from flask import Flask, Response, jsonify, request
from sqlalchemy import create_engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import wrap_file

from . import __version__, db, pages, report, tabfiles
from .categories import BY_STEM, CATEGORIES, Category
from .config import Settings, load_settings
from .errors import ConfigError
from .webcache import DiskCache

PREFIX = "/packages/stats"
TEXT = "text/plain; charset=utf-8"
HTML = "text/html; charset=utf-8"
INDEX_PAGES = {c.index_page: c for c in CATEGORIES}
YEAR_RE = re.compile(r"[0-9]{4}")  # ASCII digits only (not fullwidth digits)
# Constant text, no user input: the two facts every request needs.
META_SQL = "SELECT key, value FROM meta WHERE key IN ('data_version', 'valid_thru')"
CHANGE_STAMP = "data-changed"  # under the state directory; see announce_change()
META_TTL = 1.0  # seconds a worker trusts its data version without asking the database
log = logging.getLogger(__name__)
STATIC_FILES = {  # top-level assets under the prefix -> (file under static/, content type)
    "main.css": ("main.css", "text/css; charset=utf-8"),
    "charts.js": ("charts.js", "text/javascript; charset=utf-8"),
    "uPlot.iife.min.js": ("vendor/uplot/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
}


@dataclass(frozen=True)
class Target:
    """A resolved URL: what to build and where it lives in the cache."""

    kind: str  # index | repo | package | cat_tab | cat_year | pkg_stats | pkg_scores
    #            | packages_txt | pkg_tab | pkg_year
    cat: Category
    relpath: str  # cache path, canonical
    package: str | None = None
    year: int | None = None

    @property
    def is_page(self) -> bool:
        return self.kind in ("index", "repo", "package")


@dataclass(frozen=True)
class Redirect:
    """A 301 to ``location`` (under the prefix); ``needs_package`` must exist first."""

    location: str
    cat: Category | None = None
    needs_package: str | None = None


@dataclass
class CachedAnswer:
    """A cached page or file: 200 with the open ``file`` (the caller sends and closes it),
    or 304 (``file`` is None)."""

    status: int
    headers: list[tuple[str, str]]
    file: BinaryIO | None


@dataclass(frozen=True)
class CachedFile:
    """A body in the disk cache and the headers of its 304 and 200 answers."""

    path: str
    size: int
    etag: str
    last_modified: str | None
    headers_304: list[tuple[str, str]]
    headers_200: list[tuple[str, str]]


def fast_target(path: str) -> Target | None:
    """The target of a request path (``/packages/stats/…``, already %-decoded) that the
    short path may answer from the cache; None for everything else."""
    if not path.startswith(PREFIX + "/"):
        return None
    target = resolve(path[len(PREFIX) + 1 :])
    return target if isinstance(target, Target) else None


def _valid_name(name: str) -> bool:
    """Could be a package directory: not empty, no separators, no dot-files, no controls."""
    return (
        bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()
        and " " not in name
    )


def _year(text: str, cat: Category) -> int | None:
    if YEAR_RE.fullmatch(text) is None:
        return None
    year = int(text)
    return year if year >= cat.first_year else None


def resolve(sub: str) -> Target | Redirect | str | None:
    """Map the path under ``/packages/stats/`` to a target, a redirect, a static file name
    (str), or None for 404. Purely syntactic: existence is checked against the snapshot."""
    if sub in ("", "index.html"):
        cat = CATEGORIES[0]
        return Target("index", cat, "index.html")
    if sub in INDEX_PAGES:
        cat = INDEX_PAGES[sub]
        return Target("index", cat, cat.index_page)
    if sub in STATIC_FILES:
        return sub
    parts = sub.split("/")
    cat = BY_STEM.get(parts[0])
    if cat is None:
        return None
    stem, prefix = cat.stem, cat.prefix
    if len(parts) == 1:
        return Redirect(f"{stem}/", cat)
    if len(parts) == 2:
        name = parts[1]
        if name in ("", "index.html"):
            return Target("repo", cat, f"{stem}/index.html")
        files = {
            f"{prefix}_stats.tab": "cat_tab",
            f"{prefix}_pkg_stats.tab": "pkg_stats",
            f"{prefix}_pkg_scores.tab": "pkg_scores",
            f"{prefix}_packages.txt": "packages_txt",
        }
        if name in files:
            return Target(files[name], cat, f"{stem}/{name}")
        if name.startswith(prefix + "_") and name.endswith("_stats.tab"):
            year = _year(name[len(prefix) + 1 : -len("_stats.tab")], cat)
            if year is not None:
                return Target("cat_year", cat, f"{stem}/{name}", year=year)
        pkg = name[: -len(".html")] if name.endswith(".html") else name
        if _valid_name(pkg):
            return Redirect(f"{stem}/{quote(pkg)}/", cat, needs_package=pkg)
        return None
    if len(parts) == 3:
        pkg, name = parts[1], parts[2]
        if not _valid_name(pkg):
            return None
        if name in ("", "index.html"):
            return Target("package", cat, f"{stem}/{pkg}/index.html", package=pkg)
        if name == f"{pkg}_stats.tab":
            return Target("pkg_tab", cat, f"{stem}/{pkg}/{name}", package=pkg)
        if name.startswith(pkg + "_") and name.endswith("_stats.tab"):
            year = _year(name[len(pkg) + 1 : -len("_stats.tab")], cat)
            if year is not None:
                return Target("pkg_year", cat, f"{stem}/{pkg}/{name}", package=pkg, year=year)
    return None


def exists(target: Target, snap: report.Snapshot) -> bool:
    """Whether a syntactically valid target has data in this snapshot."""
    if target.kind in ("index", "repo"):
        return True
    if snap.valid_thru is None:
        return False
    ci = snap.categories[target.cat.prefix]
    if target.package is not None:
        years = ci.years.get(target.package)
        if years is None:
            return False
        return target.year is None or target.year in years
    if target.kind == "cat_year":
        return target.cat.first_year <= (target.year or 0) <= snap.valid_thru.year
    return True


def build(session: Session, target: Target, snap: report.Snapshot) -> str:
    """The body of a target (called once per data version, then cached on disk)."""
    cat = target.cat
    if target.kind == "index":
        return pages.index_page(session, snap, cat)
    if target.kind == "repo":
        return pages.repository_page(session, snap, cat)
    assert snap.valid_thru is not None
    data_year = snap.valid_thru.year
    ci = snap.categories[cat.prefix]
    if target.kind == "package":
        return pages.package_page(session, snap, cat, target.package or "")
    if target.kind == "cat_tab":
        years = report.category_years(session, cat, data_year)
        return tabfiles.category_stats_tab(years, cat.first_year, data_year)
    if target.kind == "cat_year":
        years = report.category_years(session, cat, data_year)
        year = target.year or 0
        return tabfiles.package_year_tab(year, years.get(year, {}))
    if target.kind == "pkg_stats":
        return report.pkg_stats_body(session, ci, data_year)
    if target.kind == "pkg_scores":
        scores = report.scores(session, ci, snap.valid_thru)
        return tabfiles.pkg_scores_tab((n, scores[n]) for n in ci.order)
    if target.kind == "packages_txt":
        return tabfiles.packages_txt(ci.order)
    years = report.package_years(session, cat, target.package or "", data_year)
    if target.kind == "pkg_tab":
        return tabfiles.package_stats_tab(years)
    year = target.year or 0
    return tabfiles.package_year_tab(year, years.get(year, {}))


def category_targets(snap: report.Snapshot) -> list[Target]:
    """Every page and file of the snapshot that names no package: the category text files
    (the package tables first: the heaviest builds), the index and repository pages, and
    the per-year files of each category. Named through :func:`resolve`, so the cache paths
    are the ones requests use."""
    subs: list[str] = []
    for cat in CATEGORIES:
        stem, prefix = cat.stem, cat.prefix
        subs += [f"{stem}/{prefix}_pkg_stats.tab", f"{stem}/{prefix}_pkg_scores.tab"]
    for cat in CATEGORIES:
        stem, prefix = cat.stem, cat.prefix
        subs += [cat.index_page, f"{stem}/", f"{stem}/{prefix}_stats.tab"]
        subs.append(f"{stem}/{prefix}_packages.txt")
        if snap.valid_thru is not None:
            subs += [
                f"{stem}/{prefix}_{year}_stats.tab"
                for year in range(cat.first_year, snap.valid_thru.year + 1)
            ]
    targets: dict[str, Target] = {}
    for sub in subs:
        target = resolve(sub)
        if isinstance(target, Target) and exists(target, snap):
            targets.setdefault(target.relpath, target)
    return list(targets.values())


class StatsSite:
    """Per-process state: settings, the disk cache, the current snapshot."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = DiskCache(settings.state_dir / "cache")
        self.max_age = settings.get_int("web/cache_max_age")
        self._snap: report.Snapshot | None = None
        url = settings.database_url
        self._meta_engine = create_engine(
            url,
            isolation_level="AUTOCOMMIT",
            pool_reset_on_return=None,
            pool_size=4,
            max_overflow=8,
            connect_args={"timeout": 30} if url.startswith("sqlite") else {"connect_timeout": 10},
        )
        self._lock = threading.Lock()
        self._static: dict[str, tuple[bytes, str, str, str]] = {}
        self._stamp_path = settings.state_dir / CHANGE_STAMP
        # ((version, ValidThru), change stamp before the read, monotonic time of the read)
        self._known: tuple[tuple[int, dt.date | None], tuple[int, int, int] | None, float] | None
        self._known = None

    def session(self) -> Session:
        return db.session_factory(self.settings.database_url)()

    def close(self) -> None:
        """Release the pooled meta connections (a process that is not a web worker)."""
        self._meta_engine.dispose()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._stamp_path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def known_meta(self) -> tuple[int, dt.date | None] | None:
        """(data version, ValidThru) as last read from the database, while still trusted:
        the change stamp is the one seen before that read, and the read is less than
        ``META_TTL`` old. None: the caller must call :meth:`current_meta`."""
        state = self.meta_state()
        return state[0] if state is not None and not state[1] else None

    def meta_state(self) -> tuple[tuple[int, dt.date | None], bool] | None:
        """(last read data version and ValidThru, whether ``META_TTL`` has passed since), or
        None when there was no read yet or the change stamp moved since (a change is
        committed: the old values must not be used)."""
        known = self._known
        if known is None or self._stamp() != known[1]:
            return None
        return known[0], time.monotonic() - known[2] >= META_TTL

    def current_meta(self) -> tuple[int, dt.date | None]:
        """:meth:`known_meta`, or else :meth:`fresh_meta`."""
        meta = self.known_meta()
        return meta if meta is not None else self.fresh_meta()

    def fresh_meta(self) -> tuple[int, dt.date | None]:
        """(data version, ValidThru) read from the database now, and remembered."""
        stamp = self._stamp()  # before the read: a change after it shows next time
        meta = self.meta()
        self._known = (meta, stamp, time.monotonic())
        return meta

    def known_snapshot(self, version: int, vt: dt.date | None) -> report.Snapshot | None:
        """The loaded snapshot if it is the one of this data version, else None."""
        snap = self._snap
        if snap is not None and snap.data_version == version and snap.valid_thru == vt:
            return snap
        return None

    def cached_file(
        self, target: Target, meta: tuple[int, dt.date | None], snap: report.Snapshot
    ) -> CachedFile | None:
        """The cached body of ``target`` in this data version and its response headers, or
        None (not built yet, or no such page or file: the app answers)."""
        version, vt = meta
        if not exists(target, snap):
            return None
        path = str(self.cache.version_dir(version) / target.relpath)
        try:
            size = os.stat(path).st_size
        except OSError:
            return None
        etag, last_modified = validators(version, vt, size)
        headers = [("ETag", etag), ("Cache-Control", f"public, max-age={self.max_age}")]
        if last_modified:
            headers.append(("Last-Modified", last_modified))
        ctype = HTML if target.is_page else TEXT
        full = [*headers, ("Content-Type", ctype), ("Content-Length", str(size))]
        return CachedFile(path, size, etag, last_modified, headers, full)

    def cached_answer(
        self,
        target: Target,
        meta: tuple[int, dt.date | None],
        snap: report.Snapshot,
        inm: str | None,
        ims: str | None,
    ) -> CachedAnswer | None:
        """The answer to a GET/HEAD of ``target`` if its body is in the disk cache: 304 when
        the validators match, else 200 with the open file. None: let the app answer (a miss,
        a 404, or a file pruned meanwhile)."""
        cf = self.cached_file(target, meta, snap)
        if cf is None:
            return None
        if not_modified(inm, ims, cf.etag, cf.last_modified):
            return CachedAnswer(304, cf.headers_304, None)
        try:
            return CachedAnswer(200, cf.headers_200, open(cf.path, "rb"))
        except OSError:
            return None  # pruned meanwhile: the app rebuilds

    def meta(self) -> tuple[int, dt.date | None]:
        """(data version, ValidThru): one round trip on a pooled autocommit connection (no
        ping, no reset: this runs on every request). A connection the server dropped is
        retried once on a fresh one."""
        for attempt in (0, 1):
            try:
                with self._meta_engine.connect() as conn:
                    rows = dict(conn.exec_driver_sql(META_SQL).all())
                break
            except DBAPIError as exc:
                if attempt or not exc.connection_invalidated:
                    raise
        version = int(rows.get(db.DATA_VERSION) or 0)
        vt = rows.get(db.VALID_THRU)
        return version, (dt.date.fromisoformat(vt) if vt else None)

    def snapshot(self, version: int, vt: dt.date | None) -> report.Snapshot:
        """The per-process snapshot of this data version (loaded once per version)."""
        snap = self.known_snapshot(version, vt)
        if snap is None:
            with self._lock:
                snap = self.known_snapshot(version, vt)
                if snap is None:
                    with self.session() as session:
                        snap = report.load_snapshot(session, version, vt)
                    self._snap = snap
                    # Long-lived from here on: keep it out of the collector's full scans,
                    # which would otherwise pause every request of this worker.
                    gc.freeze()
        return snap

    def build(self, target: Target, snap: report.Snapshot) -> tuple[bytes, bool]:
        """Generate one body (cache miss) from one consistent view of the database.

        On PostgreSQL the transaction is REPEATABLE READ, so every query of the build sees
        the same committed state; the data version read first in it tells whether that state
        is still the one this request was routed with (if an ETL run committed meanwhile,
        the body is served but not cached under the old version)."""
        with self.session() as session:
            if session.get_bind().dialect.name == "postgresql":
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            same = db.get_data_version(session) == snap.data_version
            return build(session, target, snap).encode(), same

    def static(self, name: str) -> tuple[bytes, str, str, str]:
        """(body, content type, etag, last modified) of a shipped asset, read once."""
        if name not in self._static:
            rel, ctype = STATIC_FILES[name]
            res = resources.files("bioc_webstats") / "static" / rel
            body = res.read_bytes()
            etag = '"s-' + hashlib.sha256(body).hexdigest()[:20] + '"'
            mtime = dt.datetime.fromtimestamp(Path(str(res)).stat().st_mtime, dt.UTC)
            self._static[name] = (body, ctype, etag, http_datetime(mtime))
        return self._static[name]


@dataclass
class WarmResult:
    """What :func:`warm` did."""

    data_version: int
    built: int = 0
    present: int = 0  # already in the cache (a web worker was first)
    moved_on: bool = False  # the data version changed meanwhile: the rest was left
    seconds: float = 0.0

    def line(self) -> str:
        text = (
            f"web warm: data version {self.data_version}, {self.built} files built, "
            f"{self.present} already cached, {self.seconds:.1f}s"
        )
        if self.moved_on:
            text += " (stopped: the data version moved on meanwhile)"
        return text


def warm(settings: Settings) -> WarmResult:
    """Build every page and file of :func:`category_targets` for the current data version
    into the disk cache the web workers serve from (same directory, names, modes and
    per-file locks), so the first requests after a statistics change do not pay the heavy
    builds. Raises OSError when the cache cannot be written and SQLAlchemyError when the
    database cannot be read."""
    t0 = time.monotonic()
    site = StatsSite(settings)
    try:
        version, vt = site.meta()
        snap = site.snapshot(version, vt)
        result = WarmResult(version)
        for target in category_targets(snap):
            if site.cache.lookup(version, target.relpath) is not None:
                result.present += 1
                continue
            got = site.cache.get_or_build(
                version, target.relpath, lambda t=target: site.build(t, snap), strict=True
            )
            if not isinstance(got, Path):  # built from a newer data version: not stored
                result.moved_on = True
                break
            result.built += 1
    finally:
        site.close()
    result.seconds = time.monotonic() - t0
    return result


def announce_change(settings: Settings) -> None:
    """Touch the change stamp (after the commit that changed the statistics), so every web
    worker reads the new data version on its next request. A failure is one log line: the
    workers then see the change within ``META_TTL`` seconds."""
    path = settings.state_dir / CHANGE_STAMP
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=settings.state_dir, prefix=".tmp-stamp-")
        with os.fdopen(fd, "w") as f:  # new inode and content each time: never the same stamp
            f.write(f"{time.time_ns()} {os.getpid()}\n")
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot touch %s (%s); the web follows within %ss", path, exc, META_TTL)


def warm_after_change(settings: Settings) -> None:
    """Announce the change, then :func:`warm` after a run that changed the statistics. A
    failure is one log line and never fails the run: the web then builds the files on first
    request, as without it."""
    announce_change(settings)
    try:
        log.info("%s", warm(settings).line())
    # Any failure, even a bug: the run's work is committed and this is only an optimisation.
    except Exception as exc:  # noqa: BLE001
        detail = getattr(exc, "orig", None) or exc
        first = (str(detail).strip().splitlines() or [type(detail).__name__])[0]
        if isinstance(exc, OSError) and exc.strerror:
            first = f"{exc.filename or ''} {exc.strerror}".strip()
        log.warning("web warm failed (pages are built on first request instead): %s", first)


def http_datetime(when: dt.datetime) -> str:
    """RFC 7231 date of an aware datetime, locale-independent."""
    when = when.astimezone(dt.UTC)
    return tabfiles.http_date(when.date()).replace("00:00:00", when.strftime("%H:%M:%S"))


def not_modified(inm: str | None, ims: str | None, etag: str, last_modified: str | None) -> bool:
    """RFC 7232: If-None-Match decides when present, else If-Modified-Since."""
    if inm is not None:
        tags = [t.strip() for t in inm.split(",")]
        return "*" in tags or etag in tags or f"W/{etag}" in tags
    if ims and last_modified:
        since = _parse_http_date(ims)
        modified = _parse_http_date(last_modified)
        return since is not None and modified is not None and modified <= since
    return False


def _is_not_modified(etag: str, last_modified: str | None) -> bool:
    return not_modified(
        request.headers.get("If-None-Match"),
        request.headers.get("If-Modified-Since"),
        etag,
        last_modified,
    )


def validators(version: int, vt: dt.date | None, size: int) -> tuple[str, str | None]:
    """(strong ETag, Last-Modified) of a generated body: the ETag follows the data version,
    the code version and the size; Last-Modified is ValidThru + 1 day, 00:00:00 GMT."""
    etag = f'"{version}-{__version__}-{size:x}"'
    return etag, (tabfiles.http_date(vt + dt.timedelta(days=1)) if vt else None)


def _parse_http_date(value: str) -> dt.datetime | None:
    from werkzeug.http import parse_date

    try:
        return parse_date(value)
    except (ValueError, OverflowError):
        return None


def _cache_headers(resp: Response, etag: str, last_modified: str | None, max_age: int) -> None:
    resp.headers["ETag"] = etag
    if last_modified:
        resp.headers["Last-Modified"] = last_modified
    resp.headers["Cache-Control"] = f"public, max-age={max_age}"


def _conditional(
    body_or_path: bytes | Path, ctype: str, etag: str, last_modified: str | None, max_age: int
) -> Response:
    """200 with the body (file served via wsgi.file_wrapper) or 304."""
    if _is_not_modified(etag, last_modified):
        resp = Response(status=304)
        _cache_headers(resp, etag, last_modified, max_age)
        return resp
    if isinstance(body_or_path, Path):
        f = open(body_or_path, "rb")
        size = os.fstat(f.fileno()).st_size
        resp = Response(wrap_file(request.environ, f, 65536), direct_passthrough=True)
        resp.call_on_close(f.close)
        resp.content_length = size
    else:
        resp = Response(body_or_path)
        resp.content_length = len(body_or_path)
    resp.headers["Content-Type"] = ctype
    _cache_headers(resp, etag, last_modified, max_age)
    return resp


def _plain(status: int, title: str, message: str) -> Response:
    root = f"{request.script_root}{PREFIX}/"
    body = pages.simple_page(title, message, status, root).encode()
    resp = Response(body, status=status, content_type=HTML)
    if status == 503:
        resp.headers["Retry-After"] = "60"
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _redirect(location: str) -> Response:
    target = f"{request.script_root}{PREFIX}/{location}"
    qs = request.query_string.decode("latin-1")
    if qs:
        target += "?" + quote(qs, safe="/?&=+%;:@,$!*'()~")
    resp = Response(status=301)
    resp.headers["Location"] = target
    return resp


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(settings: Settings) -> str:
    """``flask/log_level`` upper-cased; anything else than a logging level is a ConfigError."""
    level = (settings.get("flask/log_level") or "INFO").upper()
    if level not in LOG_LEVELS:
        raise ConfigError(
            f"parameter flask/log_level must be one of {', '.join(LOG_LEVELS)}, got {level!r}"
        )
    return level


class CachedFilesFastPath:
    """WSGI wrapper answering GET/HEAD of an already cached page or file (the common case:
    200 via wsgi.file_wrapper, or 304) without Flask's request/response machinery. Anything
    else (misses, redirects, 404s, errors) goes to the Flask app, which gives the same
    headers; the tests run through this wrapper too."""

    def __init__(self, app, site: StatsSite) -> None:
        self.app = app
        self.site = site
        self.prefix = PREFIX + "/"

    def __call__(self, environ, start_response):
        served = None
        method = environ.get("REQUEST_METHOD")
        path = environ.get("PATH_INFO", "")
        if method in ("GET", "HEAD") and path.startswith(self.prefix):
            served = self._serve(environ, start_response, method, path)
        if served is None:
            return self.app(environ, start_response)
        return served

    def _serve(self, environ, start_response, method: str, raw: str):
        try:
            path = raw.encode("latin-1").decode("utf-8")  # WSGI carries the bytes as latin-1
        except UnicodeError:
            return None
        target = fast_target(path)
        if target is None:
            return None
        site = self.site
        try:
            meta = site.current_meta()
            snap = site.snapshot(*meta)
        except SQLAlchemyError:
            return None  # the app answers 503
        answer = site.cached_answer(
            target, meta, snap, environ.get("HTTP_IF_NONE_MATCH"),
            environ.get("HTTP_IF_MODIFIED_SINCE"),
        )  # fmt: skip
        if answer is None:
            return None
        start_response("304 NOT MODIFIED" if answer.status == 304 else "200 OK", answer.headers)
        f = answer.file
        if f is None:
            return []
        if method == "HEAD":
            f.close()
            return []
        wrapper = environ.get("wsgi.file_wrapper")
        if wrapper is not None:
            return wrapper(f, 65536)
        return _iter_file(f)


def _iter_file(f):
    with f:
        while chunk := f.read(65536):
            yield chunk


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app from the effective configuration (loaded once per process)."""
    settings = settings or load_settings()
    app = Flask(__name__, static_folder=None)
    app.config["WEBSTATS"] = settings
    app.secret_key = settings.get("flask/secret_key")  # unused today (no sessions); kept set
    app.logger.setLevel(log_level(settings))
    app.url_map.merge_slashes = False
    site = StatsSite(settings)
    app.extensions["webstats"] = site

    @app.get("/healthz")
    def healthz():
        body = {
            "status": "error",
            "version": __version__,
            "database": False,
            "schema": None,
            "valid_thru": None,
        }
        try:
            status = db.schema_status(settings.database_url)
            body["database"] = True
            body["schema"] = status.revision
            if status.ok:
                with db.session_factory(settings.database_url)() as session:
                    vt = db.get_valid_thru(session)
                body["valid_thru"] = vt.isoformat() if vt else None
                body["status"] = "ok"
        except Exception:
            app.logger.warning("healthz: database check failed", exc_info=True)
        resp = jsonify(body)
        resp.headers["Cache-Control"] = "no-store"
        return resp, 200 if body["status"] == "ok" else 503

    @app.get(PREFIX)
    def prefix_redirect():
        return _redirect("")

    @app.get(PREFIX + "/", defaults={"sub": ""})
    @app.get(PREFIX + "/<path:sub>")
    def stats(sub: str):
        resolved = resolve(sub)
        if resolved is None:
            return _plain(404, "Not Found", "No such page or file.")
        if isinstance(resolved, str):
            body, ctype, etag, modified = site.static(resolved)
            return _conditional(body, ctype, etag, modified, site.max_age)
        if isinstance(resolved, Redirect) and resolved.needs_package is None:
            return _redirect(resolved.location)
        try:
            version, vt = site.meta()
            snap = site.snapshot(version, vt)
            if isinstance(resolved, Redirect):
                assert resolved.cat is not None
                if resolved.needs_package not in snap.categories[resolved.cat.prefix].years:
                    return _plain(404, "Not Found", "No such package.")
                return _redirect(resolved.location)
            target = resolved
            if not exists(target, snap):
                return _plain(404, "Not Found", "No such page or file.")
            ctype = HTML if target.is_page else TEXT
            path_or_body = site.cache.get_or_build(
                version, target.relpath, lambda: site.build(target, snap)
            )
        except SQLAlchemyError:
            app.logger.warning("database unavailable", exc_info=True)
            return _plain(503, "Service Unavailable", "The statistics database is unavailable.")
        size = path_or_body.stat().st_size if isinstance(path_or_body, Path) else len(path_or_body)
        etag, last_modified = validators(version, vt, size)
        return _conditional(path_or_body, ctype, etag, last_modified, site.max_age)

    app.wsgi_app = CachedFilesFastPath(app.wsgi_app, site)  # type: ignore[method-assign]

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = exc.code or 500
        return _plain(code, exc.name, exc.description or exc.name)

    @app.errorhandler(SQLAlchemyError)
    def db_error(_exc: SQLAlchemyError):
        return _plain(503, "Service Unavailable", "The statistics database is unavailable.")

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        app.logger.error("unexpected error", exc_info=exc)
        return _plain(500, "Internal Server Error", "Something went wrong on our side.")

    return app
