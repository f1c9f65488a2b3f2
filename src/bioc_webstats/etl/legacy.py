"""``bioc-webstats import legacy-db``: the legacy stats server's history, exactly once.

The old server kept one SQLite file per year, ``download_db_YYYY.sqlite``, with one table
``access_log`` (etl.md, "History"). Its rows go into the same ``download_records`` as log
lines, through the same ledger, by the same rule:

* the day is ``day_month_year`` (``17/Sep/2023``) as logged, the old server's local day;
* the client is the first address of ``ips`` (``1.2.3.4, 10.0.0.7`` is a proxy chain),
  hashed like a log line's ``c-ip``;
* ``url`` may be absolute and carry a query: the rule tests its path;
* the status is ``statuscode`` (``errorcode`` in files before 2020); only GET counts;
* the old parser's ``package``/``biocrepo``/``pkgtype`` are not read at all;
* rows dated on or after the cut-over day (``--until``, default ``etl/logs_since``) are the
  logs' and are skipped.

Units. A file is read in units of consecutive rowids (``UNIT_ROWS``, the last one ending at
the file's last row); each unit is one ledger row ``legacy/<file name>/rows-<lo>-<hi>`` and
one transaction with its records and queued months, like a log object. The ranges of a file
are fixed by its first import: a later import (the old server appended rows) adds units after
the last one. Reading by rowid range needs no index and no assumption about the order of
the rows; a unit's memory is bounded by its number of rows.

A unit's ETag is a fingerprint of what it gave (its records and its counts). Importing it
again gives the same fingerprint and adds nothing; a different one means its rows changed
since (the old server rewrote them, or ``--until`` moved across them): the unit is refused
and the import fails, unless ``--replace`` (then its records are replaced, as
``etl reingest`` does for a log object). When every unit of a file is in, a ledger row
``legacy/<file name>/file`` records the file's size, mtime and the cut-over day: the next
import of the same unchanged file skips it without reading it.

These ledger rows never take part in the log ETL's look-back (``ingest.log_objects``).
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import hashlib
import logging
import multiprocessing
import os
import re
import sqlite3
import struct
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..config import Settings
from ..errors import ConfigError, WebstatsError
from ..store import db
from ..store.models import IngestedObject
from . import ingest, parse, rule, sources
from .ingest import LEGACY_PREFIX, Parsed, pause_point

try:  # the per-row loop in C (setup.py); without it, the Python loop below, same results
    from . import _legacy  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a pure-Python build
    _legacy = None
# WEBSTATS_ETL_PARSER=python: the Python loop even where the C one is built (as for logs)
_FORCE_PYTHON = os.environ.get("WEBSTATS_ETL_PARSER", "") == "python"

log = logging.getLogger(__name__)

UNIT_ROWS = 200_000  # rows of a unit (a transaction); bounds a unit's memory
MAX_VALUE = 8192  # bytes: a longer url or ips is no download a client made (malformed)
REQUIRED = ("ips", "day_month_year", "method", "url")
STATUS_COLUMNS = ("statuscode", "errorcode")  # errorcode: the name before 2020

# Why a row is not a download, by code (the same codes in the C loop, _legacy.c). The first
# four are malformed rows (the ledger's "rejected"), like the malformed lines of a log.
R_DATE, R_LONG, R_STATUS, R_IPS, R_UNTIL, R_OTHER, R_PATH = range(7)
REASONS = (
    "day_month_year not a day like 17/Sep/2023",
    "url or ips longer than 8 KiB",
    "status not a number",
    "no client address in ips",
    "on or after the cut-over day",
    "not a GET with a download status",
    "not a package download path",
)
MALFORMED = (R_DATE, R_LONG, R_STATUS, R_IPS)
# method/status classes
MS_DL, MS_OTHER, MS_BAD = 0, 1, 2
DAY_BAD, DAY_UNTIL = -1, -2

_MONTHS = {m.encode(): i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
)}  # fmt: skip
_DAY = re.compile(rb"(\d\d)/([A-Z][a-z][a-z])/(\d{4})")
_SCHEME_HOST = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://[^/]*")
PG_EPOCH = dt.date(2000, 1, 1).toordinal()  # PostgreSQL's day 0 (binary COPY of a date)
CACHE_BYTES = 32 << 20  # rule caches are emptied between units past this many bytes of keys
SQLITE_MAGIC = b"SQLite format 3\x00"


class LegacyFileError(WebstatsError):
    """A file that cannot be imported (not SQLite, no access_log, truncated, corrupt)."""


# --- the rule, for one row's values --------------------------------------------------------


def day_number(raw: bytes) -> dt.date | None:
    """``17/Sep/2023`` → the date; anything else → None."""
    m = _DAY.fullmatch(raw)
    month = _MONTHS.get(m[2]) if m else None
    if month is None:
        return None
    try:
        return dt.date(int(m[3]), month, int(m[1]))  # type: ignore[index]
    except ValueError:
        return None


def url_path(url: bytes) -> bytes:
    """The path of a logged url: without ``?query`` and without ``scheme://host``."""
    cut = url.find(b"?")
    if cut >= 0:
        url = url[:cut]
    m = _SCHEME_HOST.match(url)
    return url[m.end() :] if m else url


