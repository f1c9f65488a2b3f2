"""CloudFront standard access logs: where they are, what they are called, what they say.

Sources are a local directory (recursive) or ``s3://bucket/prefix``. Objects are streamed in
compressed chunks through one gzip decompressor (ISA-L's, else zlib's) and come out in pieces
of bounded size, so memory does not grow with the file. Each
object is reduced to counts per (category, package, day, client) — the download rule of
etl.md — with malformed lines counted, not fatal. A file that is not complete gzip, or has no
``#Fields:`` line before its first data line, fails as a whole (:class:`LogFormatError`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import hashlib
import hmac
import os
import re
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .categories import BY_REPO_PATH
from .errors import WebstatsError

try:  # ISA-L's inflate (the isal wheel) gunzips about three times as fast as zlib's
    from isal import isal_zlib as _inflate

    _INFLATE_ERRORS: tuple[type[Exception], ...] = (_inflate.error, zlib.error)
except ImportError:  # pragma: no cover - same results, slower
    _inflate = zlib  # type: ignore[no-redef]
    _INFLATE_ERRORS = (zlib.error,)

try:  # the per-line loop in C (setup.py); without it, the Python loop below, same results
    from . import _scan  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a pure-Python build
    _scan = None
# WEBSTATS_ETL_PARSER=python runs the Python loop even where the C one is built (tests, bench)
_FORCE_PYTHON = os.environ.get("WEBSTATS_ETL_PARSER", "") == "python"

CHUNK = 1 << 20  # compressed bytes read at a time
OUT_MAX = 1 << 20  # text bytes decompressed at a time (memory stays flat whatever the ratio)

# <distribution-id>.<YYYY-MM-DD-HH>.<unique>.gz, at any depth (the key's last segment)
_NAME = re.compile(
    r"^(?P<dist>[A-Za-z0-9]+)\.(?P<date>\d{4}-\d{2}-\d{2})-(?P<hour>\d{2})\.(?P<uniq>[A-Za-z0-9]+)\.gz$"
)

# The download rule on the raw cs-uri-stem after collapsing runs of "/": group 1 the repo,
# group 2 (src) or 3 (bin) the package, a valid R name. <version>, <R version> and the other
# dirs are single path segments. The same pattern runs in Athena (athena.py), so it is kept
# to syntax that Python and Trino read alike.
_NAME_RE = r"([A-Za-z][A-Za-z0-9.]*[A-Za-z0-9])_[^/]+"
DOWNLOAD_PATTERN = (
    r"/packages/[^/]+/(bioc|data/annotation|data/experiment|workflows)/"
    r"(?:src/contrib/" + _NAME_RE + r"\.tar\.gz"
    r"|bin/(?:[^/]+/)+contrib/[^/]+/" + _NAME_RE + r"\.(?:tgz|zip|tar\.gz))"
)
_SLASHES = re.compile(rb"/{2,}")
DOWNLOAD_STATUS = frozenset({200, 301, 302, 307, 308})
_BAD, _OTHER, _DL = 0, 1, 2  # a status: not a number, another number, a download status
_BAD_IP = frozenset({b"", b"-"})  # a missing c-ip
# Today's 33 #Fields of a CloudFront standard log (old files have the first 15).
CLOUDFRONT_FIELDS: tuple[str, ...] = tuple(
    (
        "date time x-edge-location sc-bytes c-ip cs-method cs(Host) cs-uri-stem sc-status "
        "cs(Referer) cs(User-Agent) cs-uri-query cs(Cookie) x-edge-result-type x-edge-request-id "
        "x-host-header cs-protocol cs-bytes time-taken x-forwarded-for ssl-protocol ssl-cipher "
        "x-edge-response-result-type cs-protocol-version fle-status fle-encrypted-fields c-port "
        "time-to-first-byte x-edge-detailed-result-type sc-content-type sc-content-len "
        "sc-range-start sc-range-end"
    ).split()
)
REQUIRED_FIELDS = ("date", "time", "c-ip", "cs-method", "cs-uri-stem", "sc-status")
MAX_SKEW = 48 * 3600  # seconds a line's timestamp may be away from the object's hour
_REPO_CATEGORY = {k.encode(): v.prefix for k, v in BY_REPO_PATH.items()}


class LogFormatError(WebstatsError):
    """The object as a whole cannot be read (corrupt, truncated, not gzip, no #Fields)."""


@dataclass(frozen=True)
class LogObject:
    """One log object of a source: its key (relative path or S3 key) and name hour (UTC)."""

    key: str
    size: int
    name_hour: dt.datetime
    etag: str | None = None


def parse_name(key: str) -> dt.datetime | None:
    """The hour (UTC, naive) in ``<dist>.<YYYY-MM-DD-HH>.<unique>.gz``; None if not a log name."""
    m = _NAME.match(key.rsplit("/", 1)[-1])
    if not m:
        return None
    try:
        day = dt.date.fromisoformat(m["date"])
    except ValueError:
        return None
    hour = int(m["hour"])
    if hour > 23:
        return None
    return dt.datetime(day.year, day.month, day.day, hour)


# --- sources ---------------------------------------------------------------------------------


class Source:
    """Where log objects live. ``list`` returns (log objects, keys skipped as not log names)."""

    url: str

    def list(self) -> tuple[list[LogObject], list[str]]:
        raise NotImplementedError

    def chunks(self, obj: LogObject) -> Iterator[bytes]:
        """The raw (compressed) bytes of ``obj``, in chunks."""
        raise NotImplementedError

    def get(self, key: str) -> LogObject:
        """Describe one object by key (for re-ingest); WebstatsError if absent."""
        raise NotImplementedError


class DirSource(Source):
    """A local directory, searched recursively; keys are paths relative to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)
        if not root.is_dir():
            raise WebstatsError(f"log source {root}: not a directory")

    def list(self) -> tuple[list[LogObject], list[str]]:
        objects: list[LogObject] = []
        skipped: list[str] = []
        for path in sorted(self.root.rglob("*")):
            if not path.is_file():
                continue
            key = path.relative_to(self.root).as_posix()
            hour = parse_name(key)
            if hour is None:
                skipped.append(key)
            else:
                objects.append(LogObject(key, path.stat().st_size, hour))
        return objects, skipped

    def get(self, key: str) -> LogObject:
        path = self.root / key
        hour = parse_name(key)
        if hour is None or not path.is_file() or ".." in Path(key).parts:
            raise WebstatsError(f"{key}: no such log object in {self.root}")
        return LogObject(key, path.stat().st_size, hour)

    def chunks(self, obj: LogObject) -> Iterator[bytes]:
        try:
            with (self.root / obj.key).open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk
        except OSError as exc:
            raise LogFormatError(f"cannot read: {exc.strerror}") from None


class S3Source(Source):
    """``s3://bucket/prefix``: listed with the ListObjectsV2 paginator, read by streaming."""

    def __init__(self, url: str, client: Any = None, page_size: int | None = None) -> None:
        rest = url.removeprefix("s3://")
        self.bucket, _, self.prefix = rest.partition("/")
        if not self.bucket:
            raise WebstatsError(f"log source {url}: no bucket name")
        self.url = url
        self.page_size = page_size
        if client is None:
            from .aws import client as aws_client

            client = aws_client("s3")
        self.client = client

    def _aws(self, what: str, exc: BaseException) -> WebstatsError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            why = f"{err.get('Code', 'ClientError')}: {err.get('Message', '')}".rstrip(": ")
        else:
            why = f"{type(exc).__name__}: {exc}"
        return WebstatsError(f"s3://{self.bucket}/{what}: {why}")

    def list(self) -> tuple[list[LogObject], list[str]]:
        from botocore.exceptions import BotoCoreError, ClientError

        objects: list[LogObject] = []
        skipped: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        config = {"PageSize": self.page_size} if self.page_size else {}
        try:
            for page in paginator.paginate(
                Bucket=self.bucket, Prefix=self.prefix, PaginationConfig=config
            ):
                for item in page.get("Contents", ()):
                    key = item["Key"]
                    if key.endswith("/"):
                        continue
                    hour = parse_name(key)
                    if hour is None:
                        skipped.append(key)
                    else:
                        etag = str(item.get("ETag", "")).strip('"') or None
                        objects.append(LogObject(key, int(item["Size"]), hour, etag))
        except (BotoCoreError, ClientError) as exc:
            raise self._aws(self.prefix, exc) from None
        return objects, skipped

    def get(self, key: str) -> LogObject:
        from botocore.exceptions import BotoCoreError, ClientError

        hour = parse_name(key)
        if hour is None:
            raise WebstatsError(f"{key}: not a log object name")
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise self._aws(key, exc) from None
        etag = str(head.get("ETag", "")).strip('"') or None
        return LogObject(key, int(head["ContentLength"]), hour, etag)

    def chunks(self, obj: LogObject) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=obj.key)["Body"]
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()
        except (BotoCoreError, ClientError) as exc:
            raise LogFormatError(f"cannot read: {self._aws(obj.key, exc)}") from None


