"""Where CloudFront log objects are, what they are called, and their text.

Sources are a local directory (recursive) or ``s3://bucket/prefix``. Objects are streamed in
compressed chunks through one gzip decompressor (ISA-L's, else zlib's) and come out in pieces
of bounded size, so memory does not grow with the file. A file that is not complete gzip
fails as a whole (:class:`LogFormatError`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import DAY_RANGE
from ..errors import WebstatsError
from ..files import is_text, shown

log = logging.getLogger(__name__)

try:  # ISA-L's inflate (the isal wheel) gunzips about three times as fast as zlib's
    from isal import isal_zlib as _inflate

    _INFLATE_ERRORS: tuple[type[Exception], ...] = (_inflate.error, zlib.error)
except ImportError:  # pragma: no cover - same results, slower
    _inflate = zlib  # type: ignore[no-redef]
    _INFLATE_ERRORS = (zlib.error,)

CHUNK = 1 << 20  # compressed bytes read at a time
OUT_MAX = 1 << 20  # text bytes decompressed at a time (memory stays flat whatever the ratio)

# <distribution-id>.<YYYY-MM-DD-HH>.<unique>.gz, at any depth (the key's last segment)
_NAME = re.compile(
    r"^(?P<dist>[A-Za-z0-9]+)\.(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2})-(?P<hour>[0-9]{2})\.(?P<uniq>[A-Za-z0-9]+)\.gz\Z"
)


class LogFormatError(WebstatsError):
    """The object as a whole cannot be read (corrupt, truncated, not gzip, no #Fields)."""


@dataclass(frozen=True, slots=True)  # slots: a backfill's listing holds one per object
class LogObject:
    """One log object of a source: its key (relative path or S3 key) and name hour (UTC)."""

    key: str
    size: int
    name_hour: dt.datetime
    etag: str | None = None
    aliases: tuple[str, ...] = ()  # other keys of the same file (links): read under none


def object_name(key: str) -> str:
    """A key's last part: a log object's CloudFront name, whatever folder or prefix holds it."""
    return key.rsplit("/", 1)[-1]


def parse_name(key: str) -> dt.datetime | None:
    """The hour (UTC, naive) in ``<dist>.<YYYY-MM-DD-HH>.<unique>.gz``; None if not a log name."""
    m = _NAME.match(object_name(key))
    if not m:
        return None
    try:
        day = dt.date.fromisoformat(m["date"])
    except ValueError:
        return None
    hour = int(m["hour"])
    # (a day outside the days any setting may name would become a ValidThru nothing reads)
    if hour > 23 or not DAY_RANGE[0] <= day <= DAY_RANGE[1]:
        return None
    return dt.datetime(day.year, day.month, day.day, hour)


# --- sources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """The name dates a listing wants: ``start`` … ``until`` (inclusive; None = open)."""

    start: dt.date | None = None
    until: dt.date | None = None

    def __contains__(self, day: dt.date) -> bool:
        return (self.start is None or day >= self.start) and (
            self.until is None or day <= self.until
        )

    @property
    def whole(self) -> bool:
        return self.start is None and self.until is None

    @property
    def empty(self) -> bool:
        """No day at all (it ends before it starts: nothing complete yet after the ledger's
        newest day): nothing to list."""
        return self.start is not None and self.until is not None and self.until < self.start


EVERYTHING = Window()
# Up to this many days, a distribution's names are listed one day prefix at a time (a request
# a day); a longer window pages through its names instead (a request per 1,000 names).
PER_DAY_LISTING_DAYS = 31
_DAY_DIR = re.compile(r"^([0-9]{4}-[0-9]{2}-[0-9]{2})$")


def dir_day(name: str) -> dt.date | None:
    """The day of a ``YYYY-MM-DD`` folder name (objects filed by day), else None."""
    if not _DAY_DIR.match(name):
        return None
    try:
        return dt.date.fromisoformat(name)
    except ValueError:
        return None


class Source:
    """Where log objects live. ``list`` returns (log objects, keys skipped as not log names)
    of the objects whose name date is in the window; ``unreadable`` names the places it could
    not list (logged; the run fails at its end)."""

    url: str
    unreadable: list[str]

    def list(self, window: Window = EVERYTHING) -> tuple[list[LogObject], list[str]]:
        raise NotImplementedError

    def chunks(self, obj: LogObject) -> Iterator[bytes]:
        """The raw (compressed) bytes of ``obj``, in chunks."""
        raise NotImplementedError

    def get(self, key: str) -> LogObject:
        """Describe one object by key (for re-ingest); WebstatsError if absent."""
        raise NotImplementedError


class DirSource(Source):
    """A local directory, searched recursively (symlinked folders followed, each real folder
    once); keys are paths relative to it, through real folders where they are inside it (a
    link added later to a folder already read names the same objects, not new ones)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.url = str(root)  # as given: a Path would show http://x as http:/x
        self.unreadable = []
        if not self.root.is_dir():
            raise WebstatsError(f"log source {self.url}: not a directory nor an s3:// URL")

    def list(self, window: Window = EVERYTHING) -> tuple[list[LogObject], list[str]]:
        objects: list[LogObject] = []
        skipped: list[str] = []
        seen: set[tuple[int, int]] = set()  # real folders walked (a symlink loop ends here)
        # (key, device, inode, a symlink) of the files that may have another name here
        self._links: list[tuple[str, int, int, bool]] = []
        real_root = self.root.resolve()
        todo = [self.root]
        while todo:
            folder = todo.pop()
            try:
                st = folder.stat()
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                real = folder.resolve()
                base = real.relative_to(real_root) if real.is_relative_to(real_root) else None
                prefix = (folder.relative_to(self.root) if base is None else base).as_posix()
                prefix = "" if prefix == "." else prefix + "/"
                subdirs: list[Path] = []
                # One entry at a time, keys made as strings: a folder of a year's archive
                # (100,000s of names) holds no list of entries nor a Path per name (pathlib
                # interns every part for good).
                with os.scandir(folder) as entries:
                    for entry in entries:
                        try:
                            self._entry(entry, prefix, folder, window, objects, skipped, subdirs)
                        except OSError as exc:  # a link loop, a target it may not stat
                            self._unexaminable(folder, prefix, entry.name, exc)
            except OSError as exc:
                if folder == self.root:
                    raise WebstatsError(f"log source {folder}: {exc.strerror}") from None
                log.error(
                    "log source %s: %s; its files are not read", shown(str(folder)), exc.strerror
                )
                self.unreadable.append(shown(str(folder.relative_to(self.root))))
                continue
            subdirs.sort()
            todo.extend(reversed(subdirs))  # depth first, in name order
        objects = self._once(objects)
        objects.sort(key=lambda o: o.key)
        skipped.sort()
        return objects, skipped

    def _once(self, objects: list[LogObject]) -> list[LogObject]:
        """One file under two names (a symlink to a log object, a hard link) is one object:
        listed under its own name (not a link's; then the first name), the others its
        ``aliases`` (the ledger may hold it under one of them); its downloads would count
        twice. Only links are remembered while listing (a name costs nothing more); the
        other names are looked at only when there are links."""
        if not self._links:
            return objects
        ident = {key: (dev, ino, link) for key, dev, ino, link in self._links}
        wanted = {(dev, ino) for _, dev, ino, _ in self._links}
        for o in objects:
            if o.key not in ident:
                with contextlib.suppress(OSError):  # gone since: read (or not) as it is
                    st = os.stat(self.root / o.key)
                    if (st.st_dev, st.st_ino) in wanted:
                        ident[o.key] = (st.st_dev, st.st_ino, False)
        names: dict[tuple[int, int], list[LogObject]] = {}
        linked = (o for o in objects if o.key in ident)
        for o in sorted(linked, key=lambda o: (ident[o.key][2], o.key)):
            names.setdefault(ident[o.key][:2], []).append(o)
        dropped: set[str] = set()
        kept_as: dict[str, LogObject] = {}
        for kept, *others in names.values():
            for o in others:
                log.warning(
                    "log source %s: %s is another name of %s (a link); not read under it",
                    shown(self.url), shown(o.key), shown(kept.key),
                )  # fmt: skip
                dropped.add(o.key)
            if others:
                kept_as[kept.key] = replace(kept, aliases=tuple(o.key for o in others))
        return [kept_as.get(o.key, o) for o in objects if o.key not in dropped]

    def _entry(
        self,
        entry: os.DirEntry[str],
        prefix: str,
        folder: Path,
        window: Window,
        objects: list[LogObject],
        skipped: list[str],
        subdirs: list[Path],
    ) -> None:
        """One entry of a folder: a log object of the window, a name skipped, a folder to walk."""
        key = prefix + entry.name
        if not is_text(key):  # no CloudFront name; the ledger keeps text keys
            if entry.is_dir():
                log.error(
                    "log source %s: %s: name not UTF-8, not read", shown(str(folder)), shown(key)
                )
                self.unreadable.append(shown(key))
            elif entry.is_file():
                skipped.append(shown(key))
            return
        if entry.is_dir():  # follows a symlink
            day = dir_day(entry.name)
            if day is None or day in window:  # a day folder outside: not opened
                subdirs.append(Path(entry.path))
            return
        hour = parse_name(entry.name)
        if hour is None:
            skipped.append(shown(key))  # a file, or a broken link, a FIFO: listed, not read
        elif hour.date() not in window:  # by name: no stat outside
            return
        elif entry.is_file():
            st = entry.stat()
            objects.append(LogObject(key, st.st_size, hour))
            link = entry.is_symlink()
            if link or st.st_nlink > 1:
                self._links.append((key, st.st_dev, st.st_ino, link))
        else:  # a log object's name on no file: its downloads would go missing
            log.error(
                "log source %s: %s is not a file (a broken symlink?); not read",
                shown(str(folder)), entry.name,
            )  # fmt: skip
            self.unreadable.append(shown(key))

    def _unexaminable(self, folder: Path, prefix: str, name: str, exc: OSError) -> None:
        """An entry whose kind cannot be told: named, and the run fails at its end (it may be
        a folder of logs); the folder's other entries are read."""
        log.error(
            "log source %s: %s: %s; not read", shown(str(folder)), shown(name), exc.strerror or exc
        )
        self.unreadable.append(shown(prefix + name))

    def get(self, key: str) -> LogObject:
        if Path(key).is_absolute():
            raise WebstatsError(f"{key}: a key is relative to the log source {self.root}")
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


WALK_PAGE = 20  # keys per request while looking for runs of names (each costs one request)
MAX_DEPTH = 6  # folders below the prefix walked when listing by window


def _after(prefix: str) -> str:
    """A ``StartAfter`` past every key that starts with ``prefix`` (its last character + 1)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class _Listing:
    """What a listing found: log objects in the window, and keys that are not log names."""

    def __init__(self, window: Window) -> None:
        self.window = window
        self.objects: list[LogObject] = []
        self.skipped: list[str] = []

    def add(self, item: dict[str, Any]) -> None:
        key = item["Key"]
        if key.endswith("/"):
            return
        hour = parse_name(key)
        if hour is None:
            self.skipped.append(shown(key))
        elif hour.date() in self.window:
            etag = str(item.get("ETag", "")).strip('"') or None
            self.objects.append(LogObject(key, int(item["Size"]), hour, etag))


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class S3Source(Source):
    """``s3://bucket/prefix``: listed with the ListObjectsV2 paginator, read by streaming."""

    def __init__(self, url: str, client: Any = None, page_size: int | None = None) -> None:
        rest = url.removeprefix("s3://")
        self.bucket, _, self.prefix = rest.partition("/")
        if not self.bucket:
            raise WebstatsError(f"log source {url}: no bucket name")
        if not _BUCKET.fullmatch(self.bucket):
            raise WebstatsError(
                f"log source {url}: {self.bucket!r} is not an S3 bucket name "
                "(3-63 lower-case letters, digits, dots and hyphens)"
            )
        self.url = url
        self.unreadable = []  # a listing that fails, fails as a whole
        self.page_size = page_size
        if client is None:
            from ..aws import _aws_errors, describe_error
            from ..aws import client as aws_client

            try:  # credentials are resolved here: no instance metadata, no role
                client = aws_client("s3")
            except _aws_errors() as exc:
                raise WebstatsError(f"log source {url}: {describe_error(exc)}") from None
        self.client = client

    def _aws(self, what: str, exc: BaseException) -> WebstatsError:
        from ..aws import describe_error

        return WebstatsError(f"s3://{self.bucket}/{what}: {describe_error(exc)}")

    def list(self, window: Window = EVERYTHING) -> tuple[list[LogObject], list[str]]:
        """The log objects named in the window. Without a window: one paginated pass over
        the prefix. With one, object names sort by date within each distribution, so each
        distribution's run of names (``<dist>.<date>…`` in a folder) and each run of day
        folders (``<YYYY-MM-DD>/``) is listed from the window's first name (``StartAfter``)
        up to its last: the keys listed are those of the window, plus a few per folder to
        find the runs, however large the bucket."""
        from botocore.exceptions import BotoCoreError, ClientError

        found = _Listing(window)
        try:
            if window.whole:
                for item in self._pages(self.prefix):
                    found.add(item)
            else:
                self._walk(self.prefix, found, depth=0)
        except (BotoCoreError, ClientError) as exc:
            raise self._aws(self.prefix, exc) from None
        found.objects.sort(key=lambda o: o.key)
        return found.objects, sorted(found.skipped)

    def _pages(self, prefix: str, start_after: str = "") -> Iterator[dict[str, Any]]:
        """Every object under ``prefix`` after ``start_after``, in key order."""
        paginator = self.client.get_paginator("list_objects_v2")
        config = {"PageSize": self.page_size} if self.page_size else {}
        args = {"Bucket": self.bucket, "Prefix": prefix, "PaginationConfig": config}
        if start_after:
            args["StartAfter"] = start_after
        for page in paginator.paginate(**args):
            yield from page.get("Contents", ())

    def _walk(self, folder: str, found: _Listing, depth: int) -> None:
        """List ``folder`` one level at a time (``Delimiter='/'``) in small pages, jumping
        over what the window does not need: a run of log names is listed on its own from the
        window's start, then skipped as a whole; day folders outside the window are skipped
        by ``StartAfter``; other folders are walked the same way."""
        window = found.window
        cursor = ""
        size = WALK_PAGE
        while True:
            args = {"Bucket": self.bucket, "Prefix": folder, "Delimiter": "/", "MaxKeys": size}
            if cursor:
                args["StartAfter"] = cursor
            page = self.client.list_objects_v2(**args)
            entries = [(c["Prefix"], None) for c in page.get("CommonPrefixes", ())]
            entries += [(item["Key"], item) for item in page.get("Contents", ())]
            entries.sort(key=lambda e: e[0])
            jump = None
            for key, item in entries:
                name = key[len(folder) :]
                if item is None:  # a folder
                    day = dir_day(name[:-1])
                    if day is None:
                        if depth < MAX_DEPTH:
                            self._walk(key, found, depth + 1)
                    elif window.start is not None and day < window.start:
                        jump = folder + window.start.isoformat()  # the window's first day
                        break
                    elif window.until is not None and day > window.until:
                        jump = folder + "9999-99-99"  # past every day folder
                        break
                    else:  # one day's objects
                        for obj in self._pages(key):
                            found.add(obj)
                    cursor = _after(key)
                    continue
                m = _NAME.match(name)
                if m is None or "/" in name:
                    found.add(item)  # not a log name: reported as skipped
                    cursor = key
                    continue
                # A run of one distribution's names: from the window's start to its end.
                self._list_run(folder + m["dist"] + ".", found)
                # Past every "<dist>." name, short of a "<dist>/" folder: a StartAfter of
                # "<dist>/" itself passes over that whole folder (S3 pages by common prefix).
                jump = folder + m["dist"] + ".\U0010ffff"
                break
            if jump is not None:
                cursor = jump
                size = WALK_PAGE
                continue
            if not page.get("IsTruncated"):
                return
            # Pages with nothing to jump over (files that are not logs, folders): larger ones.
            size = min(size * 2, 1000)

    def _list_run(self, run: str, found: _Listing) -> None:
        """The names ``<run><YYYY-MM-DD>-…`` of the window: a short one (a daily run's), one
        prefix per day (nothing outside is listed); a long or open-ended one (a backfill),
        pages from its start (``StartAfter``) up to the first name past its end."""
        window = found.window
        if (
            window.start is not None
            and window.until is not None
            and (window.until - window.start).days < PER_DAY_LISTING_DAYS
        ):
            day = window.start
            while day <= window.until:
                for obj in self._pages(run + day.isoformat()):
                    found.add(obj)
                day += dt.timedelta(days=1)
            return
        start = run + window.start.isoformat() if window.start else ""
        for obj in self._pages(run, start):
            hour = parse_name(obj["Key"])
            if hour is not None and window.until and hour.date() > window.until:
                break  # names sort by date: the rest is after the window
            found.add(obj)

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
    return DirSource(url)


# --- reading -----------------------------------------------------------------------------------


def decompress(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Gunzip a stream of chunks (several gzip members allowed). LogFormatError if the
    stream is empty, not gzip, corrupt or truncated, or has bytes after its last member that
    are not gzip."""
    d = _inflate.decompressobj(wbits=31)
    fed = False  # bytes went into the current member and it has not ended yet
    total = 0
    members = 0  # members that ended
    head = b""  # the current member's first two bytes: gzip's magic, or not gzip at all

    def ended() -> Any:
        nonlocal members, fed, head
        members += 1
        fed, head = False, b""
        return _inflate.decompressobj(wbits=31)

    def not_gzip(why: str) -> LogFormatError:
        if members and not b"\x1f\x8b".startswith(head):  # (gzip -t: "trailing garbage")
            return LogFormatError(
                f"bytes after the end of the gzip data that are not gzip ({members} "
                "member(s) read, then something else)"
            )
        return LogFormatError(why)

    try:
        for chunk in chunks:
            total += len(chunk)
            while chunk:
                if len(head) < 2:
                    head += chunk[: 2 - len(head)]
                fed = True
                out = d.decompress(chunk, OUT_MAX)
                if out:
                    yield out
                if d.eof:  # another member may follow
                    chunk = d.unused_data
                    d = ended()
                    continue
                chunk = d.unconsumed_tail  # what the output limit left of the chunk
                while not chunk and len(out) == OUT_MAX and not d.eof:
                    out = d.decompress(b"", OUT_MAX)  # output still held by the decompressor
                    if out:
                        yield out
                if d.eof:
                    chunk = d.unused_data
                    d = ended()
    except _INFLATE_ERRORS as exc:
        raise not_gzip(f"not a valid gzip file ({exc})") from None
    if total == 0:
        raise LogFormatError("empty file (0 bytes), not gzip")
    if fed and not members and not b"\x1f\x8b".startswith(head):  # too short for zlib
        raise LogFormatError(f"not a gzip file ({total} bytes, no gzip header)")
    if fed:
        raise not_gzip("truncated gzip (unexpected end of data)")


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
