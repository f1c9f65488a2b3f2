"""The ledger and exactly-once loading of log objects; look-back; the run summary.

An object's ledger row and its download records are written in ONE transaction, the row not
yet counted (``counted_at`` NULL); a later transaction adds the records of every row not yet
counted to the statistics and marks them counted, bumps the data version and advances ValidThru
(``stats.apply_pending``, see its module for the contract). A run killed anywhere therefore
leaves each object either fully stored or absent, and any stored but not yet counted object
counted by the next run.

Objects are parsed in worker processes (``etl/workers``, default: the CPU count, at most 4)
while this process writes to the database, in name order.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime as dt
import itertools
import logging
import multiprocessing
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, delete, func, or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..config import Settings, parse_day
from ..errors import ConfigError, WebstatsError
from ..files import shown
from ..proc import die_with_parent
from ..store import db, records, stats
from ..store.models import DownloadRecord, IngestedObject
from . import parse, rule, sources

log = logging.getLogger(__name__)

KEY_FILE = "ip_hash.key"
# Ledger rows of the legacy history import (etl/legacy.py) share the ledger with log objects:
# their keys start with this and never end in ".gz", as every log object's name does.
LEGACY_PREFIX = "legacy/"
PROGRESS_EVERY = 60.0  # seconds between progress lines when stderr is not a terminal


# --- test hook -------------------------------------------------------------------------------

_pause_seen: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Crash-test hook: with ``WEBSTATS_TEST_PAUSE_AT=<name>[:<n>]`` the process writes
    ``<name>`` to the file ``WEBSTATS_TEST_PAUSE_FILE`` at the n-th passage here and blocks
    until it is killed. Without the variable this does nothing."""
    spec = os.environ.get("WEBSTATS_TEST_PAUSE_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _pause_seen[name] = _pause_seen.get(name, 0) + 1
    if _pause_seen[name] != int(nth or 1):
        return
    marker = Path(os.environ["WEBSTATS_TEST_PAUSE_FILE"])
    part = marker.with_name(marker.name + ".part")
    part.write_text(name)
    part.replace(marker)  # whole or absent: the test reads it as soon as it exists
    threading.Event().wait()  # forever: the test sends SIGKILL


# --- the IP hash key -------------------------------------------------------------------------


def ip_hash_key(settings: Settings, source_url: str) -> bytes:
    """The HMAC key for client addresses.

    Configured (``etl/ip_hash_key`` / ``WEBSTATS_IP_HASH_KEY``): used as is. Not configured:
    an S3 source (production) is refused; a local source uses a random key generated once
    and kept, mode 0600, in ``<state_dir>/ip_hash.key`` so distinct counts stay consistent
    from run to run on the same machine.
    """
    value = settings.get("etl/ip_hash_key")
    if value:
        return value.encode("utf-8")
    if source_url.startswith("s3://"):
        raise ConfigError(
            "etl/ip_hash_key (WEBSTATS_IP_HASH_KEY) is not set: client IPs cannot be hashed; "
            "set the secret in the configuration"
        )
    path = settings.state_dir / KEY_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    log.warning("etl/ip_hash_key not configured: generated a local key in %s", path)
    return path.read_bytes().strip()


# --- parsing (in worker processes) ------------------------------------------------------------


@dataclass
class Parsed:
    """One object's contribution, ready to store (rows without the object id)."""

    obj: sources.LogObject
    lines_read: int = 0
    accepted: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    copy_data: bytes = b""  # COPY rows without the object id (store.records)
    copy_format: str = "text"
    spool: str | None = None  # a file of more COPY data (_Spool), deleted once stored
    max_day: dt.date | None = None
    error: str | None = None


_worker: dict[str, Any] = {}


def _init_worker(
    source_url: str,
    key: bytes,
    child: bool,
    floor: dt.date | None = None,
    spool_dir: str | None = None,
) -> None:
    if child:
        die_with_parent()  # a worker must not outlive a killed ETL process
        # Ctrl-C reaches the whole process group: the parent stops the run and its workers;
        # a worker's own KeyboardInterrupt would only print a traceback each.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        db.forget_inherited_connections()
    _worker.clear()
    # one hasher per process: the parsers keep each client's hash while it is the same
    _worker.update(
        url=source_url,
        key=key,
        source=None,
        hasher=rule.ip_hasher(key),
        floor=floor,
        spool_dir=spool_dir or tempfile.gettempdir(),
    )


# COPY data a parse result carries itself (through the pool's pipe, held while the results
# before it are stored); more goes through a spool file, as do the records parse spills.
INLINE_MAX = 4 << 20


class _Spool:
    """The COPY data of one object that is not carried in its Parsed: parts written to a file
    in the run's spool directory as they come (each prefixed by its length)."""

    def __init__(self, directory: str) -> None:
        self.directory, self.path = directory, None
        self._fh: Any = None

    def write(self, data: bytes) -> None:
        try:
            if self._fh is None:
                fd, self.path = tempfile.mkstemp(suffix=".copy", dir=self.directory)
                self._fh = os.fdopen(fd, "wb")
            self._fh.write(len(data).to_bytes(8, "big"))
            self._fh.write(data)
        except OSError as exc:  # a full disk: the object fails, the run goes on
            raise SpoolError(self._cannot(exc)) from None

    def close(self, keep: bool) -> str | None:
        """The path of the file written, closed; None: nothing written, or not ``keep``
        (removed). SpoolError when what is kept could not be written whole."""
        if self._fh is None:
            return None
        fh, self._fh = self._fh, None
        try:
            fh.close()  # (the last write happens here)
        except OSError as exc:
            if keep:
                self._remove()
                raise SpoolError(self._cannot(exc)) from None
        if not keep:
            self._remove()
            return None
        return self.path

    def _cannot(self, exc: OSError) -> str:
        return f"cannot spool its records in {self.directory}: {exc.strerror or exc}"

    def _remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # type: ignore[arg-type]


class SpoolError(WebstatsError):
    """A spool file could not be written or read back whole (the object is not stored)."""


def spool_parts(path: str) -> Iterator[bytes]:
    """The parts of a spool file, one at a time (each as big as parse's bound, not more)."""
    try:
        with open(path, "rb") as fh:
            while head := fh.read(8):
                size = int.from_bytes(head, "big")
                part = fh.read(size)
                if len(head) != 8 or len(part) != size:
                    raise SpoolError(f"spool file {path} cut short")
                yield part
    except OSError as exc:
        raise SpoolError(f"cannot read spool file {path}: {exc.strerror}") from None


def _parse(obj: sources.LogObject) -> Parsed:
    """Read and count one object (runs in a worker). Failures are returned, not raised."""
    if _worker["source"] is None:
        _worker["source"] = sources.open_source(_worker["url"])
    out = Parsed(obj)
    chunks = _worker["source"].chunks(obj)
    spool = _Spool(_worker["spool_dir"])
    try:
        rec = parse.count_records(
            chunks, obj.name_hour, _worker["hasher"], _worker["floor"], spool.write
        )
        if len(rec.copy_data) > INLINE_MAX:
            spool.write(rec.copy_data)
            rec.copy_data = b""
        out.spool = spool.close(keep=True)
    except (sources.LogFormatError, SpoolError) as exc:
        out.error = str(exc)
        spool.close(keep=False)
        return out
    except BaseException:
        spool.close(keep=False)
        raise
    out.lines_read, out.accepted, out.rejected = rec.lines_read, rec.accepted, rec.rejected
    out.copy_data, out.copy_format = rec.copy_data, rec.copy_format
    out.max_day, out.reasons = rec.max_day, rec.reject_reasons
    return out


def parse_all(
    source_url: str,
    key: bytes,
    objects: list[sources.LogObject],
    workers: int,
    floor: dt.date | None = None,
) -> Iterator[Parsed]:
    """Parsed objects in the order given; ``workers`` > 1 parses in child processes with a
    bounded number in flight, so memory stays constant whatever the number of objects. Their
    spool files are in a directory of this run, removed when the generator is closed."""
    with tempfile.TemporaryDirectory(prefix="bioc-webstats-etl-") as spool_dir:
        yield from _parse_all(source_url, key, objects, workers, floor, spool_dir)


def _parse_all(
    source_url: str,
    key: bytes,
    objects: list[sources.LogObject],
    workers: int,
    floor: dt.date | None,
    spool_dir: str,
) -> Iterator[Parsed]:
    if workers <= 1 or len(objects) <= 1:
        _init_worker(source_url, key, child=False, floor=floor, spool_dir=spool_dir)
        for obj in objects:
            yield _parse(obj)
        return
    ctx = multiprocessing.get_context("fork")
    with cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(source_url, key, True, floor, spool_dir),
    ) as pool:
        pending: deque[cf.Future[Parsed]] = deque()
        todo = iter(objects)
        for obj in todo:
            pending.append(pool.submit(_parse, obj))
            if len(pending) >= workers * 2:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_parse, nxt))
            yield result