def open_source(url: str) -> Source:
    """A source from ``s3://bucket/prefix`` or a directory path."""
    if url.startswith("s3://"):
        return S3Source(url)
    return DirSource(Path(url))


# --- reading -----------------------------------------------------------------------------------


def decompress(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Gunzip a stream of chunks (several gzip members allowed). LogFormatError if the
    stream is empty, not gzip, corrupt or truncated."""
    d = _inflate.decompressobj(wbits=31)
    fed = False  # bytes went into the current member and it has not ended yet
    total = 0
    try:
        for chunk in chunks:
            total += len(chunk)
            while chunk:
                fed = True
                out = d.decompress(chunk, OUT_MAX)
                if out:
                    yield out
                if d.eof:  # another member may follow
                    chunk = d.unused_data
                    d = _inflate.decompressobj(wbits=31)
                    fed = False
                    continue
                chunk = d.unconsumed_tail  # what the output limit left of the chunk
                while not chunk and len(out) == OUT_MAX and not d.eof:
                    out = d.decompress(b"", OUT_MAX)  # output still held by the decompressor
                    if out:
                        yield out
                if d.eof:
                    chunk = d.unused_data
                    d = _inflate.decompressobj(wbits=31)
                    fed = False
    except _INFLATE_ERRORS as exc:
        raise LogFormatError(f"not a valid gzip file ({exc})") from None
    if total == 0:
        raise LogFormatError("empty file (0 bytes), not gzip")
    if fed:
        raise LogFormatError("truncated gzip (unexpected end of data)")


# A line longer than this (line end excluded) is malformed, and is not kept whole in memory:
# an object without line ends is read in bounded memory too. CloudFront's lines are < 20 kB.
MAX_LINE = 1 << 20
_OVERLONG = b"\x00"  # what an overlong line becomes: not blank, no comment, no tabs


def line_batches(chunks: Iterable[bytes]) -> Iterator[list[bytes]]:
    """Lists of lines (without line ends; CRLF accepted) of a gzip stream; a line longer
    than MAX_LINE comes as _OVERLONG."""
    rest = b""
    for data in decompress(chunks):
        if b"\r" in data or rest[-1:] == b"\r":
            lines = (rest + data).replace(b"\r\n", b"\n").split(b"\n")
        else:  # the usual case: no copy of the whole chunk
            lines = data.split(b"\n")
            if rest:
                lines[0] = rest + lines[0]
        rest = lines.pop()
        if len(rest) > MAX_LINE + 2:  # enough to know it is too long, with a CR or not
            rest = rest[: MAX_LINE + 2]
        if lines and max(map(len, lines)) > MAX_LINE:
            lines = [_OVERLONG if len(x) > MAX_LINE else x for x in lines]
        yield lines
    if rest:  # a last line without a line end
        last = rest.removesuffix(b"\r")
        yield [_OVERLONG if len(last) > MAX_LINE else last]


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


def _epoch(d: dt.datetime) -> int:
    return int(d.replace(tzinfo=dt.UTC).timestamp())


_DATE = re.compile(rb"^\d{4}-\d{2}-\d{2}$")


def _date_secs(raw: bytes) -> tuple[int, dt.date] | None:
    if not _DATE.match(raw):
        return None
    try:
        day = dt.date.fromisoformat(raw.decode())
    except ValueError:
        return None
    return _epoch(dt.datetime(day.year, day.month, day.day)), day


_TIMES: dict[bytes, int] = {}


def _time_secs(raw: bytes) -> int | None:
    """Seconds of ``HH:MM:SS`` (00:00:00 … 23:59:59), else None; one table lookup."""
    if not _TIMES:
        _TIMES.update(
            (b"%02d:%02d:%02d" % (h, m, s), h * 3600 + m * 60 + s)
            for h in range(24)
            for m in range(60)
            for s in range(60)
        )
    return _TIMES.get(raw)


# The same rule in two halves, for the per-object caches: the directory (few distinct
# values) and the file name (one per package version). Together they are DOWNLOAD_PATTERN.
_DIR = re.compile(
    rb"/packages/[^/]+/(bioc|data/annotation|data/experiment|workflows)/"
    rb"(?:(src/contrib)|bin/(?:[^/]+/)+contrib/[^/]+)"
)
_FILE = re.compile(rb"([A-Za-z][A-Za-z0-9.]*[A-Za-z0-9])_[^/]+\.(tar\.gz|tgz|zip)")


def classify_uri(
    uri: bytes,
    dirs: dict[bytes, tuple[str, bool] | None] | None = None,
    files: dict[bytes, tuple[str, bytes] | None] | None = None,
) -> tuple[str, str] | None:
    """(category, package) if ``uri`` (a raw cs-uri-stem) is a package download path.
    ``dirs``/``files``: optional caches of the two halves of the rule."""
    if b"//" in uri:
        uri = _SLASHES.sub(b"/", uri)
    d, _, name = uri.rpartition(b"/")
    dv = dirs.get(d, 0) if dirs is not None else 0
    if dv == 0:
        m = _DIR.fullmatch(d)
        dv = (_REPO_CATEGORY[m[1]], m[2] is not None) if m else None
        if dirs is not None:
            dirs[d] = dv
    if dv is None:
        return None
    fv = files.get(name, 0) if files is not None else 0
    if fv == 0:
        m = _FILE.fullmatch(name)
        fv = (m[1].decode("ascii"), m[2]) if m else None
        if files is not None:
            files[name] = fv
    if fv is None or (dv[1] and fv[1] != b"tar.gz"):  # src/contrib holds .tar.gz only
        return None
    return dv[0], fv[0]


def _dt_check(
    key: bytes, lo: int, hi: int, days: dict[bytes, tuple[int, dt.date] | None]
) -> dt.date | str:
    """``YYYY-MM-DD\tHH:MM:SS\t`` → the day, or the reason the line is malformed."""
    # (callers cache the answer per distinct key)
    if len(key) != 20 or key[10:11] != b"\t" or key[19:20] != b"\t":
        return "date/time"
    draw = key[:10]
    dv = days.get(draw, 0)
    if dv == 0:
        dv = days[draw] = _date_secs(draw)
    tv = _time_secs(key[11:19])
    if dv is None or tv is None:
        return "date/time"
    ts = dv[0] + tv
    if ts < lo or ts > hi:
        return "timestamp more than 48 h from the object's hour"
    return dv[1]


# Process-wide caches of the download rule (it does not depend on the object): URIs repeat
# from object to object. Bounded: emptied between objects when they outgrow the limit.
URI_CACHE_MAX = 100_000
_URIS: dict[bytes, int] = {}  # cs-uri-stem → hit id (> 0), or 0: not a download path
_HITS: dict[tuple[str, str], int] = {}  # (category, package) → hit id
_DIRS: dict[bytes, tuple[str, bool] | None] = {}
_FILES: dict[bytes, tuple[str, bytes] | None] = {}


def _new_bucket() -> defaultdict[int, defaultdict[bytes, int]]:
    return defaultdict(partial(defaultdict, int))


def count_object(chunks: Iterable[bytes], name_hour: dt.datetime) -> ObjectCounts:
    """Stream one object and count its downloads (the rule of etl.md); malformed lines are
    counted by reason. Raises LogFormatError for an unreadable object or a missing #Fields."""
    with _no_cyclic_gc():
        if parser_name() == "native":
            return _count_native(chunks, name_hour)
        return _count(chunks, name_hour)


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


def _layout(line: bytes) -> tuple[int, int, int, int, int, int, int]:
    """A ``#Fields:`` line → (column count, then the index of each of REQUIRED_FIELDS)."""
    names = line[8:].decode("ascii", "replace").split()
    missing = [n for n in REQUIRED_FIELDS if n not in names]
    if missing:
        raise LogFormatError(f"#Fields line lacks {', '.join(missing)}")
    idate, itime, iip, imethod, iuri, istatus = (names.index(n) for n in REQUIRED_FIELDS)
    return len(names), idate, itime, iip, imethod, iuri, istatus


def _status_class(raw: bytes) -> int:
    """An sc-status value → _BAD (not a number), _OTHER or _DL (a download status)."""
    code = int(raw) if raw.isdigit() else None
    return _BAD if code is None else _DL if code in DOWNLOAD_STATUS else _OTHER


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
    """The hit id (> 0) of a download path's (category, package), else 0; cached."""
    hit = _URIS.get(uri)
    if hit is None:
        pair = classify_uri(uri, _DIRS, _FILES)
        hit = 0 if pair is None else _HITS.setdefault(pair, len(_HITS) + 1)
        if len(_URIS) < URI_CACHE_MAX:
            _URIS[uri] = hit
    return hit


# Reject reasons by code, as the C loop counts them (the same order as in _scan.c).
REASONS = (
    "column count",
    "status",
    "c-ip",
    "date/time",
    "timestamp more than 48 h from the object's hour",
)
_SCANNER: list[Any] = []  # the process's C scanner, made on first use
IP_HASH_CACHE_MAX = 200_000  # client addresses whose hash a parse process keeps
_IP_HASHES: dict[bytes, int] = {}  # of the Python loop's records (the C loop has its own)
_IP_HASHER: list[Callable[[bytes], int]] = []  # the function _IP_HASHES holds answers of


def _header(line: bytes | None) -> tuple[int, ...]:
    if line is None:
        raise LogFormatError("no #Fields line before the first data line")
    return _layout(line)


def _scanner() -> Any:
    if not _SCANNER:
        rule = (_header, _status_class, _hit_of, b"GET", tuple(_BAD_IP))
        _SCANNER.append(_scan.Scanner(*rule, URI_CACHE_MAX, IP_HASH_CACHE_MAX, MAX_LINE))
    return _SCANNER[0]


def _scan_object(chunks: Iterable[bytes], name_hour: dt.datetime) -> tuple[Any, list[dt.date]]:
    """Feed one object to the C scanner; returns it (to be finished) and its day list."""
    scanner = _scanner()
    center = _epoch(name_hour)
    day_list: list[dt.date] = []

    def date(raw: bytes) -> tuple[int, int] | None:
        dv = _date_secs(raw) if len(raw) == 10 else None
        if dv is None:
            return None
        day_list.append(dv[1])
        return len(day_list) - 1, dv[0]

    _reset_rule_caches()
    scanner.begin(date, center - MAX_SKEW, center + MAX_SKEW)
    for piece in decompress(chunks):
        scanner.feed(piece)
    return scanner, day_list


def _reasons(rejects: tuple[int, ...]) -> dict[str, int]:
    return {REASONS[i]: n for i, n in enumerate(rejects) if n}


def _count_native(chunks: Iterable[bytes], name_hour: dt.datetime) -> ObjectCounts:
    """count_object with the per-line loop in C (``_scan``): the same rule, decided by the
    same functions (called once per distinct value, their answers cached in C)."""
    scanner, day_list = _scan_object(chunks, name_hour)
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
    chunks: Iterable[bytes], name_hour: dt.datetime, hash_ip: Callable[[bytes], int]
) -> ObjectRecords:
    """count_object, with the counts as COPY text and the client addresses hashed by
    ``hash_ip`` (each address once per process while ``hash_ip`` is the same function)."""
    with _no_cyclic_gc():
        if parser_name() == "native":
            return _records_native(chunks, name_hour, hash_ip)
        return _records_python(count_object(chunks, name_hour), hash_ip)


