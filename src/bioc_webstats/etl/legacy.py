"""``bioc-webstats import legacy-db``: the legacy stats server's history, exactly once.

The old server kept one SQLite file per year, ``download_db_YYYY.sqlite``, with one table
``access_log`` (etl.md, "History"). Its rows go into the same ``download_records`` as log
lines, through the same ledger, by the same rule:

* the day is ``day_month_year`` (``17/Sep/2023``) as logged, the old server's local day;
* the client is the first address of ``ips`` (``1.2.3.4, 10.0.0.7`` is a proxy chain),
  hashed like a log line's ``c-ip``;
* ``url`` may be absolute and carry a query: the rule tests its path;
* the status is ``statuscode`` (``errorcode`` in files before 2020; with both, ``errorcode``
  where ``statuscode`` is empty); only GET counts;
* the old parser's ``package``/``biocrepo``/``pkgtype`` are not read at all;
* rows dated on or after the cut-over day (``--until``, default ``etl/logs_since``) are the
  logs' and are skipped.

Units. A file is read in units of consecutive rowids (``UNIT_ROWS`` of them from a row, or as
many as hold ``UNIT_ROWS // 100`` rows where the rowids are sparse; the next unit starts at the
next row, so gaps cost no units; the last one ends at the file's last row); each unit is one
ledger row ``legacy/<file name>/rows-<lo>-<hi>`` and one transaction with its records and
queued months, like a log object. The ranges of a file are fixed by its first import: a later
import (the old server appended rows) adds units after the last one. Reading by rowid range
needs no index and no assumption about the order of the rows; a unit's memory is bounded by its
number of rows.

A unit's ETag is a fingerprint of what it gave (its records and its counts). Importing it
again gives the same fingerprint and adds nothing; a different one means its rows changed
since (the old server rewrote them, or ``--until`` moved across them): the unit is refused
and the import fails, unless ``--replace`` (then its records are replaced, as
``etl reingest`` does for a log object). When every unit of a file is in, a ledger row
``legacy/<file name>/file`` records the file's size, mtime (and its ``-wal`` file's, whose
rows are the database's too) and the cut-over day: the next import of the same unchanged
file skips it without reading it. ``legacy/<file name>/head`` keeps fingerprints of its first
rows: a file under another name that begins with them is a copy or another backup of it, and
is refused (its downloads would count twice).

These ledger rows never take part in the log ETL's look-back (``ingest.log_objects``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..config import Settings
from ..errors import ConfigError
from ..files import is_text, open_regular, shown
from ..store import db
from ..store.models import IngestedObject
from . import ingest, sources
from .ingest import LEGACY_PREFIX, Parsed, pause_point
from .legacy_rows import (
    LOAD_MAX,
    MALFORMED,
    R_OTHER,
    R_PATH,
    R_UNTIL,
    REASONS,
    ROWID_NAMES,
    STATUS_BOTH,
    STATUS_COLUMNS,
    LegacyFileError,
    UnitResult,
    open_ro,
    read_all,
    reader_name,
)

log = logging.getLogger(__name__)
# The legacy server's first file (download_db_2009.sqlite): a cut-over day on or before it
# imports nothing (a typo: 2006 for 2026), and moving it later then refuses every unit.
HISTORY_START = dt.date(2009, 1, 1)

UNIT_ROWS = 100_000  # rows of a unit (a transaction); bounds a unit's memory
REQUIRED = ("ips", "day_month_year", "method", "url")
SQLITE_MAGIC = b"SQLite format 3\x00"

# --- the files -------------------------------------------------------------------------------


@dataclass
class LegacyFile:
    """One file given to the import, as inspected."""

    path: Path
    name: str = ""
    size: int = 0
    mtime_ns: int = 0
    wal: str = ""  # the -wal file beside it (its rows are the database's too): size, mtime
    status_col: str = "statuscode"
    rowid: str = "rowid"  # its name in SQL (a column of the table may hide "rowid")
    lo: int | None = None  # rowid range of access_log
    hi: int | None = None
    units: list[tuple[int, int]] = field(default_factory=list)
    known: dict[str, str] = field(default_factory=dict)  # unit key → ETag, in the ledger
    until_before: str | None = None  # the cut-over day it was imported with, if it was
    heads: dict[int, str] = field(default_factory=dict)  # fingerprints of its first rows
    heads_kept: bool = False  # in the ledger as they are now
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
        wal = f" wal={self.wal}" if self.wal else ""
        return f"size={self.size} mtime_ns={self.mtime_ns}{wal} until={until.isoformat()}"


def unit_key(name: str, lo: int, hi: int) -> str:
    return f"{LEGACY_PREFIX}{name}/rows-{lo}-{hi}"


def file_key(name: str) -> str:
    return f"{LEGACY_PREFIX}{name}/file"


def heads_key(name: str) -> str:
    return f"{LEGACY_PREFIX}{name}/head"


_UNIT_KEY = re.compile(r"/rows-(-?[0-9]+)-(-?[0-9]+)$")  # (a rowid may be negative)

# A copy of a database, or an older or newer backup of it, begins with the same rows, wherever
# its units' ranges fall (they are fixed by each file's first import): fingerprints of a file's
# first rows, by how many, tell one under another name. Values are cut at HEAD_VALUE bytes (a
# hostile row holds no memory).
HEAD_SIZES = (1, 10, 100, 1000)
HEAD_VALUE = 4096


def read_heads(f: LegacyFile) -> dict[int, str]:
    """{n: fingerprint of the first n rows in rowid order} for the sizes the file has."""
    cut = ", ".join(
        f"substr({c}, 1, {HEAD_VALUE})"
        for c in ("ips", "day_month_year", "method", "url", f.status_col)
    )
    rowids = f"SELECT {f.rowid} FROM access_log ORDER BY {f.rowid} LIMIT {HEAD_SIZES[-1]}"  # noqa: S608
    one = f"SELECT {cut} FROM access_log WHERE {f.rowid} = ?"  # noqa: S608
    out: dict[int, str] = {}
    h = hashlib.blake2b(digest_size=12)
    try:
        con = open_ro(f.path)
        try:
            # a row at a time, by rowid (no value read to find them): a cursor steps a row
            # ahead, and one it cannot load would take the row before with it
            for i, (rowid,) in enumerate(con.execute(rowids).fetchall(), 1):
                h.update(
                    repr(con.execute(one, (rowid,)).fetchone()).encode("utf-8", "backslashreplace")
                )
                if i in HEAD_SIZES:
                    out[i] = h.hexdigest()
        finally:
            con.close()
    except sqlite3.DataError as exc:
        if exc.sqlite_errorcode != sqlite3.SQLITE_TOOBIG:
            raise _unreadable(f.path, exc) from None
        # a value over LOAD_MAX (an over-long row, to the readers): the rows before it say it
    except sqlite3.DatabaseError as exc:
        raise _unreadable(f.path, exc) from None
    return out


def _heads_text(heads: dict[int, str]) -> str:
    return " ".join(f"{n}:{v}" for n, v in sorted(heads.items()))


def _parse_heads(text: str | None) -> dict[int, str]:
    try:
        return {int(n): v for n, v in (p.split(":", 1) for p in (text or "").split())}
    except ValueError:
        return {}  # damaged: nothing to compare with


def same_database(a: dict[int, str], b: dict[int, str]) -> int:
    """How many first rows two files share by their fingerprints (0: none compared equal):
    the most both have."""
    common = set(a) & set(b)
    return max(common) if common and a[max(common)] == b[max(common)] else 0


def _check_header(path: Path, size: int) -> bytes:
    """Fail early on what is no SQLite database, or one cut short (a partial copy); the
    header's 100 bytes."""
    if size == 0:
        raise LegacyFileError("empty file (0 bytes), not an SQLite database")
    with open_regular(path) as fh:  # (replaced by a FIFO since it was checked: no wait)
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
    return head