# --- storing (this process) -----------------------------------------------------------------


def _insert_records(session: Session, object_id: int, parsed: Parsed) -> None:
    if not parsed.accepted:
        return
    parts = spool_parts(parsed.spool) if parsed.spool else ()
    for part in itertools.chain((parsed.copy_data,), parts):  # (one part in memory at a time)
        if part:
            data = parse.with_object_id(part, parsed.copy_format, object_id)
            records.write(session, data, parsed.copy_format)


def _ledger_values(parsed: Parsed) -> dict[str, Any]:
    obj = parsed.obj
    return {
        "etag": obj.etag,
        "size": obj.size,
        "name_hour": obj.name_hour,
        "lines_read": parsed.lines_read,
        "accepted": parsed.accepted,
        "rejected": parsed.rejected,
        "ingested_at": dt.datetime.now(dt.UTC),
    }


def store_new(
    session: Session, parsed: Parsed, queued: set[tuple[str, str, int, int]] | None = None
) -> None:
    """Ledger row + records of a new object (caller commits); ``stats.apply_pending`` counts
    them later. ``queued`` is not used any more (kept for callers)."""
    stats.lock_for_records(session)
    if session.get_bind().dialect.name == "postgresql":
        # Losing the last commits in a server crash only means re-reading those objects
        # (ledger and records go together); not waiting for the WAL flush is safe here.
        session.execute(text("SET LOCAL synchronous_commit = off"))
    row = IngestedObject(key=parsed.obj.key, **_ledger_values(parsed))
    session.add(row)
    session.flush()
    pause_point("ledger_inserted")
    _insert_records(session, row.id, parsed)
    pause_point("records_inserted")
    pause_point("object_queued")  # (the ledger row is the queue now: counted_at NULL)


