"""Each log object reduced to counts per (category, package, day, client): the per-line loop.

Two loops with the same results: the Python one below and the C one (``_scan``, built by
setup.py), to which every decision of the rule (``rule``) is handed as cached callbacks.
Malformed lines are counted by reason, not fatal; an object with no ``#Fields:`` line before
its first data line fails as a whole (:class:`~.sources.LogFormatError`).

Memory is bounded by bytes whatever one object holds: past ``SPILL_BYTES`` of counts, or
``HITS_MAX`` distinct (category, package), :func:`count_records` hands the records counted so
far to its ``spill`` function and forgets them. A client may then have two records of one
day and package in one object; every count sums them (downloads) or takes them as a set (IPs).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from . import sources
from .rule import (
    BAD_IP,
    DL,
    KEY_CACHE_MAX,
    MAX_IP,
    MAX_SKEW,
    MAX_URI,
    REASONS,
    classify_uri,
    date_secs,
    dt_check,
    epoch,
    fields_layout,
    status_class,
)
from .sources import LogFormatError, decompress, line_batches

try:  # the per-line loop in C (setup.py); without it, the Python loop below, same results
    from . import _scan  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a pure-Python build
    _scan = None
# WEBSTATS_ETL_PARSER=python runs the Python loop even where the C one is built (tests, bench)
_FORCE_PYTHON = os.environ.get("WEBSTATS_ETL_PARSER", "") == "python"


@dataclass
class ObjectCounts:
    """What one object contributed: downloads per day → (category, package) → client IP
    text → count, and line counts."""

    by_day: dict[dt.date, dict[tuple[str, str], dict[bytes, int]]] = field(default_factory=dict)
    lines_read: int = 0
    accepted: int = 0
    rejected: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def counts(self) -> dict[tuple[tuple[str, str], dt.date, bytes], int]:
        """The same counts keyed flat by ((category, package), day, IP)."""
        return {
            (hit, day, ip): n
            for day, hits in self.by_day.items()
            for hit, ips in hits.items()
            for ip, n in ips.items()
        }

    @property
    def max_day(self) -> dt.date | None:
        return max((d for d, hits in self.by_day.items() if hits), default=None)


URI_CACHE_MAX = 100_000
# An object's counts kept in memory before they go on as records: 1 M distinct IPv6 clients
# took 280 MB (C) or 450 MB (Python), 1 M distinct 190-byte package names 2 GB.
SPILL_BYTES = 16 << 20
HALF_CACHE_MAX = 50_000  # directories, file names (the two halves of a download path)
HITS_MAX = 20_000  # distinct (category, package) of the counts in memory (a day has ~8,000)
_PY_ENTRY = 160  # bytes of one count in the Python loop's dicts (a client value <= MAX_IP)
_CHECK_LINES = 20_000  # lines between two sums of the Python loop's counts
_ROW = 64  # bytes of a record's COPY row besides its category and package names
_PAIR_MAX = [0]  # the longest category + package of the hits (_HITS)
_DAY_OUTSIDE = -2  # the C scanner's code of a date with no second in the object's window
_CACHE_MAX = 100_000  # entries of the Python loop's per-object date/time, day, status caches
_URIS: dict[bytes, int] = {}  # cs-uri-stem → hit id (> 0), or 0: not a download path
_HITS: dict[tuple[str, str], int] = {}  # (category, package) → hit id
_DIRS: dict[bytes, tuple[str, bool] | None] = {}
_FILES: dict[bytes, tuple[str, bytes] | None] = {}


def _new_bucket() -> defaultdict[int, defaultdict[bytes, int]]:
    return defaultdict(partial(defaultdict, int))


def count_object(
    chunks: Iterable[bytes], name_hour: dt.datetime, floor: dt.date | None = None
) -> ObjectCounts:
    """Stream one object and count its downloads (the rule of etl.md); malformed lines, and
    lines dated before ``floor`` (the cut-over day), are counted by reason. Raises
    LogFormatError for an unreadable object or a missing #Fields."""
    with _no_cyclic_gc():
        if parser_name() == "native":
            return _count_native(chunks, name_hour, floor)
        return _count(chunks, name_hour, floor)


