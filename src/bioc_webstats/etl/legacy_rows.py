"""A legacy database's rows → downloads per (category, package, day, client): the rule applied
to one unit (a range of rowids) of ``access_log``, in the import's reader processes.

Two loops with the same results, byte for byte: the C one (``_legacy``, SQLite read through
its C API) and the Python one (``read_unit_python``, Python's sqlite3 module). Every decision
of the rule is :class:`Rule`'s (the C loop calls it once per distinct value and caches the
answer). A unit's records come out as PostgreSQL binary COPY data (object id 0), in the order
their first row was read, so that the same rows always give the same bytes (the unit's
fingerprint, its ETag in the ledger).

This module imports little (no SQLAlchemy): the reader processes are fresh interpreters that
load only it (``_reader_boot``), not forks of the importing process.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import pickle
import queue
import re
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WebstatsError
from ..proc import die_with_parent, keep_memory_private
from . import parse, rule

try:  # the per-row loop in C (setup.py); without it, the Python loop below, same results
    from . import _legacy  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a pure-Python build
    _legacy = None
# WEBSTATS_ETL_PARSER=python: the Python loop even where the C one is built (as for logs)
_FORCE_PYTHON = os.environ.get("WEBSTATS_ETL_PARSER", "") == "python"

MAX_VALUE = rule.MAX_URI  # bytes: a longer url or ips is no request a client made (malformed)
# bytes: SQLite loads no longer value of a row it reads (SQLITE_LIMIT_LENGTH; its default, 1 GB,
# would be held whole); such a row is over-long (R_LONG), whichever of the five values it is.
# (It bounds the schema's text too, which SQLite reads as a value: a real one is a few KB.)
LOAD_MAX = 4 << 20
STATUS_COLUMNS = ("statuscode", "errorcode")  # errorcode: the name before 2020
# A file with both (a column added, not renamed): a row's errorcode where it has no statuscode.
STATUS_BOTH = "coalesce(nullif(statuscode, ''), errorcode)"
ROWID_NAMES = ("rowid", "_rowid_", "oid")  # SQLite's names of it; a column hides one

# Why a row is not a download, by code (the same codes in the C loop, _legacy.c). The first
# four are malformed rows (the ledger's "rejected"), like the malformed lines of a log.
R_DATE, R_LONG, R_STATUS, R_IPS, R_UNTIL, R_OTHER, R_PATH = range(7)
REASONS = (
    "day_month_year not a day like 17/Sep/2023 (from 2000 on)",
    "too long (url or ips over 8 KiB, any value over 4 MiB)",
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
KEY_CACHE_MAX = rule.KEY_CACHE_MAX  # longer values are decided every time, never cached
# The rule caches of all reader processes together: a reader empties its own between units
# past its share. A share below a year's distinct values (24 MB for bench-history's 10 M
# rows) means emptying them every unit or two and asking Python again: 12.6 s of reading
# instead of 8.0 s there at 16 MB.
CACHE_BUDGET = 48 << 20


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


# An element of a chain that is an address, with a port a proxy may have added: IPv4, or IPv6
# in brackets; a bare IPv6 (colons) is one when ipaddress says so.
_IPV4 = re.compile(rb"([0-9]{1,3}(?:\.[0-9]{1,3}){3})(?::[0-9]{1,5})?")
_IPV6 = re.compile(rb"\[([0-9A-Fa-f:.]+)\](?::[0-9]{1,5})?|([0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)")


def _address(item: bytes) -> bytes | None:
    """The address of one element of a chain without its port or brackets, or None (a host
    name, an identifier)."""
    if m := _IPV4.fullmatch(item):
        return m[1]
    if m := _IPV6.fullmatch(item):
        candidate = m[1] or m[2]
        try:
            ipaddress.IPv6Address(candidate.decode("ascii"))
        except ValueError:
            return None
        return candidate
    return None


# What a proxy writes for a client it does not know (``-``, as a log's c-ip: rule.BAD_IP).
_UNKNOWN = b"unknown"


def first_address(ips: bytes) -> bytes:
    """The client of a proxy chain ``client, proxy, …`` (also separated by blanks only): its
    first element, placeholders (``unknown``, ``-``, empty) passed over, as logged but for a
    port (``1.2.3.4:5678``) or IPv6's brackets (``[2001:db8::1]:443``) around an address. A
    chain of placeholders only: ``unknown`` is one client, like a host name (its downloads
    counted); ``-`` or nothing is none (b"")."""
    items = [i for i in ips.replace(b",", b" ").split() if i not in rule.BAD_IP]
    first = next((i for i in items if i.lower() != _UNKNOWN), items[0] if items else b"")
    return _address(first) or first


class Rule:
    """The download rule as callbacks on distinct values (both loops cache the answers)."""

    def __init__(self, key: bytes, until: dt.date, cache_bytes: int = CACHE_BUDGET) -> None:
        self.until = until.toordinal() - PG_EPOCH
        self.cache_bytes = cache_bytes  # both loops empty their caches past this
        self.hasher = rule.ip_hasher(key)
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
        if n < 0:  # before 2000: no day of the old server (2009 on); the codes are negative
            return DAY_BAD
        return DAY_UNTIL if n >= self.until else n

    def method_status(self, method: bytes, status: bytes) -> int:
        st = rule.status_class(status)
        if st == rule.BAD:
            return MS_BAD
        return MS_DL if st == rule.DL and method == b"GET" else MS_OTHER

    def client(self, ips: bytes) -> int | None:
        """The hash of the client address, or None (no address)."""
        ip = first_address(ips)
        if ip in rule.BAD_IP or len(ip) > rule.MAX_IP:  # (no address is that long)
            return None
        return self.hasher(ip)  # (both loops cache the answer per ips value)

    def url(self, url: bytes) -> int:
        """The hit id of a package download url (> 0), else 0."""
        held = len(self.dirs) + len(self.files)
        pair = rule.classify_uri(url_path(url), self.dirs, self.files)
        if len(self.dirs) + len(self.files) > held:  # a half kept, of at most the url's bytes
            self.cached += len(url)
        if pair is None:
            return 0
        hit = self.hits.get(pair)
        if hit is None:
            hit = self.hits[pair] = len(self.pairs)
            self.pairs.append("\t".join(pair).encode("ascii"))
        return hit

    def pair(self, hit: int) -> bytes:
        return self.pairs[hit]

    def outgrown(self) -> bool:
        return self.cached > self.cache_bytes

    def reset(self) -> None:
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


def unit_sql(
    status_col: str, null_as_empty: bool, rowid: str = "rowid", with_rowid: bool = False
) -> str:
    """The query of a unit: the five values the rule reads (and the rowid), by rowid range,
    in rowid order."""
    # never a name from the file
    assert status_col in (*STATUS_COLUMNS, STATUS_BOTH) and rowid in ROWID_NAMES
    cols: tuple[str, ...] = ("day_month_year", "method", status_col, "ips", "url")
    if null_as_empty:
        cols = tuple(f"ifnull(CAST({c} AS TEXT), '')" for c in cols)
    if with_rowid:
        cols += (rowid,)
    return (
        f"SELECT {', '.join(cols)} FROM access_log WHERE {rowid} BETWEEN ? AND ? "  # noqa: S608
        f"ORDER BY {rowid}"
    )


def seek_sql(rowid: str = "rowid") -> str:
    """The rowid of the row after the first ?3 rows of the range ?1..?2 (the one SQLite
    refused to load): rowids only, no value of the row is read."""
    assert rowid in ROWID_NAMES
    return (
        f"SELECT {rowid} FROM access_log WHERE {rowid} BETWEEN ? AND ? "  # noqa: S608
        f"ORDER BY {rowid} LIMIT 1 OFFSET ?"
    )


def open_ro(path: Path) -> sqlite3.Connection:
    """A read-only connection (the old server may still be writing the file)."""
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    con.text_factory = bytes
    # Before the first statement, which parses the file's schema: a CREATE TABLE holding a
    # 400 MB comment took 880 MB; over LOAD_MAX it is SQLITE_TOOBIG, as an over-long value.
    con.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, LOAD_MAX)
    con.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, LOAD_MAX)
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


def read_unit(
    r: Rule, path: Path, status_col: str, lo: int, hi: int, rowid: str = "rowid"
) -> UnitCounts:
    """Read and count the rows ``lo``..``hi`` (rowids, named ``rowid`` in SQL) of ``path``;
    LegacyFileError if the file cannot be read."""
    if reader_name() == "python":
        return read_unit_python(r, path, status_col, lo, hi, rowid)
    if not _READER or _READER[0] is not r:
        _legacy.set_api(_sqlite_api())
        reader = _legacy.Reader(
            r.day, r.method_status, r.client, r.url, r.pair, MAX_VALUE, KEY_CACHE_MAX
        )
        _READER[:] = [r, reader]
    reader = _READER[1]
    if r.outgrown() or reader.cache_bytes() > r.cache_bytes:
        r.reset()
        reader.forget()
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        rows, reasons, data, day_hits = reader.read(
            uri, unit_sql(status_col, False, rowid), seek_sql(rowid), lo, hi, LOAD_MAX
        )
    except sqlite3.DatabaseError as exc:
        raise LegacyFileError(f"rows {lo}-{hi}: {exc}") from None
    return UnitCounts(rows, list(reasons), data, day_hits)


def read_unit_python(
    r: Rule, path: Path, status_col: str, lo: int, hi: int, rowid: str = "rowid"
) -> UnitCounts:
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
        for row in _unit_rows(con, status_col, rowid, lo, hi):
            rows += 1
            if row is None:  # a value SQLite would not load
                reasons[R_LONG] += 1
                continue
            d, m, s, ips, url = row
            day = days.get(d)
            if day is None:
                day = r.day(d)
                if len(d) <= KEY_CACHE_MAX:  # (no cache keeps a long value)
                    days[d] = day
            if day < 0:
                reasons[R_DATE if day == DAY_BAD else R_UNTIL] += 1
                continue
            if len(url) > MAX_VALUE or len(ips) > MAX_VALUE:
                reasons[R_LONG] += 1
                continue
            c = ms.get((m, s))
            if c is None:
                c = r.method_status(m, s)
                if len(m) + len(s) <= KEY_CACHE_MAX:
                    ms[(m, s)] = c
            if c == MS_BAD:
                reasons[R_STATUS] += 1
                continue
            if ips in ips_hash:
                h = ips_hash[ips]
            else:
                h = r.client(ips)
                if len(ips) <= KEY_CACHE_MAX:
                    ips_hash[ips] = h
            if h is None:
                reasons[R_IPS] += 1
                continue
            if c != MS_DL:
                reasons[R_OTHER] += 1
                continue
            hit = urls.get(url)
            if hit is None:
                hit = r.url(url)
                if len(url) <= KEY_CACHE_MAX:
                    urls[url] = hit
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


def _unit_rows(
    con: sqlite3.Connection, status_col: str, rowid: str, lo: int, hi: int
) -> Iterator[list[bytes] | None]:
    """The rows ``lo``..``hi`` one at a time, as the C loop (a batch of rows would be unbounded
    in bytes); a row with a value SQLite refuses to load (over LOAD_MAX) is given as None, and
    the rows after it as usual."""
    scan = unit_sql(status_col, True, rowid, with_rowid=True)
    start = lo
    while start <= hi:
        try:
            for *row, at in con.execute(scan, (start, hi)):
                start = at + 1
                yield row
            return
        except sqlite3.DataError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_TOOBIG:
                raise
        # sqlite3 steps one row ahead: the row after the last one given is either the one
        # refused or one dropped with the error of the next. Read it alone (LIMIT 1).
        try:
            got = con.execute(scan + " LIMIT 1", (start, hi)).fetchall()
        except sqlite3.DataError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_TOOBIG:
                raise
            found = con.execute(seek_sql(rowid), (start, hi, 0)).fetchone()
            if found is None:
                raise
            start = found[0] + 1
            yield None
            continue
        if not got:
            return
        *row, at = got[0]
        start = at + 1
        yield row


def fingerprint(counts: UnitCounts) -> str:
    """The unit's ETag: what it gives (records and counts), not how it is stored. Rows on
    or after the cut-over day are not part of it (they are not imported)."""
    h = hashlib.blake2b(counts.copy_data, digest_size=16)
    kept = [n for i, n in enumerate(counts.reasons) if i != R_UNTIL]
    h.update(repr((counts.rows - counts.reasons[R_UNTIL], kept)).encode())
    return "legacy-v1:" + h.hexdigest()


# --- the reader processes ------------------------------------------------------------------


@dataclass
class UnitResult:
    """One unit read (what crosses from a reader process to the importing one)."""

    key: str
    size: int  # the ledger's size: rows read (a span of rowids may pass BIGINT: 2**64)
    name_hour: dt.datetime  # the unit's first day (informative: no look-back reads it)
    etag: str | None = None  # the fingerprint
    rows: int = 0
    reasons: list[int] = field(default_factory=lambda: [0] * len(REASONS))
    copy_data: bytes = b""
    touched: set[tuple[str, str, int, int]] = field(default_factory=set)
    max_day: dt.date | None = None
    error: str | None = None

    @property
    def downloads(self) -> int:
        return self.rows - sum(self.reasons)

    @property
    def malformed(self) -> int:
        return sum(self.reasons[i] for i in MALFORMED)


_worker: dict[str, Any] = {}


def _return_big_buffers() -> None:
    # glibc raises its mmap threshold each time a big block is freed; a unit's buffers (a few
    # MB, every unit) then stay in the heap and RSS creeps up. A fixed threshold gives them
    # back to the system when freed.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


def _init_worker(key: bytes, until: dt.date, cache_bytes: int = CACHE_BUDGET) -> None:
    _worker.clear()
    _worker["rule"] = Rule(key, until, cache_bytes)


def serve() -> None:
    """A reader process (``python -m bioc_webstats.etl._reader_boot``): (key, cut-over day,
    Python loop?, cache share in bytes) then tasks on stdin, one pickled UnitResult per task
    on stdout, until stdin closes. The key comes through the pipe, never the command line."""
    global _FORCE_PYTHON
    keep_memory_private()  # the key arrives below
    die_with_parent()
    _return_big_buffers()
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write into the results
    try:
        # pickle between this process and its parent only: both ends are ours
        key, until, _FORCE_PYTHON, cache_bytes = pickle.load(inp)  # noqa: S301
        _init_worker(key, until, cache_bytes)
        while True:
            result = read_task(pickle.load(inp))  # noqa: S301
            pickle.dump(result, out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()
    except (EOFError, BrokenPipeError):  # the importing process is done, or gone
        return


def read_task(task: tuple[str, str, tuple[str, str], int, int]) -> UnitResult:
    """Read one unit: (ledger key, path, (status column, rowid name), first rowid, last
    rowid). Failures are returned, not raised."""
    key, path, (status_col, rowid), lo, hi = task
    r: Rule = _worker["rule"]
    try:
        with parse._no_cyclic_gc():
            counts = read_unit(r, Path(path), status_col, lo, hi, rowid)
    except LegacyFileError as exc:
        return UnitResult(key, 0, dt.datetime(1970, 1, 1), error=str(exc))
    days = [d for d, _ in counts.day_hits]
    first = dt.date.fromordinal(min(days, default=0) + PG_EPOCH)
    out = UnitResult(
        key, counts.rows, dt.datetime(first.year, first.month, first.day), fingerprint(counts),
        counts.rows, counts.reasons, counts.copy_data,
    )  # fmt: skip
    for d, hit in counts.day_hits:
        day = dt.date.fromordinal(d + PG_EPOCH)
        cat, pkg = r.pair(hit).decode().split("\t")
        out.touched.add((cat, pkg, day.year, day.month))
    if days:
        out.max_day = dt.date.fromordinal(max(days) + PG_EPOCH)
    return out


AHEAD = 2  # units a reader may have read and not yet taken by the importing process


class _Reader:
    """One reader process, its two pipes, and a thread that takes its results as soon as
    they come (into a queue of AHEAD) and hands it its next task: the reader works on while
    the importing process writes, instead of waiting for it at the pipe."""

    def __init__(self, key: bytes, until: dt.date, tasks: list[Any], cache_bytes: int) -> None:
        env = dict(os.environ)
        # the package of this very module, whatever the working directory or install
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"{__package__}._reader_boot"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.inp, self.out = self.proc.stdin, self.proc.stdout
        self.results: queue.Queue[UnitResult | BaseException] = queue.Queue(AHEAD)
        self.tasks = tasks
        self.closing = False
        self.send((key, until, _FORCE_PYTHON, cache_bytes))
        for t in tasks[:2]:  # one to read, one waiting
            self.send(t)
        self.thread = threading.Thread(target=self._take, daemon=True)
        self.thread.start()

    def send(self, obj: Any) -> None:
        pickle.dump(obj, self.inp, protocol=pickle.HIGHEST_PROTOCOL)
        self.inp.flush()

    def _take(self) -> None:
        try:
            for i in range(len(self.tasks)):
                try:
                    result = pickle.load(self.out)  # noqa: S301 - from our own reader
                except EOFError:
                    if self.closing:
                        return
                    code = self.proc.wait()
                    raise WebstatsError(
                        f"import legacy-db: a reader process died (exit status {code})"
                    ) from None
                if self.closing:  # nobody takes it any more: drop it, read on to the end
                    continue
                if i + 2 < len(self.tasks):
                    self.send(self.tasks[i + 2])
                self.results.put(result)
        except BaseException as exc:  # noqa: BLE001 - handed to the importing thread
            if not self.closing:
                self.results.put(exc)

    def receive(self) -> UnitResult:
        result = self.results.get()
        if isinstance(result, BaseException):
            if isinstance(result, WebstatsError):
                raise result
            raise WebstatsError(f"import legacy-db: reader: {result}")
        return result

    def close(self) -> None:
        """End the reader: no more tasks (its stdin closes), what it still sends is dropped;
        killed if it does not exit within 30 s."""
        self.closing = True
        try:
            self.inp.close()
        except OSError:
            pass
        while True:  # a result waiting for room in the queue: let the thread drop the rest
            try:
                self.results.get_nowait()
            except queue.Empty:
                break
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(30)
        self.out.close()


def read_all(
    tasks: list[tuple[str, str, tuple[str, str], int, int]],
    key: bytes,
    until: dt.date,
    workers: int,
) -> Iterator[UnitResult]:
    """Units read in the order given, by ``workers`` reader processes (0: in this process).
    Task i goes to reader i mod n, which answers its tasks in order; each is at most AHEAD
    units ahead, so memory stays flat whatever the number of units.

    Readers are fresh interpreters that import only this module, not forks of the importing
    process: they neither inherit nor copy its memory. They die with it (and otherwise at
    the end of their stdin)."""
    if workers <= 0 or not tasks:
        _init_worker(key, until)
        for t in tasks:
            yield read_task(t)
        return
    readers: list[_Reader] = []
    try:
        n = min(workers, len(tasks))
        for r in range(n):
            readers.append(_Reader(key, until, tasks[r::n], CACHE_BUDGET // n))
        for i in range(len(tasks)):
            yield readers[i % n].receive()
    finally:
        for r in readers:
            r.close()