def _other_size(key: str, size: int, other: str, other_size: int) -> str:
    """Two objects of one CloudFront name and different sizes: which is CloudFront's cannot
    be told (one cut short, or not CloudFront's)."""
    return f"{shown(key)}: named as {shown(other)} but {size} bytes, not {other_size}"


def _held_under_another_key(session: Session, obj: sources.LogObject) -> IngestedObject | None:
    """The ledger's row of a log object read under another key (its CloudFront name, in
    another folder or prefix: a bucket reorganised since), or None."""
    name = sources.object_name(obj.key)
    rows = [
        r
        for r in session.scalars(
            select(IngestedObject).where(IngestedObject.name_hour == obj.name_hour)
        )
        if sources.object_name(r.key) == name and r.key != obj.key
    ]
    if len(rows) > 1:
        keys = ", ".join(shown(r.key) for r in rows)
        raise WebstatsError(
            f"{shown(obj.key)}: the ledger holds it under {len(rows)} keys ({keys})"
        )
    if rows and rows[0].size != obj.size:  # a copy cut short, say: 'etl run' names both too
        raise WebstatsError(
            f"{_other_size(obj.key, obj.size, rows[0].key, rows[0].size)}: not re-read; remove "
            f"the wrong copy (or reingest {shown(rows[0].key)} itself)"
        )
    if rows:
        log.info(
            "%s: in the ledger as %s (moved): re-read from here", shown(obj.key), shown(rows[0].key)
        )
    return rows[0] if rows else None