def inspect(path: Path) -> LegacyFile:
    """Check a file and find its rowid range; LegacyFileError says what is wrong."""
    f = LegacyFile(path, name=path.name)
    if not is_text(f.name):  # no ledger key, no log line takes it
        raise LegacyFileError("its name is not UTF-8: rename it")
    if not f.name.isprintable():  # a newline in it would forge log lines
        raise LegacyFileError("its name has a control character: rename it")
    try:
        st = path.stat()
    except OSError as exc:
        raise LegacyFileError(exc.strerror or str(exc)) from None
    if not path.is_file():
        raise LegacyFileError("not a file")
    f.size, f.mtime_ns = st.st_size, st.st_mtime_ns
    try:
        wal = path.with_name(path.name + "-wal").stat()
        # An empty one is none: reading a WAL-mode file leaves an empty -wal behind.
        f.wal = f"{wal.st_size}:{wal.st_mtime_ns}" if wal.st_size else ""
    except OSError:
        pass  # none (or unreadable: SQLite reports that as it opens the database)
    try:
        head = _check_header(path, f.size)
    except OSError as exc:
        raise LegacyFileError(exc.strerror or str(exc)) from None
    try:
        con = open_ro(path)
        try:
            kind = con.execute(
                "SELECT type, sql FROM sqlite_master WHERE name = 'access_log' COLLATE NOCASE"
            ).fetchone()
            if kind is None:
                raise LegacyFileError("no table access_log")
            if kind[0] != b"table":
                shown = kind[0].decode("utf-8", "replace")
                raise LegacyFileError(f"access_log is a {shown}, not a table")
            if (kind[1] or b"").lstrip()[:20].upper() == b"CREATE VIRTUAL TABLE":
                # its rows come from a module (FTS5 over a view: any rows, or none, forever)
                raise LegacyFileError("access_log is a virtual table, not a table")
            cols = {  # table_xinfo: generated columns too
                r[1].decode("utf-8", "replace").lower()
                for r in con.execute("PRAGMA table_xinfo(access_log)")
            }
            missing = [c for c in REQUIRED if c not in cols]
            status = [c for c in STATUS_COLUMNS if c in cols]
            if not status:
                missing.append("statuscode (or errorcode)")
            if missing:
                raise LegacyFileError(f"access_log has no column {', '.join(missing)}")
            f.status_col = status[0] if len(status) == 1 else STATUS_BOTH
            rowid = [a for a in ROWID_NAMES if a not in cols]
            if not rowid:
                raise LegacyFileError(
                    "access_log has columns named rowid, _rowid_ and oid: no name is left "
                    "to read its rows by"
                )
            f.rowid = rowid[0]
            try:
                f.lo, f.hi = con.execute(
                    f"SELECT min({f.rowid}), max({f.rowid}) FROM access_log"  # noqa: S608
                ).fetchone()
            except sqlite3.OperationalError:  # WITHOUT ROWID: no ranges to read it by
                raise LegacyFileError("access_log has no rowid (a WITHOUT ROWID table)") from None
        finally:
            con.close()
    except sqlite3.DataError as exc:
        if exc.sqlite_errorcode != sqlite3.SQLITE_TOOBIG:
            raise _unreadable(path, exc, head) from None
        raise LegacyFileError(f"its schema is larger than {LOAD_MAX >> 20} MiB") from None
    except sqlite3.DatabaseError as exc:
        raise _unreadable(path, exc, head) from None
    return f