def first_address(ips: bytes) -> bytes:
    """The client of a proxy chain ``client, proxy, …`` (the whole value if no comma)."""
    return ips.split(b",", 1)[0].strip()


class Rule:
    """The download rule as callbacks on distinct values (both loops cache the answers)."""

    def __init__(self, key: bytes, until: dt.date) -> None:
        self.until = until.toordinal() - PG_EPOCH
        self.hasher = rule.ip_hasher(key)
        self.hashes: dict[bytes, int] = {}  # first address → hash (chains share a client)
        self.hits: dict[tuple[str, str], int] = {}  # (category, package) → hit id (> 0)
        self.pairs: list[bytes] = [b""]  # hit id → b"category\tpackage"
        self.dirs: dict[bytes, Any] = {}
        self.files: dict[bytes, Any] = {}
        self.cached = 0  # bytes of keys in the caches above

    def day(self, raw: bytes) -> int:
        """The PostgreSQL day number of a day string; DAY_BAD or DAY_UNTIL."""
        day = day_number(raw)
        if day is None:
            return DAY_BAD
        n = day.toordinal() - PG_EPOCH
        return DAY_UNTIL if n >= self.until else n

    def method_status(self, method: bytes, status: bytes) -> int:
        st = rule.status_class(status)
        if st == rule.BAD:
            return MS_BAD
        return MS_DL if st == rule.DL and method == b"GET" else MS_OTHER

    def client(self, ips: bytes) -> int | None:
        """The hash of the client address, or None (no address)."""
        ip = first_address(ips)
        if ip in rule.BAD_IP:
            return None
        h = self.hashes.get(ip)
        if h is None:
            h = self.hashes[ip] = self.hasher(ip)
            self.cached += len(ip) + 64
        return h

    def url(self, url: bytes) -> int:
        """The hit id of a package download url (> 0), else 0."""
        pair = rule.classify_uri(url_path(url), self.dirs, self.files)
        if pair is None:
            return 0
        hit = self.hits.get(pair)
        if hit is None:
            hit = self.hits[pair] = len(self.pairs)
            self.pairs.append("\t".join(pair).encode("ascii"))
        self.cached += len(url)
        return hit

    def pair(self, hit: int) -> bytes:
        return self.pairs[hit]

    def outgrown(self) -> bool:
        return self.cached > CACHE_BYTES

    def reset(self) -> None:
        self.hashes.clear()
        self.hits.clear()
        del self.pairs[1:]
        self.dirs.clear()
        self.files.clear()
        self.cached = 0


# --- reading a unit ----------------------------------------------------------------------------

_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_TAIL = struct.Struct(">iqiiiq")  # ip_hash, downloads and object id 0 of a binary COPY row