def store_replacement(
    session: Session, parsed: Parsed, queued: set[tuple[str, str, int, int]] | None = None
) -> None:
    """Replace the records of an already ingested object (caller commits). A seen-set cannot
    forget the old records' clients: the packages' years of the old and the new records are
    queued to be recounted from the records (the new ``ingested_at`` marks the row not counted)."""
    stats.lock_for_records(session)
    row = session.scalar(select(IngestedObject).where(IngestedObject.key == parsed.obj.key))
    if row is None:
        row = _held_under_another_key(session, parsed.obj)
    if row is None:
        raise WebstatsError(
            f"{shown(parsed.obj.key)}: not in the ledger (use 'etl run' to ingest it)"
        )
    stats.queue_object(session, row.id)
    session.execute(delete(DownloadRecord).where(DownloadRecord.object_id == row.id))
    pause_point("reingest_deleted")
    for name, value in _ledger_values(parsed).items():
        setattr(row, name, value)
    row.key = parsed.obj.key  # where it lies now (a moved object): the next listing skips it
    _insert_records(session, row.id, parsed)
    stats.queue_object(session, row.id)


# --- progress ---------------------------------------------------------------------------------


class Progress:
    """A progress bar on a terminal; otherwise a log line about every minute."""

    def __init__(self, objects: int, total_bytes: int, tty: bool | None = None) -> None:
        self.objects, self.total_bytes = objects, max(total_bytes, 1)
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.done = self.bytes = self.lines = 0
        self.t0 = self.last = time.monotonic()

    def update(self, obj_bytes: int, lines: int) -> None:
        self.done += 1
        self.bytes += obj_bytes
        self.lines += lines
        now = time.monotonic()
        if self.tty:
            if now - self.last >= 0.2 or self.done == self.objects:
                self.last = now
                sys.stderr.write("\r" + self.text(now) + "\033[K")
                if self.done == self.objects:
                    sys.stderr.write("\n")
                sys.stderr.flush()
        elif now - self.last >= PROGRESS_EVERY:
            self.last = now
            log.info("progress: %s", self.text(now))

    def text(self, now: float) -> str:
        elapsed = max(now - self.t0, 1e-6)
        frac = self.bytes / self.total_bytes
        est_lines = int(self.lines / frac) if frac > 0 else 0
        eta = elapsed * (1 - frac) / frac if frac > 0 else 0.0
        width = 24
        bar = "#" * int(width * frac) + "." * (width - int(width * frac))
        return (
            f"[{bar}] objects {self.done}/{self.objects}, lines {self.lines:,}/~{est_lines:,}, "
            f"{self.lines / elapsed:,.0f} lines/s, ETA {eta:.0f}s"
        )


# --- the run --------------------------------------------------------------------------------


def parse_since(since: str | None, option: str = "--since") -> dt.date | None:
    if since is None:
        return None
    try:
        return parse_day(since)
    except ValueError:
        raise WebstatsError(f"{option} {since!r}: expected a date YYYY-MM-DD") from None


def _workers(settings: Settings) -> int:
    """Parse processes: ``etl/workers``, default the CPU count (at most 4)."""
    if settings.get("etl/workers"):
        return settings.get_int("etl/workers")
    return max(1, min(4, os.cpu_count() or 1))


def source_url(settings: Settings, source: str | None) -> str:
    url = source or settings.get("etl/s3_download_logs")
    if not url:
        raise ConfigError(
            "no log source: etl/s3_download_logs (WEBSTATS_LOG_SOURCE) is not set; set it, "
            "or give --source"
        )
    return url