def _unreadable(path: Path, exc: sqlite3.DatabaseError, head: bytes = b"") -> LegacyFileError:
    """The one line for a file SQLite cannot read, with what to do when that can be told."""
    hint = ""
    if getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY:
        # a live writer's lock (its -journal is its transaction's: never to be removed)
        hint = (
            "; another process is writing it: import a copy made with sqlite3's .backup, or "
            "run again when the writer is done"
        )
    elif path.with_name(path.name + "-journal").exists():
        hint = (
            "; a -journal file beside it holds an interrupted write, which a read-only "
            "import cannot roll back"
        )
    elif head[18:20] == b"\x02\x02" and not path.with_name(path.name + "-shm").exists():
        # (the header's read and write versions: 2 is WAL)
        hint = (
            "; it is in WAL mode, and SQLite could not create its -shm file beside it (a "
            "read-only directory?): copy it, with its -wal if any, where the import may write"
        )
    return LegacyFileError(f"not a readable SQLite database ({exc}){hint}")


def plan_units(
    f: LegacyFile,
    known: list[tuple[int, int]],
    unit_rows: int,
    next_row: Callable[[int], int | None],
    nth_row: Callable[[int, int], int | None],
) -> None:
    """The units to read: those already in the ledger (to check) and new ones after them.

    A unit spans ``unit_rows`` rowids from an existing row, or more when those hold fewer
    than ``unit_rows // 100`` rows (sparse rowids): it then ends at that many rows from its
    first (``nth_row``). The next one starts at the first row after it (``next_row``), so a
    gap in the rowids (rows deleted, or two rows at rowids 1 and 2**62) costs no units, and a
    file whose rowids are all far apart takes at most one unit per ``unit_rows // 100`` rows,
    not one per row. A unit never holds more than ``unit_rows`` rows (its memory).
    """
    f.units = sorted(known)
    if f.lo is None or f.hi is None:
        return
    least = max(1, unit_rows // 100)
    after = max((hi for _, hi in known), default=f.lo - 1)
    start = f.lo if after < f.lo else next_row(after)
    while start is not None and start <= f.hi:
        last = nth_row(start, least)  # None: fewer rows than that are left
        end = min(max(start + unit_rows - 1, f.hi if last is None else last), f.hi)
        f.units.append((start, end))
        start = next_row(end) if end < f.hi else None


def _plan(f: LegacyFile, known: list[tuple[int, int]], unit_rows: int) -> None:
    """:func:`plan_units` on the file, whose next (and n-th) row after a rowid is a b-tree
    seek (and a walk of n rowids, no value read)."""
    try:
        con = open_ro(f.path)
        try:
            seek = f"SELECT min({f.rowid}) FROM access_log WHERE {f.rowid} > ?"  # noqa: S608
            nth = (
                f"SELECT {f.rowid} FROM access_log WHERE {f.rowid} >= ? "  # noqa: S608
                f"ORDER BY {f.rowid} LIMIT 1 OFFSET ?"
            )

            def next_row(rowid: int) -> int | None:
                return con.execute(seek, (rowid,)).fetchone()[0]

            def nth_row(rowid: int, n: int) -> int | None:
                got = con.execute(nth, (rowid, n - 1)).fetchone()
                return None if got is None else got[0]

            plan_units(f, known, unit_rows, next_row, nth_row)
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise _unreadable(f.path, exc) from None


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
            f"replaced), {self.unchanged} unchanged, {self.refused} refused, "
            f"{self.counts('rows')}, cut-over {self.until}, {self.timing()}"
        )