@dataclass
class UnitCounts:
    """What one unit gave: rows by reason, and its records as PostgreSQL binary COPY data
    (object id 0; ``parse.with_object_id`` sets it) with the distinct (day, hit id)."""

    rows: int
    reasons: list[int]
    copy_data: bytes
    day_hits: list[tuple[int, int]]

    @property
    def downloads(self) -> int:
        return self.rows - sum(self.reasons)


def _row_prefix(pair: bytes, day: int) -> bytes:
    cat, _, pkg = pair.partition(b"\t")
    return (
        struct.pack(">hi", 6, len(cat)) + cat + struct.pack(">i", len(pkg)) + pkg
        + struct.pack(">ii", 4, day)
    )  # fmt: skip


def unit_sql(status_col: str, null_as_empty: bool) -> str:
    """The query of a unit: the five values the rule reads, by rowid range."""
    assert status_col in STATUS_COLUMNS  # never a name from the file
    cols = ("day_month_year", "method", status_col, "ips", "url")
    if null_as_empty:
        cols = tuple(f"ifnull(CAST({c} AS TEXT), '')" for c in cols)
    return f"SELECT {', '.join(cols)} FROM access_log WHERE rowid BETWEEN ? AND ?"  # noqa: S608


def open_ro(path: Path) -> sqlite3.Connection:
    """A read-only connection (the old server may still be writing the file)."""
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    con.text_factory = bytes
    return con


_READER: list[Any] = []  # (the Rule, the C reader using its callbacks) of this process
_API: list[list[int] | None] = []


def _sqlite_api() -> list[int] | None:
    """Addresses of the SQLite functions the C loop calls, in the library Python's own sqlite3
    module loaded (ctypes); None if it cannot be found (the Python loop runs then)."""
    if not _API:
        import ctypes
        import ctypes.util

        names: list[str] = []
        try:  # the very library sqlite3 uses: no second copy of SQLite in the process
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
                names += {ln.split()[-1] for ln in fh if "/libsqlite3" in ln}
        except OSError:
            pass
        names += [n for n in ("libsqlite3.so.0", ctypes.util.find_library("sqlite3")) if n]
        addresses = None
        for name in names:
            try:
                lib = ctypes.CDLL(name)
                addresses = [ctypes.cast(getattr(lib, f), ctypes.c_void_p).value or 0
                             for f in _legacy.API_NAMES]  # fmt: skip
                break
            except (OSError, AttributeError):
                continue
        _API.append(addresses)
    return _API[0]


def reader_name() -> str:
    """Which per-row loop reads units: "native" (C) or "python"."""
    if _legacy is None or _FORCE_PYTHON or _sqlite_api() is None:
        return "python"
    return "native"


def read_unit(r: Rule, path: Path, status_col: str, lo: int, hi: int) -> UnitCounts:
    """Read and count the rows ``lo``..``hi`` (rowids) of ``path``; LegacyFileError if the
    file cannot be read."""
    if reader_name() == "python":
        return read_unit_python(r, path, status_col, lo, hi)
    if not _READER or _READER[0] is not r:
        _legacy.set_api(_sqlite_api())
        reader = _legacy.Reader(r.day, r.method_status, r.client, r.url, r.pair, MAX_VALUE)
        _READER[:] = [r, reader]
    reader = _READER[1]
    if r.outgrown() or reader.cache_bytes() > CACHE_BYTES:
        r.reset()
        reader.forget()
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        rows, reasons, data, day_hits = reader.read(uri, unit_sql(status_col, False), lo, hi)
    except sqlite3.DatabaseError as exc:
        raise LegacyFileError(f"rows {lo}-{hi}: {exc}") from None
    return UnitCounts(rows, list(reasons), data, day_hits)