@dataclass
class RunSummary:
    """Totals of one run (also the summary line)."""

    objects: int = 0
    failed: int = 0
    skipped_names: int = 0
    lines: int = 0
    accepted: int = 0
    rejected: int = 0
    months: int = 0
    valid_thru: dt.date | None = None
    elapsed: float = 0.0
    failures: list[str] = field(default_factory=list)
    t_read: float = 0.0  # waiting for parsed objects
    t_store: float = 0.0  # object transactions
    t_recompute: float = 0.0
    # ValidThru's bound: the last complete UTC day when the run began. A run that ends after
    # midnight read none of the new day's objects: that day is not over for its statistics.
    through: dt.date = field(default_factory=lambda: db.last_complete_day())
    # A run that reaches the last complete day holds back the objects with downloads after
    # it (a line of 00:10 in yesterday's last hour): stored now, they showed in the new
    # month's (or year's) statistics while ValidThru and "Data as of" said yesterday. They
    # are not in the ledger, so the next run's look-back takes them, that day over.
    hold_after: dt.date | None = None
    held: int = 0  # objects held back so
    # The window listed (None: a reingest) and the name dates of the objects that failed in
    # it: the oldest is kept (``db.RETRY_FROM``) and every run lists from it until it is read.
    window: sources.Window | None = None
    failed_days: list[dt.date] = field(default_factory=list)

    def line(self, what: str = "etl run") -> str:
        return (
            f"{what}: {self.objects} objects ingested, {self.failed} failed, "
            f"{self.skipped_names} skipped (not log names), {self.counts('lines')}, "
            f"{self.timing()}"
        )

    # The parts every summary line shares (``legacy.ImportSummary``'s too); operators and
    # tests read these lines: not a character of them may change.
    def counts(self, unit: str) -> str:
        """What was read of ``unit`` (lines, rows), accepted, rejected, recomputed."""
        return (
            f"{self.lines} {unit} read, {self.accepted} downloads accepted, {self.rejected} "
            f"{unit} rejected, {self.months} months recomputed, "
            f"ValidThru {self.valid_thru or '-'}"
        )

    def timing(self) -> str:
        return (
            f"elapsed {self.elapsed:.1f}s (read {self.t_read:.1f}s, store {self.t_store:.1f}s, "
            f"recompute {self.t_recompute:.1f}s)"
        )


def _ingest_objects(
    settings: Settings,
    url: str,
    objects: list[sources.LogObject],
    summary: RunSummary,
    store: Callable[[Session, Parsed, set[tuple[str, str, int, int]]], None],
) -> None:
    key = ip_hash_key(settings, url)
    progress = Progress(len(objects), sum(o.size for o in objects))
    # Closed here on any exit (Ctrl-C while storing): the worker pool is then shut down in
    # this thread, not by the garbage collector in the pool's own thread, which cannot join
    # itself and printed a traceback.
    with contextlib.closing(
        parse_all(url, key, objects, _workers(settings), logs_since(settings))
    ) as parsed:
        store_all(settings, parsed, summary, store, progress)


def store_all(
    settings: Settings,
    parsed_objects: Iterable[Parsed],
    summary: RunSummary,
    store: Callable[[Session, Parsed, set[tuple[str, str, int, int]]], None],
    progress: Progress,
) -> None:
    """Store each parsed object in its own transaction (failures logged and counted)."""
    sf = db.session_factory(settings.database_url)
    queued: set[tuple[str, str, int, int]] = set()
    objects = iter(parsed_objects)
    while True:
        t0 = time.monotonic()
        parsed = next(objects, None)
        t1 = time.monotonic()
        summary.t_read += t1 - t0
        if parsed is None:
            break
        k = shown(parsed.obj.key)  # for log lines (a folder's name may hold a newline)
        pause_point("object_parsed")
        then = (
            "not ingested, will be retried on the next run"
            if store is store_new
            else "not re-ingested, its records are kept as they were"
        )
        if parsed.error:
            summary.failed += 1
            summary.failures.append(k)
            summary.failed_days.append(parsed.obj.name_hour.date())
            log.error("%s: %s; %s", k, parsed.error, then)
        elif (
            store is store_new
            and summary.hold_after is not None
            and parsed.max_day is not None
            and parsed.max_day > summary.hold_after
        ):
            summary.held += 1
            log.info(
                "%s: holds downloads of %s, a day not over yet: read by the next run",
                k, parsed.max_day,
            )  # fmt: skip
        else:
            try:
                with sf.begin() as session:
                    store(session, parsed, queued)
            except IntegrityError:  # another run stored it meanwhile
                log.warning("%s: already in the ledger, skipped", k)
            except SpoolError as exc:
                summary.failed += 1
                summary.failures.append(k)
                summary.failed_days.append(parsed.obj.name_hour.date())
                log.error("%s: %s; %s", k, exc, then)
            except WebstatsError as exc:
                summary.failed += 1
                summary.failures.append(k)
                summary.failed_days.append(parsed.obj.name_hour.date())
                log.error("%s", exc)
            else:
                pause_point("object_committed")
                summary.objects += 1
                summary.lines += parsed.lines_read
                summary.accepted += parsed.accepted
                summary.rejected += parsed.rejected
                if parsed.rejected:
                    why = ", ".join(f"{r}: {n}" for r, n in sorted(parsed.reasons.items()))
                    log.info(
                        "%s: %d of %d lines rejected (%s)",
                        k,
                        parsed.rejected,
                        parsed.lines_read,
                        why,
                    )
        if parsed.spool:  # stored or not: a retry parses the object again
            with contextlib.suppress(FileNotFoundError):
                os.unlink(parsed.spool)
        summary.t_store += time.monotonic() - t1
        progress.update(parsed.obj.size, parsed.lines_read)