def readers(settings: Settings) -> int:
    """Reader processes: ``etl/workers`` if set (1: read in the importing process, as the
    log ETL parses), else one per CPU but one (the writing and PostgreSQL's), 1 to 3."""
    if settings.get("etl/workers"):
        n = settings.get_int("etl/workers")
        return 0 if n == 1 else n
    return max(1, min(3, (os.cpu_count() or 1) - 1))


def _until_of(file_etag: str | None) -> str | None:
    m = re.search(r" until=(\d{4}-\d{2}-\d{2})$", file_etag or "")
    return m[1] if m else None


def _until_moved(f: LegacyFile, until: dt.date | None) -> bool:
    return f.until_before is not None and until is not None and f.until_before != str(until)


def cutover_day(settings: Settings, until: str | None) -> dt.date:
    """``--until``, else ``etl/logs_since``; neither, or an ``--until`` after
    ``etl/logs_since``: refused (a day would count twice)."""
    # the same message for a bad etl/logs_since as from `check` and the log ETL
    logs_since = settings.get_day("etl/logs_since")
    day = ingest.parse_since(until, "--until") if until is not None else logs_since
    if day is not None and logs_since is not None and day > logs_since:
        raise ConfigError(
            f"import legacy-db: --until {day} is after etl/logs_since {logs_since}, from which "
            "the log ETL counts: the days between would be counted twice; give --until "
            f"{logs_since} or earlier (or move etl/logs_since first)"
        )
    if day is not None and day <= HISTORY_START:
        raise ConfigError(
            f"import legacy-db: cut-over day {day}: the history starts on {HISTORY_START}, "
            "nothing before it would be imported"
        )
    if day is None:
        raise ConfigError(
            "import legacy-db: no cut-over day: give --until YYYY-MM-DD or set etl/logs_since "
            "(WEBSTATS_ETL_LOGS_SINCE); rows from that day on are the logs', and without it "
            "days would be counted twice"
        )
    return day