def read_unit_python(r: Rule, path: Path, status_col: str, lo: int, hi: int) -> UnitCounts:
    """The per-row loop in Python (the C loop in ``_legacy`` gives the same bytes)."""
    if r.outgrown():
        r.reset()
    reasons = [0] * len(REASONS)
    counts: dict[tuple[int, int, int], int] = {}  # (day, hit, ip hash) → downloads, row order
    days: dict[bytes, int] = {}
    ms: dict[tuple[bytes, bytes], int] = {}
    ips_hash: dict[bytes, int | None] = {}
    urls: dict[bytes, int] = {}
    rows = 0
    con = open_ro(path)
    try:
        cur = con.execute(unit_sql(status_col, True), (lo, hi))
        while batch := cur.fetchmany(4096):
            rows += len(batch)
            for d, m, s, ips, url in batch:
                day = days.get(d)
                if day is None:
                    day = days[d] = r.day(d)
                if day < 0:
                    reasons[R_DATE if day == DAY_BAD else R_UNTIL] += 1
                    continue
                if len(url) > MAX_VALUE or len(ips) > MAX_VALUE:
                    reasons[R_LONG] += 1
                    continue
                c = ms.get((m, s))
                if c is None:
                    c = ms[(m, s)] = r.method_status(m, s)
                if c == MS_BAD:
                    reasons[R_STATUS] += 1
                    continue
                if ips in ips_hash:
                    h = ips_hash[ips]
                else:
                    h = ips_hash[ips] = r.client(ips)
                if h is None:
                    reasons[R_IPS] += 1
                    continue
                if c != MS_DL:
                    reasons[R_OTHER] += 1
                    continue
                hit = urls.get(url)
                if hit is None:
                    hit = urls[url] = r.url(url)
                if not hit:
                    reasons[R_PATH] += 1
                    continue
                k = (day, hit, h)
                counts[k] = counts.get(k, 0) + 1
    except sqlite3.DatabaseError as exc:
        raise LegacyFileError(f"rows {lo}-{hi}: {exc}") from None
    finally:
        con.close()
    out = [_HEADER]
    prefixes: dict[tuple[int, int], bytes] = {}
    for (day, hit, h), n in counts.items():
        prefix = prefixes.get((day, hit))
        if prefix is None:
            prefix = prefixes[(day, hit)] = _row_prefix(r.pair(hit), day)
        out.append(prefix + _TAIL.pack(8, h, 4, n, 8, 0))
    out.append(b"\xff\xff")
    return UnitCounts(rows, reasons, b"".join(out), list(prefixes))


def records_of(copy_data: bytes) -> list[tuple[str, str, dt.date, int, int]]:
    """The rows of binary COPY data made here (for SQLite, which has no COPY)."""
    out = []
    p = len(_HEADER)
    view = memoryview(copy_data)
    while struct.unpack_from(">h", view, p)[0] == 6:
        (lc,) = struct.unpack_from(">i", view, p + 2)
        cat = bytes(view[p + 6 : p + 6 + lc]).decode()
        p += 6 + lc
        (lp,) = struct.unpack_from(">i", view, p)
        pkg = bytes(view[p + 4 : p + 4 + lp]).decode()
        p += 4 + lp
        _, day, _, h, _, n, _, _ = struct.unpack_from(">ii" + _TAIL.format[1:], view, p)
        p += 8 + _TAIL.size
        out.append((cat, pkg, dt.date.fromordinal(day + PG_EPOCH), h, n))
    return out


def fingerprint(counts: UnitCounts) -> str:
    """The unit's ETag: what it gives (records and counts), not how it is stored. Rows on
    or after the cut-over day are not part of it (they are not imported)."""
    h = hashlib.blake2b(counts.copy_data, digest_size=16)
    kept = [n for i, n in enumerate(counts.reasons) if i != R_UNTIL]
    h.update(repr((counts.rows - counts.reasons[R_UNTIL], kept)).encode())
    return "legacy-v1:" + h.hexdigest()


# --- the files -------------------------------------------------------------------------------