def _floor_secs(floor: dt.date | None) -> int | None:
    return None if floor is None else epoch(dt.datetime(floor.year, floor.month, floor.day))


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    # A parse allocates and frees millions of small objects and creates no cycles: the
    # cyclic collector would only rescan the growing count dicts, again and again.
    gc_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc_on:
            gc.enable()


def parser_name() -> str:
    """Which per-line loop ``count_object`` runs: "native" (C) or "python"."""
    return "native" if _scan is not None and not _FORCE_PYTHON else "python"


def _reset_rule_caches() -> None:
    """Empty the process-wide caches of the download rule once they outgrow their bound."""
    if len(_URIS) > URI_CACHE_MAX or len(_HITS) > URI_CACHE_MAX:
        _forget_hits()
    _bound_halves()


def _bound_halves() -> None:
    # Keys of at most KEY_CACHE_MAX bytes, so a bound on entries bounds the bytes; checked on
    # every miss: one object can hold a million distinct file names.
    if len(_DIRS) > HALF_CACHE_MAX or len(_FILES) > HALF_CACHE_MAX:
        _DIRS.clear()
        _FILES.clear()


def _hit_of(uri: bytes) -> int:
    """The hit id (> 0) of a download path's (category, package), else 0; cached (short
    paths only: the cache is bounded in bytes as well as in entries)."""
    hit = _URIS.get(uri)
    if hit is None:
        pair = classify_uri(uri, _DIRS, _FILES)
        _bound_halves()
        hit = 0 if pair is None else _HITS.get(pair, 0)
        if pair is not None and not hit:
            hit = _HITS[pair] = len(_HITS) + 1
            _PAIR_MAX[0] = max(_PAIR_MAX[0], len(pair[0]) + len(pair[1]))
        if len(_URIS) < URI_CACHE_MAX and len(uri) <= KEY_CACHE_MAX:
            _URIS[uri] = hit
    return hit


LONG = REASONS[5]  # "cs-uri-stem too long"
_SCANNER: list[Any] = []  # the process's C scanner, made on first use
IP_HASH_CACHE_MAX = 200_000  # client addresses whose hash a parse process keeps
_IP_HASHES: dict[bytes, int] = {}  # of the Python loop's records (the C loop has its own)
_IP_HASHER: list[Callable[[bytes], int]] = []  # the function _IP_HASHES holds answers of


def _header(line: bytes | None) -> tuple[int, ...]:
    if line is None:
        raise LogFormatError("no #Fields line before the first data line")
    return fields_layout(line)


def _scanner() -> Any:
    if not _SCANNER:
        rule = (_header, status_class, _hit_of, b"GET", tuple(BAD_IP))
        _SCANNER.append(_scan.Scanner(*rule, URI_CACHE_MAX, IP_HASH_CACHE_MAX, sources.MAX_LINE))
    return _SCANNER[0]


def _scan_object(
    chunks: Iterable[bytes],
    name_hour: dt.datetime,
    floor: dt.date | None,
    after_piece: Callable[[Any], None] | None = None,
) -> tuple[Any, list[dt.date]]:
    """Feed one object to the C scanner (``after_piece(scanner)`` after every piece); returns
    it (to be finished) and its day list."""
    scanner = _scanner()
    center = epoch(name_hour)
    day_list: list[dt.date] = []

    def date(raw: bytes) -> tuple[int, int] | None:
        dv = date_secs(raw) if len(raw) == 10 else None
        if dv is None:
            return None
        if dv[0] + 86400 <= center - MAX_SKEW or dv[0] > center + MAX_SKEW:
            return _DAY_OUTSIDE, 0  # no second of it is in the window: no day index
        day_list.append(dv[1])
        return len(day_list) - 1, dv[0]

    _reset_rule_caches()
    low = _floor_secs(floor)
    if low is None:
        scanner.begin(date, center - MAX_SKEW, center + MAX_SKEW)
    else:
        scanner.begin(date, center - MAX_SKEW, center + MAX_SKEW, low)
    for piece in decompress(chunks):
        scanner.feed(piece)
        if after_piece is not None:
            after_piece(scanner)
    return scanner, day_list


def _reasons(rejects: tuple[int, ...]) -> dict[str, int]:
    return {REASONS[i]: n for i, n in enumerate(rejects) if n}