def _ledger(session: Session, name: str) -> tuple[str | None, dict[str, str]]:
    """The file row's ETag and {unit key: ETag} of a file name."""
    io = IngestedObject
    prefix = f"{LEGACY_PREFIX}{name}/"
    rows = session.execute(
        select(io.key, io.etag).where(io.key.startswith(prefix, autoescape=True))
    ).all()
    units = {k: e or "" for k, e in rows if _UNIT_KEY.search(k)}
    return next((e for k, e in rows if k == file_key(name)), None), units


def _unit_owners(session: Session) -> dict[str, str]:
    """{a stored unit's ETag: its file's name}, for every legacy unit in the ledger (a few
    thousand for the whole history)."""
    io = IngestedObject
    rows = session.execute(
        select(io.key, io.etag).where(io.key.startswith(LEGACY_PREFIX, autoescape=True))
    ).all()
    return {
        e: k[len(LEGACY_PREFIX) :].rsplit("/", 1)[0] for k, e in rows if e and _UNIT_KEY.search(k)
    }


def _stored_heads(session: Session) -> dict[str, dict[int, str]]:
    """{file name: the fingerprints of its first rows} for every legacy file in the ledger."""
    io = IngestedObject
    rows = session.execute(
        select(io.key, io.etag).where(
            io.key.startswith(LEGACY_PREFIX, autoescape=True), io.key.endswith("/head")
        )
    ).all()
    return {k[len(LEGACY_PREFIX) : -len("/head")]: _parse_heads(e) for k, e in rows}


def _keep_heads(session: Session, f: LegacyFile) -> None:
    """The file's first rows' fingerprints into the ledger (caller commits), once a run."""
    if f.heads_kept or not f.heads:
        return
    _put_row(session, heads_key(f.name), etag=_heads_text(f.heads))
    f.heads_kept = True


def _put_row(session: Session, key: str, etag: str, **counts: int) -> None:
    """A ledger row of no records (a file's, its first rows'), added or updated; ``counts``:
    its size, lines_read, accepted and rejected (0 when not given)."""
    now = dt.datetime.now(dt.UTC)
    values = {
        "etag": etag,
        **dict.fromkeys(("size", "lines_read", "accepted", "rejected"), 0),
        **counts,
        "name_hour": dt.datetime(1970, 1, 1),
        "ingested_at": now,
        # it holds no records (its units do): nothing for the counting, no new data version
        "counted_at": now,
    }
    row = session.scalar(select(IngestedObject).where(IngestedObject.key == key))
    if row is None:
        session.add(IngestedObject(key=key, **values))
    else:
        for k, v in values.items():
            setattr(row, k, v)