@dataclass
class LegacyFile:
    """One file given to the import, as inspected."""

    path: Path
    name: str = ""
    size: int = 0
    mtime_ns: int = 0
    status_col: str = "statuscode"
    lo: int | None = None  # rowid range of access_log
    hi: int | None = None
    units: list[tuple[int, int]] = field(default_factory=list)
    known: dict[str, str] = field(default_factory=dict)  # unit key → ETag, in the ledger
    error: str | None = None
    # what this run did
    rows: int = 0
    reasons: list[int] = field(default_factory=lambda: [0] * len(REASONS))
    imported: int = 0
    unchanged: int = 0
    replaced: int = 0
    refused: int = 0
    done: int = 0  # units handled (stored, unchanged, refused or failed)

    def etag(self, until: dt.date) -> str:
        return f"size={self.size} mtime_ns={self.mtime_ns} until={until.isoformat()}"


def unit_key(name: str, lo: int, hi: int) -> str:
    return f"{LEGACY_PREFIX}{name}/rows-{lo}-{hi}"


def file_key(name: str) -> str:
    return f"{LEGACY_PREFIX}{name}/file"


_UNIT_KEY = re.compile(r"/rows-(\d+)-(\d+)$")


def _check_header(path: Path, size: int) -> None:
    """Fail early on what is no SQLite database, or one cut short (a partial copy)."""
    if size == 0:
        raise LegacyFileError("empty file (0 bytes), not an SQLite database")
    with path.open("rb") as fh:
        head = fh.read(100)
    if len(head) < 100 or not head.startswith(SQLITE_MAGIC):
        raise LegacyFileError("not an SQLite database")
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    # The size in the header is valid when its counter matches the change counter; a WAL
    # file beside it may hold pages not in the main file yet.
    valid = head[24:28] == head[92:96]
    wal = path.with_name(path.name + "-wal")
    if valid and pages and size < page * pages and not wal.exists():
        raise LegacyFileError(
            f"truncated: its header says {page * pages} bytes, the file has {size}"
        )


def inspect(path: Path) -> LegacyFile:
    """Check a file and find its rowid range; LegacyFileError says what is wrong."""
    f = LegacyFile(path, name=path.name)
    try:
        st = path.stat()
    except OSError as exc:
        raise LegacyFileError(exc.strerror or str(exc)) from None
    if not path.is_file():
        raise LegacyFileError("not a file")
    f.size, f.mtime_ns = st.st_size, st.st_mtime_ns
    try:
        _check_header(path, f.size)
    except OSError as exc:
        raise LegacyFileError(exc.strerror or str(exc)) from None
    try:
        con = open_ro(path)
        try:
            cols = {r[1].decode().lower() for r in con.execute("PRAGMA table_info(access_log)")}
            if not cols:
                raise LegacyFileError("no table access_log")
            missing = [c for c in REQUIRED if c not in cols]
            status = [c for c in STATUS_COLUMNS if c in cols]
            if not status:
                missing.append("statuscode (or errorcode)")
            if missing:
                raise LegacyFileError(f"access_log has no column {', '.join(missing)}")
            f.status_col = status[0]
            f.lo, f.hi = con.execute("SELECT min(rowid), max(rowid) FROM access_log").fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise LegacyFileError(f"not a readable SQLite database ({exc})") from None
    return f


def plan_units(f: LegacyFile, known: list[tuple[int, int]], unit_rows: int) -> None:
    """The units to read: those already in the ledger (to check) and new ones after them."""
    f.units = sorted(known)
    if f.lo is None or f.hi is None:
        return
    start = max((hi for _, hi in known), default=f.lo - 1) + 1
    start = max(start, f.lo)
    while start <= f.hi:
        end = min(start + unit_rows - 1, f.hi)
        f.units.append((start, end))
        start = end + 1


# --- the worker side ---------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _init_worker(key: bytes, until: dt.date, copy: bool, child: bool) -> None:
    if child:
        ingest._die_with_parent()
        db.forget_inherited_connections()
    _worker.clear()
    _worker.update(rule=Rule(key, until), copy=copy)