def _records_native(
    chunks: Iterable[bytes], name_hour: dt.datetime, hash_ip: Callable[[bytes], int]
) -> ObjectRecords:
    scanner, day_list = _scan_object(chunks, name_hour)
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


def _count(chunks: Iterable[bytes], name_hour: dt.datetime) -> ObjectCounts:
    res = ObjectCounts()
    reasons = res.reject_reasons
    center = _epoch(name_hour)
    lo, hi = center - MAX_SKEW, center + MAX_SKEW
    # Per-object caches (a file repeats the same seconds, statuses and URIs many times),
    # each looked up once per line; a miss takes the slow path below, which fills them.
    # date → time → the day's counts {hit id: {ip: n}}, for valid date and time only
    dcache: defaultdict[bytes, dict[bytes, defaultdict[int, defaultdict[bytes, int]]]]
    dcache = defaultdict(dict)
    dall: dict[bytes, Any] = {}  # every date/time key seen → its day's counts, or a reason
    days: dict[bytes, tuple[int, dt.date] | None] = {}
    scache: dict[bytes, int] = {}  # status → _BAD, _OTHER or _DL
    _reset_rule_caches()
    ucache = _URIS
    bad_ip = _BAD_IP
    tab, get, dl = b"\t", b"GET", _DL
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
                        nf, idate, itime, iip, imethod, iuri, istatus = _layout(line)
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
                    day = _dt_check(dkey, lo, hi, days)
                    if day.__class__ is str:
                        found = day
                    else:
                        found = res.by_day.get(day)  # type: ignore[arg-type]
                        if found is None:
                            found = res.by_day[day] = _new_bucket()  # type: ignore[index]
                    dall[dkey] = found
                if found.__class__ is str:
                    reasons[found] = reasons.get(found, 0) + 1
                    continue
                bucket = dcache[f[idate]][f[itime]] = found
            st = scache.get(f[istatus])
            if not st:
                if st is None:
                    st = scache[f[istatus]] = _status_class(f[istatus])
                if not st:
                    reasons["status"] = reasons.get("status", 0) + 1
                    continue
            ip = f[iip]
            if ip in bad_ip:
                reasons["c-ip"] = reasons.get("c-ip", 0) + 1
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


def ip_hasher(key: bytes) -> Callable[[bytes], int]:
    """HMAC-SHA256 of the client address text under ``key``, as a signed 64-bit integer."""
    mac = hmac.new(key, digestmod=hashlib.sha256)

    def h(ip: bytes) -> int:
        m = mac.copy()
        m.update(ip)
        return int.from_bytes(m.digest()[:8], "big", signed=True)

    return h