def _record_file(settings: Settings, f: LegacyFile, until: dt.date) -> None:
    """The file's row: every unit is in; its size/mtime let the next import skip it."""
    with db.session_factory(settings.database_url).begin() as session:
        _put_row(
            session, file_key(f.name), f.etag(until), size=f.size, lines_read=f.rows,
            accepted=f.rows - sum(f.reasons), rejected=sum(f.reasons[i] for i in MALFORMED),
        )  # fmt: skip
        _keep_heads(session, f)
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
        if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
            raise ConfigError(f"WEBSTATS_LEGACY_UNIT_ROWS {raw!r}: expected a number of rows")
        unit_rows = int(raw)
    until_day = cutover_day(settings, until)
    key = ingest.ip_hash_key(settings, settings.get("etl/s3_download_logs") or "")
    summary = ImportSummary(until=until_day)
    sf = db.session_factory(settings.database_url)
    files: list[LegacyFile] = []
    names: dict[str, str] = {}  # file name → path: the name is the file's identity

    def failed(p: str, exc: LegacyFileError) -> None:
        summary.files_failed += 1
        summary.failures.append(p)
        log.error("%s: %s; not imported", shown(p), exc)

    with sf() as session:
        heads = _stored_heads(session)  # by file name; this run's files are added as planned
    real: dict[str, str] = {}  # the file → the path given first
    for p in paths:  # each file once, however it is written (dir/f and ./dir/f, a link to it)
        file = os.path.realpath(p)
        if file in real:
            log.info(
                "%s: the same file as %s, given before: read once", shown(p), shown(real[file])
            )
            continue
        real[file] = p
        summary.files += 1
        try:
            f = inspect(Path(p))
            if f.name in names:
                raise LegacyFileError(
                    f"the same name as {names[f.name]}, given before: a file's name is its "
                    "identity in the ledger, import one of them at a time"
                )
            f.heads = read_heads(f)
            _not_a_copy(f, heads, names)
        except LegacyFileError as exc:
            failed(p, exc)
            continue
        names[f.name] = p
        f.heads_kept = heads.get(f.name) == f.heads
        heads[f.name] = f.heads
        with sf() as session:
            file_etag, known = _ledger(session, f.name)
        if file_etag == f.etag(until_day):
            summary.files_skipped += 1
            log.info("%s: imported before and unchanged since (%s): skipped", shown(p), file_etag)
            if not f.heads_kept:  # imported by a release that kept none
                with sf.begin() as session:
                    _keep_heads(session, f)
            continue
        ranges = []
        for k in known:
            m = _UNIT_KEY.search(k)
            ranges.append((int(m[1]), int(m[2])))  # type: ignore[index]
        try:
            _plan(f, ranges, unit_rows)
        except LegacyFileError as exc:
            failed(p, exc)
            continue
        f.known = known
        f.until_before = _until_of(file_etag)
        files.append(f)
    tasks = [
        (unit_key(f.name, lo, hi), str(f.path), (f.status_col, f.rowid), lo, hi)
        for f in files
        for lo, hi in f.units
    ]
    owner = [f for f in files for _ in f.units]
    # a unit holds at most unit_rows rows, however many rowids it spans (sparse rowids)
    weight = [min(hi - lo + 1, unit_rows) for *_, lo, hi in tasks]
    log.info(
        "import legacy-db: %d of %d files to read, %d units (%d rows at most), with the %s "
        "reader in %s process(es); cut-over day %s",
        len(files), summary.files, len(tasks), sum(weight),
        reader_name(), min(readers(settings), len(tasks)) or "the importing", until_day,
    )  # fmt: skip
    pause_point("legacy_planned")
    for f in files:
        if not f.units:
            _finish_file(settings, f, until_day, summary)
    progress = ingest.Progress(len(tasks), sum(weight))
    workers = min(readers(settings), len(tasks))
    queued: set[tuple[str, str, int, int]] = set()
    with sf() as session:
        owners = _unit_owners(session)
    results = read_all(tasks, key, until_day, workers)
    for f, w in zip(owner, weight, strict=True):
        t1 = time.monotonic()
        unit = next(results)
        t2 = time.monotonic()
        summary.t_read += t2 - t1
        pause_point("unit_parsed")
        _store_unit(sf, f, unit, replace, queued, summary, owners)
        summary.t_store += time.monotonic() - t2
        f.done += 1
        progress.update(w, unit.rows)
        if f.done == len(f.units):
            _finish_file(settings, f, until_day, summary)
            # A file's months now rather than all at the end: the queue (and the recompute's
            # memory) stays at a year's keys, and an import killed later keeps them.
            _recompute(settings, summary)
            queued.clear()  # (the queue is empty now: what comes next must be queued again)
    # A file that failed part way, or units a killed import left uncounted (after the last
    # file's recount this finds nothing pending and reads no record).
    _recompute(settings, summary)
    summary.elapsed = time.monotonic() - t0
    log.info("%s", summary.line())
    return summary.files_failed == 0


def _not_a_copy(f: LegacyFile, heads: dict[str, dict[int, str]], given: dict[str, str]) -> None:
    """Refuse a file that begins with the rows of another name's, imported before or given
    before in this command (``given``: name → path): the same database copied, or another
    backup of it, whose downloads would count twice."""
    for name, theirs in heads.items():
        n = same_database(f.heads, theirs) if name != f.name else 0
        if n:
            when = f"given before ({shown(given[name])})" if name in given else "imported before"
            raise LegacyFileError(
                f"its first {n} rows are those of {name}, {when}: the same database under "
                f"another name, its downloads would count twice; to import rows the legacy "
                f"server added since, name it {name}"
            )