def _read(task: tuple[str, str, str, int, int]) -> Parsed:
    """Read one unit (in a worker). Failures are returned, not raised."""
    path, name, status_col, lo, hi = task
    r: Rule = _worker["rule"]
    key, size = unit_key(name, lo, hi), hi - lo + 1
    try:
        with parse._no_cyclic_gc():
            counts = read_unit(r, Path(path), status_col, lo, hi)
    except LegacyFileError as exc:
        return Parsed(sources.LogObject(key, size, dt.datetime(1970, 1, 1)), error=str(exc))
    # name_hour: the unit's first day (informative only: no look-back reads it)
    first = dt.date.fromordinal(min((d for d, _ in counts.day_hits), default=0) + PG_EPOCH)
    hour = dt.datetime(first.year, first.month, first.day)
    out = Parsed(sources.LogObject(key, size, hour, fingerprint(counts)))
    out.lines_read = counts.rows
    out.accepted = counts.downloads
    out.rejected = sum(counts.reasons[i] for i in MALFORMED)
    out.reasons = {REASONS[i]: n for i, n in enumerate(counts.reasons) if n}
    for d, hit in counts.day_hits:
        day = dt.date.fromordinal(d + PG_EPOCH)
        cat, pkg = r.pair(hit).decode().split("\t")
        out.touched.add((cat, pkg, day.year, day.month))
    if counts.day_hits:
        out.max_day = dt.date.fromordinal(max(d for d, _ in counts.day_hits) + PG_EPOCH)
    if _worker["copy"]:
        out.copy_data, out.copy_format = counts.copy_data, "binary"
    else:
        out.rows = records_of(counts.copy_data)
    return out


def read_all(
    tasks: list[tuple[str, str, str, int, int]], key: bytes, until: dt.date, copy: bool,
    workers: int,
) -> Iterator[Parsed]:  # fmt: skip
    """Read units in the order given, in ``workers`` processes with a bounded number in
    flight (memory stays flat whatever the number of units)."""
    if workers <= 1 or len(tasks) <= 1:
        _init_worker(key, until, copy, child=False)
        for t in tasks:
            yield _read(t)
        return
    ctx = multiprocessing.get_context("fork")
    with cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(key, until, copy, True),
    ) as pool:
        pending: deque[cf.Future[Parsed]] = deque()
        todo = iter(tasks)
        for t in todo:
            pending.append(pool.submit(_read, t))
            if len(pending) >= workers * 2:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_read, nxt))
            yield result


# --- the import ----------------------------------------------------------------------------------


@dataclass
class ImportSummary(ingest.RunSummary):
    """Totals of one import (also its summary line)."""

    files: int = 0
    files_failed: int = 0
    files_skipped: int = 0
    unchanged: int = 0
    replaced: int = 0
    refused: int = 0
    until: dt.date | None = None

    def line(self, what: str = "import legacy-db") -> str:
        return (
            f"{what}: {self.files} files ({self.files_failed} failed, {self.files_skipped} "
            f"unchanged since imported), {self.objects} units imported ({self.replaced} "
            f"replaced), {self.unchanged} unchanged, {self.refused} refused, {self.lines} rows "
            f"read, {self.accepted} downloads accepted, {self.rejected} rows rejected, "
            f"{self.months} months recomputed, ValidThru {self.valid_thru or '-'}, cut-over "
            f"{self.until}, elapsed {self.elapsed:.1f}s (read {self.t_read:.1f}s, store "
            f"{self.t_store:.1f}s, recompute {self.t_recompute:.1f}s)"
        )


def cutover_day(settings: Settings, until: str | None) -> dt.date:
    """``--until``, else ``etl/logs_since``; neither: refused (a day would count twice)."""
    value, where = until, "--until"
    if value is None:
        value, where = settings.get("etl/logs_since"), "etl/logs_since (WEBSTATS_ETL_LOGS_SINCE)"
    if not value:
        raise ConfigError(
            "import legacy-db: no cut-over day: give --until YYYY-MM-DD or set etl/logs_since "
            "(WEBSTATS_ETL_LOGS_SINCE); rows from that day on are the logs', and without it "
            "days would be counted twice"
        )
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{where} {value!r}: expected a date YYYY-MM-DD") from None