def finish_run(settings: Settings, summary: RunSummary) -> None:
    """Recompute what is queued (one transaction). Publishing the new data version is the
    caller's next step (``publish``, called by the CLI after every change)."""
    pause_point("before_recompute")
    t0 = time.monotonic()
    with db.session_factory(settings.database_url).begin() as session:
        res = stats.apply_pending(session, summary.through)
        if summary.window is not None:
            _remember_failures(session, summary, logs_since(settings))
        pause_point("recompute_done")
    pause_point("recompute_committed")
    summary.t_recompute = time.monotonic() - t0
    summary.months = res.months
    summary.valid_thru = res.valid_thru


def named_days(keys: list[str]) -> list[dt.date]:
    """The dates in the names of ``keys``: a log object's (two copies of one name that
    differ) or a ``YYYY-MM-DD`` folder's that could not be read (one outside the window is
    not opened, so nothing would name it again); another folder has none (every run walks it)."""
    days = []
    for key in keys:
        hour = sources.parse_name(key)
        day = hour.date() if hour is not None else sources.dir_day(key.rstrip("/").rsplit("/")[-1])
        if day is not None:
            days.append(day)
    return days


def _remember_failures(session: Session, summary: RunSummary, cutover: dt.date | None) -> None:
    """Keep the name date of the oldest object that failed (its look-back would otherwise
    pass it within days: the runs went back to exit 0 and its downloads were never counted),
    or forget it once a run that listed it, and everything after it, read it (or found it
    gone)."""
    window = summary.window
    assert window is not None
    keep = list(summary.failed_days)
    old = db.get_retry_from(session)
    if cutover is not None and old is not None and old < cutover - CUTOVER_MARGIN:
        old = None  # before a cut-over day moved later: nothing there is counted any more
    if old is not None:
        if old not in window:  # a backfill slice elsewhere
            keep.append(old)
        elif summary.hold_after is None and window.until is not None:
            # a slice that ends before the last complete day: a later failure is unseen
            keep.append(window.until + dt.timedelta(days=1))
    db.set_retry_from(session, min(keep, default=None))


# Objects named up to this many days before the cut-over day are read too: a file named for
# one hour may hold lines up to 48 h away from it (etl.md), and the lines dated on or after the
# cut-over day are counted wherever they are; the lines before it are not (parse's floor).
CUTOVER_MARGIN = dt.timedelta(days=2)


def logs_since(settings: Settings) -> dt.date | None:
    """``etl/logs_since``, the cut-over day: no log line dated before it is counted."""
    return settings.get_day("etl/logs_since")


def log_objects() -> ColumnElement[bool]:
    """Ledger rows of log objects, not of the legacy import (which must not move the
    logs' look-back window: its units are dated by the history they hold)."""
    key = IngestedObject.key
    return or_(~key.startswith(LEGACY_PREFIX, autoescape=True), key.endswith(".gz"))