def _count_native(
    chunks: Iterable[bytes], name_hour: dt.datetime, floor: dt.date | None = None
) -> ObjectCounts:
    """count_object with the per-line loop in C (``_scan``): the same rule, decided by the
    same functions (called once per distinct value, their answers cached in C)."""
    scanner, day_list = _scan_object(chunks, name_hour, floor)
    # (whether a #Fields line came: without one there was no data line either, which would
    # have failed the object; an object of headers or blank lines only is empty, not bad)
    lines_read, accepted, rejects, counts, _fields_seen = scanner.finish()
    pairs = {i: pair for pair, i in _HITS.items()}
    res = ObjectCounts(lines_read=lines_read, accepted=accepted, rejected=sum(rejects))
    res.reject_reasons = _reasons(rejects)
    for d, per_hit in counts.items():
        res.by_day[day_list[d]] = {pairs[h]: ips for h, ips in per_hit.items()}
    return res


@dataclass
class ObjectRecords:
    """What one object contributed, ready for PostgreSQL's COPY of (category, package, day,
    ip_hash, downloads, object_id): one row per (category, package, day, client), in COPY's
    binary format with object id 0 (the C loop; :func:`with_object_id` sets it) or as text
    lines without the object id (the Python loop); its latest day, and line counts. Records
    handed to ``spill`` on the way are not in ``copy_data``."""

    copy_data: bytes
    copy_format: str  # "binary" or "text"
    max_day: dt.date | None
    lines_read: int
    accepted: int
    rejected: int
    reject_reasons: dict[str, int]


def count_records(
    chunks: Iterable[bytes],
    name_hour: dt.datetime,
    hash_ip: Callable[[bytes], int],
    floor: dt.date | None = None,
    spill: Callable[[bytes], None] | None = None,
) -> ObjectRecords:
    """count_object, with the counts as COPY data and the client addresses hashed by
    ``hash_ip`` (each address once per process while ``hash_ip`` is the same function).
    With ``spill``, memory is bounded: the records counted so far go to ``spill`` (COPY data
    of the same format) whenever they pass ``SPILL_BYTES`` or ``HITS_MAX``."""
    with _no_cyclic_gc():
        if parser_name() == "native":
            return _records_native(chunks, name_hour, hash_ip, floor, spill)
        return _records_python(chunks, name_hour, hash_ip, floor, spill)


def _forget_hits() -> None:
    """Renumber the (category, package) from 1: only between an object's records."""
    _URIS.clear()
    _HITS.clear()
    _PAIR_MAX[0] = 0
    if _SCANNER:
        _SCANNER[0].forget_uris()


def _records_native(
    chunks: Iterable[bytes],
    name_hour: dt.datetime,
    hash_ip: Callable[[bytes], int],
    floor: dt.date | None,
    spill: Callable[[bytes], None] | None,
) -> ObjectRecords:
    pairs: dict[int, tuple[str, str]] = {}
    days: set[int] = set()  # day indexes with records

    def pair_text(hit: int) -> bytes:
        if hit not in pairs:  # (the last line of the object may have added one)
            pairs.update((i, pair) for pair, i in _HITS.items())
        return "\t".join(pairs[hit]).encode("ascii")

    def bound(scanner: Any) -> None:
        # the table, and the COPY data its records become (names of up to 200 characters)
        table, entries = scanner.held()
        if table + entries * (_ROW + _PAIR_MAX[0]) <= SPILL_BYTES and len(_HITS) <= HITS_MAX:
            return
        text, day_hits = scanner.take_records(hash_ip, pair_text)
        days.update(d for d, _ in day_hits)
        spill(text)  # type: ignore[misc]
        if len(_HITS) > HITS_MAX:
            _forget_hits()
            pairs.clear()

    scanner, day_list = _scan_object(chunks, name_hour, floor, bound if spill else None)
    lines_read, accepted, rejects, text, day_hits, _fields_seen = scanner.finish_records(
        hash_ip, pair_text
    )
    days.update(d for d, _ in day_hits)
    return ObjectRecords(
        text, "binary", max((day_list[d] for d in days), default=None), lines_read, accepted,
        sum(rejects), _reasons(rejects),
    )  # fmt: skip


