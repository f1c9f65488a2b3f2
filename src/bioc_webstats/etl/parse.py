"""Each log object reduced to counts per (category, package, day, client): the per-line loop.

Two loops with the same results: the Python one below and the C one (``_scan``, built by
setup.py), to which every decision of the rule (``rule``) is handed as cached callbacks.
Malformed lines are counted by reason, not fatal; an object with no ``#Fields:`` line before
its first data line fails as a whole (:class:`~.sources.LogFormatError`).
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
        _URIS.clear()
        _HITS.clear()
        if _SCANNER:  # its cached hit ids are those just forgotten
            _SCANNER[0].forget_uris()
    if len(_DIRS) > URI_CACHE_MAX or len(_FILES) > URI_CACHE_MAX:
        _DIRS.clear()
        _FILES.clear()


def _hit_of(uri: bytes) -> int:
    """The hit id (> 0) of a download path's (category, package), else 0; cached (short
    paths only: the cache is bounded in bytes as well as in entries)."""
    hit = _URIS.get(uri)
    if hit is None:
        pair = classify_uri(uri, _DIRS, _FILES)
        hit = 0 if pair is None else _HITS.setdefault(pair, len(_HITS) + 1)
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
    chunks: Iterable[bytes], name_hour: dt.datetime, floor: dt.date | None
) -> tuple[Any, list[dt.date]]:
    """Feed one object to the C scanner; returns it (to be finished) and its day list."""
    scanner = _scanner()
    center = epoch(name_hour)
    day_list: list[dt.date] = []

    def date(raw: bytes) -> tuple[int, int] | None:
        dv = date_secs(raw) if len(raw) == 10 else None
        if dv is None:
            return None
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
    return scanner, day_list


def _reasons(rejects: tuple[int, ...]) -> dict[str, int]:
    return {REASONS[i]: n for i, n in enumerate(rejects) if n}


def _count_native(
    chunks: Iterable[bytes], name_hour: dt.datetime, floor: dt.date | None = None
) -> ObjectCounts:
    """count_object with the per-line loop in C (``_scan``): the same rule, decided by the
    same functions (called once per distinct value, their answers cached in C)."""
    scanner, day_list = _scan_object(chunks, name_hour, floor)
    lines_read, accepted, rejects, counts, fields_seen = scanner.finish()
    if not fields_seen:
        raise LogFormatError("no #Fields line (empty or header-less file)")
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
    lines without the object id (the Python loop); the (category, package, year, month) it
    touches, and line counts."""

    copy_data: bytes
    copy_format: str  # "binary" or "text"
    touched: set[tuple[str, str, int, int]]
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
) -> ObjectRecords:
    """count_object, with the counts as COPY text and the client addresses hashed by
    ``hash_ip`` (each address once per process while ``hash_ip`` is the same function)."""
    with _no_cyclic_gc():
        if parser_name() == "native":
            return _records_native(chunks, name_hour, hash_ip, floor)
        return _records_python(count_object(chunks, name_hour, floor), hash_ip)


def _records_native(
    chunks: Iterable[bytes],
    name_hour: dt.datetime,
    hash_ip: Callable[[bytes], int],
    floor: dt.date | None = None,
) -> ObjectRecords:
    scanner, day_list = _scan_object(chunks, name_hour, floor)
    pairs: dict[int, tuple[str, str]] = {}

    def pair_text(hit: int) -> bytes:
        if hit not in pairs:  # (the last line of the object may have added one)
            pairs.update((i, pair) for pair, i in _HITS.items())
        return "\t".join(pairs[hit]).encode("ascii")

    lines_read, accepted, rejects, text, day_hits, fields_seen = scanner.finish_records(
        hash_ip, pair_text
    )
    if not fields_seen:
        raise LogFormatError("no #Fields line (empty or header-less file)")
    if any(h not in pairs for _, h in day_hits):  # (the C side caches pair texts)
        pairs.update((i, pair) for pair, i in _HITS.items())
    touched = set()
    for d, h in day_hits:
        day = day_list[d]
        touched.add((*pairs[h], day.year, day.month))
    days = {day_list[d] for d, _ in day_hits}
    return ObjectRecords(
        text, "binary", touched, max(days, default=None), lines_read, accepted, sum(rejects),
        _reasons(rejects),
    )  # fmt: skip


def _records_python(res: ObjectCounts, hash_ip: Callable[[bytes], int]) -> ObjectRecords:
    if _IP_HASHER[:1] != [hash_ip] or len(_IP_HASHES) > IP_HASH_CACHE_MAX:
        _IP_HASHES.clear()
        _IP_HASHER[:] = [hash_ip]
    hashes = _IP_HASHES
    touched = set()
    parts: list[str] = []
    for day, per_pkg in res.by_day.items():
        dstr = day.isoformat()
        for (cat, pkg), ips in per_pkg.items():
            touched.add((cat, pkg, day.year, day.month))
            prefix = f"{cat}\t{pkg}\t{dstr}\t"
            for ip, n in ips.items():
                h = hashes.get(ip)
                if h is None:
                    h = hashes[ip] = hash_ip(ip)
                parts.append(f"{prefix}{h}\t{n}\n")
    return ObjectRecords(
        "".join(parts).encode("ascii"), "text", touched, res.max_day, res.lines_read,
        res.accepted, res.rejected, res.reject_reasons,
    )  # fmt: skip


def with_object_id(copy_data: bytes, copy_format: str, object_id: int) -> bytes:
    """An ObjectRecords' COPY data with ``object_id`` in every row (the last column)."""
    if copy_format == "binary":
        return _scan.with_object_id(copy_data, object_id)
    return copy_data.replace(b"\n", b"\t%d\n" % object_id)


def _count(
    chunks: Iterable[bytes], name_hour: dt.datetime, floor: dt.date | None = None
) -> ObjectCounts:
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
    lines_read = 0

    for lines in line_batches(chunks):
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
    if nf < 0:
        raise LogFormatError("no #Fields line (empty or header-less file)")
    # Back to the public shape: day → (category, package) → ip → n.
    pairs = {i: pair for pair, i in _HITS.items()}
    accepted = 0
    for day, per_hit in list(res.by_day.items()):
        out: dict[tuple[str, str], dict[bytes, int]] = {}
        for hit, ips in per_hit.items():  # type: ignore[attr-defined]
            if ips:
                out[pairs[hit]] = dict(ips)
                accepted += sum(ips.values())
        if out:
            res.by_day[day] = out
        else:  # a day of valid lines but no download
            del res.by_day[day]
    res.lines_read, res.accepted, res.rejected = lines_read, accepted, sum(reasons.values())
    return res