def plan_window(
    session: Session,
    lookback_days: int,
    since: dt.date | None,
    until: dt.date | None = None,
    cutover: dt.date | None = None,
    last_day: dt.date | None = None,
    retry_from: dt.date | None = None,
) -> sources.Window:
    """The name dates a run lists: from (newest ingested name date - look-back), or
    ``since`` or ``retry_from`` (an object that failed) if earlier, to ``until``, and never
    past ``last_day`` (the last complete UTC day: objects of the day still running wait for
    the next run, whose look-back takes them).
    An empty ledger starts at ``since``, or at the cut-over day (less CUTOVER_MARGIN) if
    there is one, ``since`` or not; nothing starts before that. No ledger, no ``since`` and
    no cut-over day: the whole source up to ``last_day`` (development, the demo; a bucket is
    refused by ``list_window``). Ledger rows of the legacy import do
    not count (``log_objects``)."""
    newest = session.scalar(select(func.max(IngestedObject.name_hour)).where(log_objects()))
    start = None
    if newest is not None:
        start = newest.date() - dt.timedelta(days=lookback_days)
    if since is not None and (start is None or since < start):
        start = since
    if retry_from is not None and start is not None and retry_from < start:
        start = retry_from  # an object a run could not read: until it is read
    at_cutover = False  # the start is the earliest there is: --since cannot go back
    if cutover is not None:
        first = cutover - CUTOVER_MARGIN
        # An empty ledger starts at the cut-over day's margin whatever --since says (it
        # widens only): --since <cut-over day> left out the objects of the two days before,
        # which hold lines of the day, and later runs never go back to them.
        start = first if start is None or start < first or newest is None else start
        at_cutover = start <= first
    if until is not None and start is not None and until < start:
        if at_cutover:  # --since cannot go back past it
            hint = f"; the log ETL reads nothing dated before etl/logs_since {cutover}"
        else:
            hint = "" if since is not None and since <= until else "; give --since to go back"
        raise WebstatsError(f"--until {until} is before the window's start {start}{hint}")
    if last_day is not None and (until is None or until > last_day):
        until = last_day
    return sources.Window(start, until)


def select_objects(
    session: Session,
    objects: list[sources.LogObject],
    window: sources.Window,
    conflicts: list[str],
) -> list[sources.LogObject]:
    """The objects of the window not in the ledger, in (name hour, key) order.

    An object is its CloudFront name (``<dist>.<hour>.<unique>.gz``, unique to it), wherever
    it lies: the same name under another prefix or folder (a copy, a bucket reorganised) is
    the object the ledger holds, or one read once in this run, not a new one. Two of one name
    and different sizes (one cut short, or not CloudFront's): neither is read, each is named
    and added to ``conflicts`` (the run fails) until the wrong one is removed."""
    objects = [o for o in objects if o.name_hour.date() in window]
    q = select(IngestedObject.key, IngestedObject.size)
    if window.start is not None:
        start = window.start
        q = q.where(IngestedObject.name_hour >= dt.datetime(start.year, start.month, start.day))
    if window.until is not None:
        end = window.until + dt.timedelta(days=1)
        q = q.where(IngestedObject.name_hour < dt.datetime(end.year, end.month, end.day))
    sizes: dict[str, int] = {k: n for k, n in session.execute(q)}
    done = set(sizes)
    names = {sources.object_name(k): (k, sizes[k]) for k in sorted(done, reverse=True)}
    todo: dict[str, sources.LogObject] = {}  # by name
    new = (o for o in objects if o.key not in done and done.isdisjoint(o.aliases))
    for o in sorted(new, key=lambda o: (o.name_hour, o.key)):
        name = sources.object_name(o.key)
        other, size = names.setdefault(name, (o.key, o.size))
        if other == o.key:
            todo[name] = o
        elif size == o.size:
            log.warning(
                "%s: the same log object as %s (its CloudFront name); not read again",
                shown(o.key), shown(other),
            )  # fmt: skip
        else:
            log.error(
                "%s: not read; remove the wrong copy", _other_size(o.key, o.size, other, size)
            )
            first = todo.pop(name, None)  # read in this run: neither is
            conflicts += [shown(k.key) for k in (o, first) if k is not None]
    return sorted(todo.values(), key=lambda o: (o.name_hour, o.key))


def listed_summary(
    skipped: list[str], window: sources.Window, last: dt.date | None = None
) -> RunSummary:
    """The summary of a run that listed ``window``: ValidThru goes no further than its last
    day (the last complete day when it listed, ``last``). A window that reaches ``last``
    holds back the objects with downloads after it (``RunSummary.hold_after``); a backfill's
    earlier ``--until`` does not (the daily run's look-back would not return to them)."""
    through = window.until or db.last_complete_day()
    hold = through if last is not None and through >= last else None
    return RunSummary(skipped_names=len(skipped), through=through, hold_after=hold, window=window)