def _ledger(session: Session, name: str) -> tuple[str | None, dict[str, str]]:
    """The file row's ETag and {unit key: ETag} of a file name."""
    io = IngestedObject
    prefix = f"{LEGACY_PREFIX}{name}/"
    rows = session.execute(
        select(io.key, io.etag).where(io.key.startswith(prefix, autoescape=True))
    ).all()
    units = {k: e or "" for k, e in rows if _UNIT_KEY.search(k)}
    return next((e for k, e in rows if k == file_key(name)), None), units


def _record_file(settings: Settings, f: LegacyFile, until: dt.date) -> None:
    """The file's row: every unit is in; its size/mtime let the next import skip it."""
    values = {
        "etag": f.etag(until),
        "size": f.size,
        "name_hour": dt.datetime(1970, 1, 1),
        "lines_read": f.rows,
        "accepted": f.rows - sum(f.reasons),
        "rejected": sum(f.reasons[i] for i in MALFORMED),
        "ingested_at": dt.datetime.now(dt.UTC),
    }
    with db.session_factory(settings.database_url).begin() as session:
        row = session.scalar(select(IngestedObject).where(IngestedObject.key == file_key(f.name)))
        if row is None:
            session.add(IngestedObject(key=file_key(f.name), **values))
        else:
            for k, v in values.items():
                setattr(row, k, v)
    pause_point("file_recorded")


def _file_line(f: LegacyFile, until: dt.date) -> str:
    malformed = sum(f.reasons[i] for i in MALFORMED)
    why = ", ".join(f"{REASONS[i]}: {f.reasons[i]}" for i in MALFORMED if f.reasons[i])
    return (
        f"{f.name}: {f.rows} rows read in {f.done} units ({f.imported} imported, "
        f"{f.replaced} replaced, {f.unchanged} unchanged, {f.refused} refused), "
        f"{f.rows - sum(f.reasons)} downloads; skipped {malformed} malformed"
        f"{f' ({why})' if why else ''}, {f.reasons[R_UNTIL]} dated on or after {until}, "
        f"{f.reasons[R_OTHER]} not a GET with a download status, {f.reasons[R_PATH]} not a "
        f"package download path"
    )


