"""The download rule of etl.md: which log line is a package download, of what, when, by whom.

Pure functions and constants, shared by the Python and the C per-line loops (``parse``) and
by the Athena SQL (``athena``); nothing here reads a file or a database.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Callable

from ..categories import BY_REPO_PATH, CATEGORIES
from .sources import LogFormatError

# The download rule on the raw cs-uri-stem after collapsing runs of "/": group 1 the repo,
# group 2 (src) or 3 (bin) the package, a valid R name. <version>, <R version> and the other
# dirs are single path segments. The same pattern runs in Athena (athena.py), so it is kept
# to syntax that Python and Trino read alike.
MAX_PACKAGE = 200  # characters of a package name: download_records.package is VARCHAR(200)
_NAME_CHARS = r"[A-Za-z][A-Za-z0-9.]{0," + str(MAX_PACKAGE - 2) + r"}[A-Za-z0-9]"
_NAME_RE = r"(" + _NAME_CHARS + r")_[^/]+"
REPOS = "|".join(c.repo_path for c in CATEGORIES)  # bioc|data/annotation|… (no regex syntax)
DOWNLOAD_PATTERN = (
    r"/packages/[^/]+/(" + REPOS + r")/"
    r"(?:src/contrib/" + _NAME_RE + r"\.tar\.gz"
    r"|bin/(?:[^/]+/)+contrib/[^/]+/" + _NAME_RE + r"\.(?:tgz|zip|tar\.gz))"
)
_SLASHES = re.compile(rb"/{2,}")
DOWNLOAD_STATUS = frozenset({200, 301, 302, 307, 308})
BAD, OTHER, DL = 0, 1, 2  # a status: not a number, another number, a download status
BAD_IP = frozenset({b"", b"-"})  # a missing c-ip
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
# Byte bounds (the same in _scan.c): a value longer than its field can be makes the line
# malformed before it reaches any cache (a download path is < 300 bytes, an address < 46),
# and no cache keeps a key longer than KEY_CACHE_MAX: memory never grows with the length of
# the values in a hostile log.
MAX_URI = 8192
MAX_IP = 64
# A status is a few digits; a long run of them is malformed too (and int() refuses past
# 4,300 digits: one such line would stop every run). Athena's query applies it as well.
MAX_STATUS_DIGITS = 9
KEY_CACHE_MAX = 256
_REPO_CATEGORY = {k.encode(): v.prefix for k, v in BY_REPO_PATH.items()}


def epoch(d: dt.datetime) -> int:
    return int(d.replace(tzinfo=dt.UTC).timestamp())


_DATE = re.compile(rb"^\d{4}-\d{2}-\d{2}$")


def date_secs(raw: bytes) -> tuple[int, dt.date] | None:
    if not _DATE.match(raw):
        return None
    try:
        day = dt.date.fromisoformat(raw.decode())
    except ValueError:
        return None
    return epoch(dt.datetime(day.year, day.month, day.day)), day


_TIMES: dict[bytes, int] = {}


def time_secs(raw: bytes) -> int | None:
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
    rb"/packages/[^/]+/(" + REPOS.encode() + rb")/"
    rb"(?:(src/contrib)|bin/(?:[^/]+/)+contrib/[^/]+)"
)
_FILE = re.compile(rb"(" + _NAME_CHARS.encode() + rb")_[^/]+\.(tar\.gz|tgz|zip)")


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
        if dirs is not None and len(d) <= KEY_CACHE_MAX:
            dirs[d] = dv
    if dv is None:
        return None
    fv = files.get(name, 0) if files is not None else 0
    if fv == 0:
        m = _FILE.fullmatch(name)
        fv = (m[1].decode("ascii"), m[2]) if m else None
        if files is not None and len(name) <= KEY_CACHE_MAX:
            files[name] = fv
    if fv is None or (dv[1] and fv[1] != b"tar.gz"):  # src/contrib holds .tar.gz only
        return None
    return dv[0], fv[0]


def dt_check(
    key: bytes,
    lo: int,
    hi: int,
    days: dict[bytes, tuple[int, dt.date] | None],
    floor: int | None = None,
) -> dt.date | str:
    """``YYYY-MM-DD\tHH:MM:SS\t`` → the day, or the reason the line is not counted
    (malformed, or dated before ``floor``, the cut-over day's midnight)."""
    # (callers cache the answer per distinct key)
    if len(key) != 20 or key[10:11] != b"\t" or key[19:20] != b"\t":
        return "date/time"
    draw = key[:10]
    dv = days.get(draw, 0)
    if dv == 0:
        dv = days[draw] = date_secs(draw)
    tv = time_secs(key[11:19])
    if dv is None or tv is None:
        return "date/time"
    ts = dv[0] + tv
    if ts < lo or ts > hi:
        return "timestamp more than 48 h from the object's hour"
    if floor is not None and ts < floor:
        return BEFORE_CUTOVER
    return dv[1]


# Process-wide caches of the download rule (it does not depend on the object): URIs repeat
# from object to object. Bounded: emptied between objects when they outgrow the limit.


def fields_layout(line: bytes) -> tuple[int, int, int, int, int, int, int]:
    """A ``#Fields:`` line → (column count, then the index of each of REQUIRED_FIELDS)."""
    names = line[8:].decode("ascii", "replace").split()
    missing = [n for n in REQUIRED_FIELDS if n not in names]
    if missing:
        raise LogFormatError(f"#Fields line lacks {', '.join(missing)}")
    idate, itime, iip, imethod, iuri, istatus = (names.index(n) for n in REQUIRED_FIELDS)
    return len(names), idate, itime, iip, imethod, iuri, istatus


def status_class(raw: bytes) -> int:
    """An sc-status value → BAD (not a number), OTHER or DL (a download status)."""
    code = int(raw) if raw.isdigit() and len(raw) <= MAX_STATUS_DIGITS else None
    return BAD if code is None else DL if code in DOWNLOAD_STATUS else OTHER


# Reject reasons by code, as the C loop counts them (the same order as in _scan.c).
REASONS = (
    "column count",
    "status",
    "c-ip",
    "date/time",
    "timestamp more than 48 h from the object's hour",
    "cs-uri-stem too long",
    "before the cut-over day (etl/logs_since)",
)
BEFORE_CUTOVER = REASONS[6]


def ip_hasher(key: bytes) -> Callable[[bytes], int]:
    """HMAC-SHA256 of the client address text under ``key``, as a signed 64-bit integer."""
    mac = hmac.new(key, digestmod=hashlib.sha256)

    def h(ip: bytes) -> int:
        m = mac.copy()
        m.update(ip)
        return int.from_bytes(m.digest()[:8], "big", signed=True)

    return h