def list_window(
    settings: Settings, url: str, since: str | None, until: str | None
) -> tuple[sources.Source, list[sources.LogObject], list[str], sources.Window, dt.date]:
    """Open the source, plan the window and list it: (source, objects to ingest, skipped
    names, window, the last complete day when it was planned)."""
    since_day = parse_since(since)
    until_day = parse_since(until, "--until")
    if since_day and until_day and until_day < since_day:
        raise WebstatsError(f"--until {until_day} is before --since {since_day}")
    cutover = logs_since(settings)
    lookback = settings.get_int("etl/lookback_days")
    src = sources.open_source(url)
    with db.session_factory(settings.database_url)() as session:
        last = db.last_complete_day()
        retry = db.get_retry_from(session)
        window = plan_window(session, lookback, since_day, until_day, cutover, last, retry)
    if window.start is None and isinstance(src, sources.S3Source):
        # the whole bucket: months of objects, past the unit's time limit every day, and
        # the days of a legacy import counted twice (etl.md: never the bucket's beginning)
        raise ConfigError(
            "etl run: the ledger is empty and etl/logs_since is not set: the first run would "
            "read the whole bucket; set the cut-over day (etl/logs_since, docs/CUTOVER.md) or "
            "give --since"
        )
    objects, skipped = ([], []) if window.empty else src.list(window)
    with db.session_factory(settings.database_url)() as session:
        todo = select_objects(session, objects, window, src.unreadable)
    log.info(
        "%s: %d objects listed (names from %s to %s), %d to ingest",
        url,
        len(objects),
        window.start or "the beginning",
        window.until or "now",
        len(todo),
    )
    return src, todo, skipped, window, last


def run(
    settings: Settings,
    source: str | None = None,
    since: str | None = None,
    dry_run: bool = False,
    until: str | None = None,
) -> bool:
    """Ingest the new log objects of the source named from the window's start (look-back,
    ``since``, the cut-over day) to ``until``, and update the statistics.

    Returns False when any object failed (those are not in the ledger and are retried by
    the next run); the others are ingested regardless.
    """
    t0 = time.monotonic()
    url = source_url(settings, source)
    if not dry_run:
        ip_hash_key(settings, url)  # fail on configuration before reading anything
    src, todo, skipped, window, last = list_window(settings, url, since, until)
    summary = listed_summary(skipped, window, last)
    for k in skipped:
        log.info("skipped %s: not a log object name", k)
    # Folders that could not be read (logged by the source): the run goes on without them
    # and fails at the end, as for a corrupt object.
    summary.failures += src.unreadable
    summary.failed += len(src.unreadable)
    summary.failed_days += named_days(src.unreadable)
    pause_point("listed")
    if dry_run:
        for o in todo:
            log.info("would ingest %s (%d bytes)", shown(o.key), o.size)
        summary.objects = len(todo)
        with db.session_factory(settings.database_url)() as session:
            summary.valid_thru = db.get_valid_thru(session)  # as it is, the run not made
        summary.elapsed = time.monotonic() - t0
        log.info("%s", summary.line("etl run --dry-run").replace("ingested", "to ingest"))
        return summary.failed == 0
    if todo:  # which loop reads the lines (a pure-Python build is about half as fast)
        log.info("parsing with the %s parser in %d processes", parse.parser_name(),
                 min(_workers(settings), len(todo)))  # fmt: skip
    _ingest_objects(settings, url, todo, summary, store_new)
    finish_run(settings, summary)
    summary.elapsed = time.monotonic() - t0
    _say_held(summary)
    log.info("%s", summary.line())
    return summary.failed == 0


def _say_held(summary: RunSummary) -> None:
    """The objects held back, in a line of their own (the summary's may not change)."""
    if summary.held:
        log.info(
            "%d objects held back: they hold downloads of a day not over yet (after %s), "
            "read by the next run",
            summary.held, summary.hold_after,
        )  # fmt: skip


def reingest(settings: Settings, keys: list[str], source: str | None = None) -> None:
    """Re-read already ingested objects and replace their records; statistics follow."""
    t0 = time.monotonic()
    url = source_url(settings, source)
    src = sources.open_source(url)
    objects = [src.get(k) for k in dict.fromkeys(keys)]  # each once
    summary = RunSummary()
    _ingest_objects(settings, url, objects, summary, store_replacement)
    finish_run(settings, summary)
    summary.elapsed = time.monotonic() - t0
    log.info("%s", summary.line("etl reingest").replace("ingested", "re-ingested"))
    if summary.failed:
        raise WebstatsError(f"etl reingest: {summary.failed} objects failed (see above)")