def _records_python(
    chunks: Iterable[bytes],
    name_hour: dt.datetime,
    hash_ip: Callable[[bytes], int],
    floor: dt.date | None,
    spill: Callable[[bytes], None] | None,
) -> ObjectRecords:
    if _IP_HASHER[:1] != [hash_ip] or len(_IP_HASHES) > IP_HASH_CACHE_MAX:
        _IP_HASHES.clear()
        _IP_HASHER[:] = [hash_ip]
    days: set[dt.date] = set()

    def text(by_day: dict[dt.date, dict[tuple[str, str], dict[bytes, int]]]) -> bytes:
        hashes = _IP_HASHES
        parts: list[str] = []
        for day, per_pkg in by_day.items():
            days.add(day)
            prefix_day = f"\t{day.isoformat()}\t"
            for (cat, pkg), ips in per_pkg.items():
                prefix = f"{cat}\t{pkg}{prefix_day}"
                for ip, n in ips.items():
                    h = hashes.get(ip)
                    if h is None:
                        if len(hashes) >= IP_HASH_CACHE_MAX:  # bounded: start again
                            hashes.clear()
                        h = hashes[ip] = hash_ip(ip)
                    parts.append(f"{prefix}{h}\t{n}\n")
        return "".join(parts).encode("ascii")

    part = None if spill is None else (lambda by_day: spill(text(by_day)))
    res = _count(chunks, name_hour, floor, part)
    return ObjectRecords(
        text(res.by_day), "text", max(days, default=None), res.lines_read, res.accepted,
        res.rejected, res.reject_reasons,
    )  # fmt: skip


def with_object_id(copy_data: bytes, copy_format: str, object_id: int) -> bytes:
    """An ObjectRecords' COPY data with ``object_id`` in every row (the last column)."""
    if copy_format == "binary":
        return _scan.with_object_id(copy_data, object_id)
    return copy_data.replace(b"\n", b"\t%d\n" % object_id)