def _recompute(settings: Settings, summary: ImportSummary) -> None:
    """The statistics of what is queued (``ingest.finish_run``), added to the summary."""
    months, took = summary.months, summary.t_recompute
    ingest.finish_run(settings, summary)
    summary.months += months
    summary.t_recompute += took


def parsed_of(unit: UnitResult) -> Parsed:
    """A unit as the ledger stores an object (its records: binary COPY data)."""
    out = Parsed(sources.LogObject(unit.key, unit.size, unit.name_hour, unit.etag))
    out.lines_read, out.accepted, out.rejected = unit.rows, unit.downloads, unit.malformed
    out.reasons = {REASONS[i]: n for i, n in enumerate(unit.reasons) if n}
    out.max_day = unit.max_day
    out.copy_data, out.copy_format = unit.copy_data, "binary"
    return out


def _store_unit(
    sf: Any,
    f: LegacyFile,
    unit: UnitResult,
    replace: bool,
    queued: set[tuple[str, str, int, int]],
    summary: ImportSummary,
    owners: dict[str, str],
) -> None:
    if f.error is not None:  # an earlier unit of the file failed: the file is done for
        return
    twin = owners.get(unit.etag or "") if unit.downloads else None
    if twin is not None and twin != f.name:
        # A file's name is its identity in the ledger: the same database copied under another
        # name would count its downloads twice.
        unit.error = (
            f"rows {unit.key.rsplit('/rows-', 1)[1]} give exactly the downloads of {twin}'s, "
            f"imported before: the same database under another name"
        )
    if unit.error:
        f.error = unit.error
        log.error("%s: %s; its other units are not imported", f.path, unit.error)
        return
    f.rows += unit.rows
    f.reasons = [a + b for a, b in zip(f.reasons, unit.reasons, strict=True)]
    before = f.known.get(unit.key)
    if before == unit.etag:
        f.unchanged += 1
        summary.unchanged += 1
        return
    if before is not None and not replace:
        f.refused += 1
        summary.refused += 1
        if _until_moved(f, summary.until):
            return  # one line for the file (_finish_file), not one a unit
        log.error(
            "%s: rows %s changed since they were imported (%s, now %s); not imported: "
            "'import legacy-db --replace' replaces their records",
            f.path, unit.key.rsplit("/rows-", 1)[1], before, unit.etag,
        )  # fmt: skip
        return
    parsed = parsed_of(unit)
    store = ingest.store_replacement if before is not None else ingest.store_new
    try:
        with sf.begin() as session:
            store(session, parsed, queued)
            _keep_heads(session, f)  # with its first unit: a copy is known from then on
    except IntegrityError:  # another import stored it meanwhile
        f.heads_kept = False  # (not with it)
        log.warning("%s: already in the ledger, skipped", unit.key)
        return
    pause_point("unit_committed")
    if unit.etag and unit.downloads:
        owners[unit.etag] = f.name
    queued |= unit.touched
    if before is not None:
        f.replaced += 1
        summary.replaced += 1
    else:
        f.imported += 1
    summary.objects += 1
    summary.lines += unit.rows
    summary.accepted += unit.downloads
    summary.rejected += unit.malformed


def _finish_file(settings: Settings, f: LegacyFile, until: dt.date, summary: ImportSummary) -> None:
    if f.error is None and not f.refused:
        _record_file(settings, f, until)
        log.info("%s", _file_line(f, until))
        return
    summary.files_failed += 1
    summary.failures.append(str(f.path))
    if f.refused and _until_moved(f, until):  # (a unit damaged after them too)
        log.error(
            "%s: %d units changed since they were imported, with the cut-over day %s then and "
            "%s now; not imported: 'import legacy-db --replace' replaces their records (or "
            "--until %s keeps them)",
            f.path, f.refused, f.until_before, until, f.until_before,
        )  # fmt: skip
    if f.error is None:
        log.error("%s; %s: not complete (refused units above)", _file_line(f, until), f.path)