def import_files(
    settings: Settings,
    paths: list[str],
    until: str | None = None,
    replace: bool = False,
    unit_rows: int | None = None,
) -> bool:
    """Import legacy databases; False when any file failed (the others are imported)."""
    t0 = time.monotonic()
    if unit_rows is None:  # WEBSTATS_LEGACY_UNIT_ROWS: environment only (tests, tuning)
        raw = os.environ.get("WEBSTATS_LEGACY_UNIT_ROWS") or str(UNIT_ROWS)
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"WEBSTATS_LEGACY_UNIT_ROWS {raw!r}: expected a number of rows")
        unit_rows = int(raw)
    until_day = cutover_day(settings, until)
    key = ingest.ip_hash_key(settings, settings.get("etl/s3_download_logs") or "")
    summary = ImportSummary(until=until_day)
    sf = db.session_factory(settings.database_url)
    copy = sf.kw["bind"].dialect.name == "postgresql"
    files: list[LegacyFile] = []
    for p in dict.fromkeys(paths):  # each path once
        summary.files += 1
        try:
            f = inspect(Path(p))
        except LegacyFileError as exc:
            summary.files_failed += 1
            summary.failures.append(p)
            log.error("%s: %s; not imported", p, exc)
            continue
        with sf() as session:
            file_etag, known = _ledger(session, f.name)
        if file_etag == f.etag(until_day):
            summary.files_skipped += 1
            log.info("%s: imported before and unchanged since (%s): skipped", p, file_etag)
            continue
        ranges = []
        for k in known:
            m = _UNIT_KEY.search(k)
            ranges.append((int(m[1]), int(m[2])))  # type: ignore[index]
        plan_units(f, ranges, unit_rows)
        f.known = known
        files.append(f)
    tasks = [(str(f.path), f.name, f.status_col, lo, hi) for f in files for lo, hi in f.units]
    owner = [f for f in files for _ in f.units]
    log.info(
        "import legacy-db: %d of %d files to read, %d units (%d rows at most), with the %s "
        "reader in %d processes; cut-over day %s",
        len(files), summary.files, len(tasks), sum(hi - lo + 1 for *_, lo, hi in tasks),
        reader_name(), min(ingest._workers(settings), max(1, len(tasks))), until_day,
    )  # fmt: skip
    pause_point("legacy_planned")
    for f in files:
        if not f.units:
            _finish_file(settings, f, until_day, summary)
    progress = ingest.Progress(len(tasks), sum(hi - lo + 1 for *_, lo, hi in tasks))
    workers = min(ingest._workers(settings), max(1, len(tasks)))
    queued: set[tuple[str, str, int, int]] = set()
    results = read_all(tasks, key, until_day, copy, workers)
    for f, task in zip(owner, tasks, strict=True):
        t1 = time.monotonic()
        parsed = next(results)
        t2 = time.monotonic()
        summary.t_read += t2 - t1
        pause_point("unit_parsed")
        _store_unit(sf, f, parsed, replace, queued, summary)
        summary.t_store += time.monotonic() - t2
        f.done += 1
        progress.update(task[4] - task[3] + 1, parsed.lines_read)
        if f.done == len(f.units):
            _finish_file(settings, f, until_day, summary)
    ingest.finish_run(settings, summary)
    summary.elapsed = time.monotonic() - t0
    log.info("%s", summary.line())
    return summary.files_failed == 0


def _store_unit(
    sf: Any,
    f: LegacyFile,
    parsed: Parsed,
    replace: bool,
    queued: set[tuple[str, str, int, int]],
    summary: ImportSummary,
) -> None:
    k = parsed.obj.key
    if f.error is not None:  # an earlier unit of the file failed: the file is done for
        return
    if parsed.error:
        f.error = parsed.error
        log.error("%s: %s; its other units are not imported", f.path, parsed.error)
        return
    f.rows += parsed.lines_read
    for i, why in enumerate(REASONS):
        f.reasons[i] += parsed.reasons.get(why, 0)
    before = f.known.get(k)
    if before == parsed.obj.etag:
        f.unchanged += 1
        summary.unchanged += 1
        return
    if before is not None and not replace:
        f.refused += 1
        summary.refused += 1
        log.error(
            "%s: rows %s changed since they were imported (%s, now %s); not imported: "
            "'import legacy-db --replace' replaces their records",
            f.path, k.rsplit("/rows-", 1)[1], before, parsed.obj.etag,
        )  # fmt: skip
        return
    store = ingest.store_replacement if before is not None else ingest.store_new
    try:
        with sf.begin() as session:
            store(session, parsed, queued)
    except IntegrityError:  # another import stored it meanwhile
        log.warning("%s: already in the ledger, skipped", k)
        return
    pause_point("unit_committed")
    queued |= parsed.touched
    if before is not None:
        f.replaced += 1
        summary.replaced += 1
    else:
        f.imported += 1
    summary.objects += 1
    summary.lines += parsed.lines_read
    summary.accepted += parsed.accepted
    summary.rejected += parsed.rejected


def _finish_file(settings: Settings, f: LegacyFile, until: dt.date, summary: ImportSummary) -> None:
    if f.error is None and not f.refused:
        _record_file(settings, f, until)
        log.info("%s", _file_line(f, until))
        return
    summary.files_failed += 1
    summary.failures.append(str(f.path))
    if f.error is None:
        log.error("%s; %s: not complete (refused units above)", _file_line(f, until), f.path)