def _count(
    chunks: Iterable[bytes],
    name_hour: dt.datetime,
    floor: dt.date | None = None,
    spill: Callable[[dict[dt.date, dict[tuple[str, str], dict[bytes, int]]]], None] | None = None,
) -> ObjectCounts:
    """count_object's Python loop; with ``spill``, the counts so far (in ObjectCounts.by_day's
    shape) go to it and are forgotten whenever they pass SPILL_BYTES or HITS_MAX."""
    res = ObjectCounts()
    reasons = res.reject_reasons
    center = epoch(name_hour)
    lo, hi = center - MAX_SKEW, center + MAX_SKEW
    low = _floor_secs(floor)
    # Per-object caches (a file repeats the same seconds, statuses and URIs many times),
    # each looked up once per line; a miss takes the slow path below, which fills them.
    # date → time → the day's counts {hit id: {ip: n}}, for valid date and time only
    dcache: defaultdict[bytes, dict[bytes, defaultdict[int, defaultdict[bytes, int]]]]
    dcache = defaultdict(dict)
    dall: dict[bytes, Any] = {}  # every date/time key seen → its day's counts, or a reason
    days: dict[bytes, tuple[int, dt.date] | None] = {}
    scache: dict[bytes, int] = {}  # status → BAD, OTHER or DL
    _reset_rule_caches()
    ucache = _URIS
    bad_ip = BAD_IP
    tab, get, dl = b"\t", b"GET", DL
    nf = -1  # number of fields; -1 until the first #Fields line
    cut = cut1 = rest_tabs = -1  # split limit, pieces expected, tabs after the limit
    idate = itime = iip = imethod = iuri = istatus = 0
    lines_read = accepted = 0
    check_at = _CHECK_LINES  # (a line adds one count at most: no need to sum them before)

    for lines in line_batches(chunks):
        # The per-object caches: one entry per distinct value, a handful in a real object.
        if len(dall) > _CACHE_MAX:
            dall.clear()
            dcache.clear()  # (shortcuts only: the counts stay in res.by_day)
        if len(days) > _CACHE_MAX:
            days.clear()
        if len(scache) > _CACHE_MAX:
            scache.clear()
        if spill is not None and (lines_read >= check_at or len(_HITS) > HITS_MAX):
            check_at = lines_read + _CHECK_LINES
            if _over_bound(res.by_day):
                done, res.by_day = _public_counts(res.by_day), {}
                dcache.clear()  # (they point at the days' old count dicts)
                dall.clear()
                accepted += _downloads(done)
                spill(done)
                if len(_HITS) > HITS_MAX:
                    _forget_hits()
        lines_read += len(lines)
        for line in lines:
            # Split only up to the last column needed; the tabs of the rest are counted.
            f = line.split(tab, cut)
            if len(f) != cut1 or f[cut].count(tab) != rest_tabs:
                if not line.strip():
                    lines_read -= 1
                    continue
                if line[:1] == b"#":
                    lines_read -= 1
                    if line.startswith(b"#Fields:"):
                        nf, idate, itime, iip, imethod, iuri, istatus = fields_layout(line)
                        cut = max(idate, itime, iip, imethod, iuri, istatus) + 1
                        cut = min(cut, nf - 1)
                        cut1, rest_tabs = cut + 1, nf - 1 - cut
                    continue
                if nf < 0:
                    raise LogFormatError("no #Fields line before the first data line")
                reasons["column count"] = reasons.get("column count", 0) + 1
                continue
            bucket = dcache[f[idate]].get(f[itime])
            if bucket is None:
                dkey = f[idate] + tab + f[itime] + tab
                found = dall.get(dkey)
                if found is None:
                    day = dt_check(dkey, lo, hi, days, low)
                    if day.__class__ is str:
                        found = day
                    else:
                        found = res.by_day.get(day)  # type: ignore[arg-type]
                        if found is None:
                            found = res.by_day[day] = _new_bucket()  # type: ignore[index]
                    if len(dkey) == 20:  # YYYY-MM-DD HH:MM:SS: bounded keys only
                        dall[dkey] = found
                if found.__class__ is str:
                    if not dcache[f[idate]]:  # no cache entry for a malformed date
                        del dcache[f[idate]]
                    reasons[found] = reasons.get(found, 0) + 1
                    continue
                bucket = dcache[f[idate]][f[itime]] = found
            st = scache.get(f[istatus])
            if not st:
                if st is None:
                    st = status_class(f[istatus])
                    if len(f[istatus]) <= KEY_CACHE_MAX:
                        scache[f[istatus]] = st
                if not st:
                    reasons["status"] = reasons.get("status", 0) + 1
                    continue
            ip = f[iip]
            if ip in bad_ip or len(ip) > MAX_IP:
                reasons["c-ip"] = reasons.get("c-ip", 0) + 1
                continue
            if len(f[iuri]) > MAX_URI:
                reasons[LONG] = reasons.get(LONG, 0) + 1
                continue
            if st is dl and f[imethod] == get:
                hit = ucache.get(f[iuri])
                if hit is None:
                    hit = _hit_of(f[iuri])
                if not hit:
                    continue
                bucket[hit][ip] += 1
    res.by_day = _public_counts(res.by_day)
    accepted += _downloads(res.by_day)
    res.lines_read, res.accepted, res.rejected = lines_read, accepted, sum(reasons.values())
    return res


def _over_bound(by_day: dict) -> bool:
    """Whether the Python loop's counts (by day, by hit id) pass SPILL_BYTES or HITS_MAX
    (a sum over the (day, hit) pairs, not over the counts)."""
    entries = sum(len(ips) for per_hit in by_day.values() for ips in per_hit.values())
    return entries * (_PY_ENTRY + _ROW + _PAIR_MAX[0]) > SPILL_BYTES or len(_HITS) > HITS_MAX


def _downloads(by_day: dict[dt.date, dict[tuple[str, str], dict[bytes, int]]]) -> int:
    return sum(n for per_pkg in by_day.values() for ips in per_pkg.values() for n in ips.values())


def _public_counts(by_day: dict) -> dict[dt.date, dict[tuple[str, str], dict[bytes, int]]]:
    """The loop's counts by day and hit id in the public shape: day → (category, package) →
    ip → n (days and packages without a download left out)."""
    pairs = {i: pair for pair, i in _HITS.items()}
    out: dict[dt.date, dict[tuple[str, str], dict[bytes, int]]] = {}
    for day, per_hit in by_day.items():
        per_pkg = {pairs[hit]: dict(ips) for hit, ips in per_hit.items() if ips}
        if per_pkg:  # (a day of valid lines but no download is left out)
            out[day] = per_pkg
    return out
