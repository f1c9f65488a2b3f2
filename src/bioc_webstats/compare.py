"""``bioc-webstats compare``: every published text file, byte for byte, against another site.

The proof of the take-over (etl.md): "there" is the legacy site (a base URL such as
``https://bioconductor.org/packages/stats/``, or a local directory copy of it); "here" is
this instance, its files built from the database exactly as the web builds them
(``web.targets``), or fetched from its own public URL (``--ours``). The lists drive it: the
four category files of each category, every year file either side's ``<prefix>_stats.tab``
lists, and for each package that either side's ``<prefix>_packages.txt`` names its
``<pkg>_stats.tab`` and every year file either side lists in it.

Polite to a remote site: a few requests at a time (``jobs``), a timeout, retries with
backoff on 5xx, 429, timeouts and broken connections, and a User-Agent naming the tool.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import math
import re
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .categories import BY_PREFIX, BY_STEM, CATEGORIES, Category
from .config import Settings
from .errors import WebstatsError
from .httpbody import (
    BodyError,
    FetchFailed,
    get,
    is_http,
    lines,
    mask,
    read_local,
    url_problem,
)

log = logging.getLogger(__name__)

USER_AGENT = f"bioc-webstats-compare/{__version__} (+https://bioconductor.org/packages/stats/)"
TIMEOUT = 30.0  # seconds per read
DEADLINE = 300.0  # seconds per file
ATTEMPTS = 4  # per file: the first try and three retries
BACKOFF = 1.0  # seconds before the first retry, doubled each time
# Bytes of a file: a category's _pkg_stats.tab (software's is ~20 MB, one line a package a
# month), every other file (a listing, a package's file: KBs). 2 x jobs files are in flight:
# one cap for all let a site of 60 MB answers take 770 MB, past the 512 MiB of the slice.
MAX_BYTES = 64 * 1024 * 1024
MAX_SMALL = 4 * 1024 * 1024


def max_bytes(relpath: str) -> int:
    return MAX_BYTES if relpath.endswith("_pkg_stats.tab") else MAX_SMALL


RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
GIVE_UP = 10  # files in a row that cannot be read (after their retries): the run stops
MAX_NAMES = 100_000  # in a _packages.txt (bioc's lists ~2,300): more is no listing


class FetchError(WebstatsError):
    """A file could not be read from a side (after the retries)."""


# --- the sides ----------------------------------------------------------------------------------


class Side:
    """Where published files are read from; ``fetch`` answers None for a missing file."""

    name: str

    def fetch(self, relpath: str) -> bytes | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class WebSide(Side):
    """A site over HTTP(S): ``<base>/<relpath>``."""

    def __init__(
        self,
        base: str,
        timeout: float = TIMEOUT,
        attempts: int = ATTEMPTS,
        backoff: float = BACKOFF,
        sleep: Callable[[float], None] = time.sleep,
        deadline: float = DEADLINE,
    ) -> None:
        self.base = base if base.endswith("/") else base + "/"
        self.name = self.base
        self.timeout, self.attempts, self.backoff, self.sleep = timeout, attempts, backoff, sleep
        self.deadline = deadline  # for a whole file (``timeout`` is per read)

    def url(self, relpath: str) -> str:
        return self.base + urllib.parse.quote(relpath)

    def fetch(self, relpath: str) -> bytes | None:
        url = self.url(relpath)
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return get(url, USER_AGENT, self.timeout, max_bytes(relpath), self.deadline)
            except FetchFailed as exc:
                if exc.status in (404, 410):
                    return None
                if not exc.retry or (exc.status is not None and exc.status not in RETRY_STATUS):
                    raise FetchError(f"{url}: {exc}") from None
                why = str(exc)
                wait = delay if exc.status is None else _retry_after(exc.retry_after, delay)
            if attempt == self.attempts:
                raise FetchError(f"{url}: {why} (after {self.attempts} attempts)")
            log.debug("%s: %s; retrying in %.1fs", url, why, wait)
            self.sleep(wait)  # backoff between attempts on the remote site
            delay *= 2
        raise AssertionError("unreachable")


def _retry_after(value: str | None, default: float) -> float:
    """A ``Retry-After`` in seconds when it is a small number, else our own backoff (NaN,
    inf or a negative number too: NaN passes min/max and time.sleep raises on it)."""
    try:
        seconds = float(value) if value else default
    except ValueError:
        return default
    if not math.isfinite(seconds) or seconds < 0:
        return default
    return min(seconds, 60.0)


class DirSide(Side):
    """A directory copy of a site (what ``/packages/stats/`` holds)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.name = mask(str(root))  # as given: a Path would show ftp://x as ftp:/x
        if not self.root.is_dir():
            raise WebstatsError(f"{self.name}: not a directory nor an http(s):// URL")

    def fetch(self, relpath: str) -> bytes | None:
        path = self.root / relpath
        try:
            return read_local(path, max_bytes(relpath))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except BodyError as exc:  # a FIFO, a link to /dev/zero, a file over the cap
            raise FetchError(f"{path}: {exc}") from None
        except OSError as exc:
            raise FetchError(f"{path}: {exc.strerror}") from None


class DatabaseSide(Side):
    """This instance's files, built from its database the way the web builds them."""

    def __init__(self, settings: Settings) -> None:
        from .store import db
        from .web import report

        self.name = "this instance's database"
        self.session = db.session_factory(settings.database_url)()
        if self.session.get_bind().dialect.name == "postgresql":  # one view of the data
            self.session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        state = db.data_state(self.session)
        self.snap = report.load_snapshot(self.session, state.version, state.valid_thru)

    def fetch(self, relpath: str) -> bytes | None:
        from .web.targets import Target, build, exists, resolve

        target = resolve(relpath)
        if not isinstance(target, Target) or target.is_page or not exists(target, self.snap):
            return None
        return build(self.session, target, self.snap).encode("utf-8")

    def close(self) -> None:
        self.session.close()


def open_side(where: str, timeout: float = TIMEOUT) -> Side:
    """A base URL (``http(s)://…/packages/stats/``) or a directory copy of a site."""
    if is_http(where):
        problem = url_problem(where)
        if not problem and ("?" in where or "#" in where):
            # each file's path would go into the query (or be dropped with the #), and a
            # query may hold a token: not shown
            where, problem = re.split(r"[?#]", where, maxsplit=1)[0], "a query or a #"
        if problem:  # once, not as a network error retried for every file
            raise WebstatsError(f"{mask(where)}: not a usable URL ({problem})")
        return WebSide(where, timeout=timeout)
    if where[:7].lower() == "file://":
        parts = urllib.parse.urlsplit(where)
        if parts.netloc not in ("", "localhost"):
            raise WebstatsError(f"{mask(where)}: a file:// URL names a directory of this host")
        return DirSide(urllib.parse.unquote(parts.path))
    return DirSide(where)


# --- what is compared -------------------------------------------------------------------------


class TooManyNames(WebstatsError):
    """A ``_packages.txt`` naming more than MAX_NAMES packages."""


def _names(body: bytes | None) -> list[str]:
    """Package names of a ``<prefix>_packages.txt`` (one a line), in order, each once."""
    names: dict[str, None] = {}
    for line in lines(body or b""):
        if line:
            names[line.decode("utf-8", "replace")] = None
            if len(names) > MAX_NAMES:
                raise TooManyNames(f"lists more than {MAX_NAMES} packages")
    return list(names)


def _both_names(here: bytes | None, there: bytes | None) -> list[str]:
    return list(dict.fromkeys(_names(here) + _names(there)))


def _years(body: bytes | None) -> set[int]:
    """The years a ``_stats.tab`` holds blocks for (lines whose first field is a year)."""
    years = set()
    for n, line in enumerate(lines(body or b"")):
        if n and line[:4].isdigit() and line[4:5] in (b"", b"\t"):
            years.add(int(line[:4]))
    return years


def _both_years(here: bytes | None, there: bytes | None) -> set[int]:
    return _years(here) | _years(there)


def _plausible(cat: Category, years: set[int]) -> list[int]:
    """The years a site can have year files for, newest first: from the category's first to
    this one (a listing of "years" 0000 to 9999 from a hostile site is not 10,000 requests a
    file; its all-years file, which lists them, differs anyway)."""
    this_year = time.gmtime().tm_year
    return sorted((y for y in years if cat.first_year <= y <= this_year), reverse=True)


def _safe(name: str) -> bool:
    """A package name usable as a path segment (the lists come from another site)."""
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and name.isprintable()
        and len(name) <= 200
    )


@dataclass
class Outcome:
    """The comparison of one file."""

    path: str
    line: str | None = None  # None: the same bytes
    failed: bool = False  # not compared: a side unreadable, a listing unusable

    @property
    def differs(self) -> bool:
        return self.line is not None


@dataclass
class CompareResult:
    compared: int = 0
    differ: int = 0
    failed: int = 0  # could not be compared: neither "compared" nor "differ"
    lines: list[str] = field(default_factory=list)

    def summary(self) -> str:
        failed = f", {self.failed} could not be compared" if self.failed else ""
        return f"{self.compared} files compared, {self.differ} differ{failed}"


# A line with its end, as bytes.splitlines(keepends=True) cuts them, found one at a time: a
# list of a body's lines costs about 30 times its bytes (tens of millions of objects for a
# hostile 60 MB of short lines).
_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")


def first_difference(here: bytes, there: bytes) -> str:
    """Where two bodies first differ: the line number and both lines (a line end shown
    only when the two lines differ in it)."""
    a = (m.group() for m in _LINE.finditer(here))
    b = (m.group() for m in _LINE.finditer(there))
    for n, (x, y) in enumerate(itertools.zip_longest(a, b), 1):
        if x == y:
            continue
        if y is None:
            return f"line {n}: there ends; here goes on with {_show(x)}"
        if x is None:
            return f"line {n}: here ends; there goes on with {_show(y)}"
        return f"line {n}: here {_show(x, y)}, there {_show(y, x)}"
    return "the same lines"  # (the bodies are equal)


def _show(line: bytes, other: bytes | None = None) -> str:
    if other is None or line.rstrip(b"\r\n") != other.rstrip(b"\r\n"):
        line = line.rstrip(b"\r\n")
    text = line.decode("utf-8", "replace")
    return repr(text if len(text) <= 120 else text[:120] + "…")


def judge(path: str, here: bytes | None, there: bytes | None) -> Outcome:
    if here is None and there is None:
        return Outcome(path)  # not published by either side (a year listed nowhere else)
    if here is None:
        return Outcome(path, "missing here")
    if there is None:
        return Outcome(path, "missing there")
    if here == there:
        return Outcome(path)
    return Outcome(path, first_difference(here, there))


class Comparison:
    """Fetch each file from both sides (``there`` concurrently, a few at a time) and judge."""

    def __init__(
        self, here: Side, there: Side, jobs: int = 4, echo: Callable[[str], None] = print
    ) -> None:
        self.here, self.there = here, there
        self.jobs, self.echo = jobs, echo
        self.pool = cf.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="compare")
        self.here_pool = (
            None
            if isinstance(here, DatabaseSide | DirSide)  # the database session: this thread
            else cf.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="compare-here")
        )
        self.result = CompareResult()
        self.failed_in_a_row = 0

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.here_pool is not None:
            self.here_pool.shutdown(wait=True, cancel_futures=True)

    def _get(self, side: Side, path: str) -> tuple[bytes | None, str | None]:
        try:
            return side.fetch(path), None
        except FetchError as exc:
            return None, str(exc)

    def fetch_both(
        self, paths: list[str]
    ) -> Iterator[tuple[str, bytes | None, bytes | None, str | None]]:
        """(path, here, there, why one side could not be read) in the order given, with at
        most ``2 * jobs`` in flight; the side that could not be read is None."""
        pending: deque[tuple[str, cf.Future, cf.Future | None]] = deque()
        todo = iter(paths)

        def submit(path: str) -> None:
            there = self.pool.submit(self._get, self.there, path)
            here = None if self.here_pool is None else self.here_pool.submit(
                self._get, self.here, path
            )  # fmt: skip
            pending.append((path, there, here))

        for path in todo:
            submit(path)
            if len(pending) >= 2 * self.jobs:
                break
        while pending:
            path, there_f, here_f = pending.popleft()
            here, here_err = here_f.result() if here_f else self._get(self.here, path)
            there, there_err = there_f.result()
            nxt = next(todo, None)
            if nxt is not None:
                submit(nxt)
            yield path, here, there, here_err or there_err

    def record(self, outcome: Outcome) -> None:
        if outcome.failed:
            self.result.failed += 1
        else:
            self.result.compared += 1
            self.result.differ += outcome.differs
        if outcome.differs:
            line = f"{outcome.path}: {outcome.line}"
            self.result.lines.append(line)
            self.echo(line)  # one line per differing file, as it is found

    def files(
        self, paths: list[str], keep: Mapping[str, Callable[[bytes | None, bytes | None], Any]]
    ) -> dict[str, Any]:
        """Compare ``paths``; of the bodies, only ``keep[path](here, there)`` is kept (the
        names or years a list holds): each body is dropped once judged (bounded memory)."""
        kept = {}
        for path, here, there, error in self.fetch_both(paths):
            if error:  # not judged; what the other side lists is still compared
                self.record(Outcome(path, f"cannot compare: {error}", True))
                self.failed_in_a_row += 1
                if self.failed_in_a_row >= GIVE_UP:  # a site that is down: not 50,000 times
                    raise WebstatsError(
                        f"compare: stopped after {GIVE_UP} files in a row could not be read "
                        f"(last: {error})"
                    )
            else:
                self.failed_in_a_row = 0
                if here is not None or there is not None:
                    self.record(judge(path, here, there))
            if path in keep:
                try:
                    kept[path] = keep[path](here, there)
                except TooManyNames as exc:  # the file is compared, its packages are not
                    self.record(Outcome(path, f"cannot compare its packages: {exc}", True))
        return kept


def categories_named(names: list[str] | None) -> list[Category]:
    """The categories of ``--categories`` (all: none given); a ValueError names one unknown."""
    if not names:
        return list(CATEGORIES)
    out = []
    for name in names:
        cat = BY_PREFIX.get(name) or BY_STEM.get(name)
        if cat is None:
            known = ", ".join(c.prefix for c in CATEGORIES)
            raise ValueError(f"unknown category {name!r} (one of {known})")
        if cat not in out:
            out.append(cat)
    return out


def compare(
    here: Side,
    there: Side,
    categories: list[str] | None = None,
    packages: list[str] | None = None,
    jobs: int = 4,
    echo: Callable[[str], None] = print,
) -> CompareResult:
    """Compare every text file of the selected categories (and packages) on both sides;
    ``echo`` gets one line per differing file as it is found."""
    try:
        cats = categories_named(categories)
    except ValueError as exc:
        raise WebstatsError(f"--categories: {exc}") from None
    there = _Primed(there, _check_a_site(here, there, cats))
    run = Comparison(here, there, jobs, echo)
    found: set[str] = set()
    try:
        for cat in cats:
            found |= _compare_category(run, cat, packages)
    finally:
        run.close()
    for name in dict.fromkeys(packages or []):
        if name not in found:  # a typo must not pass for "0 differ"
            where = ", ".join(f"{c.stem}/{c.prefix}_packages.txt" for c in cats)
            run.record(Outcome(f"--packages {name}", f"listed by neither side ({where})", True))
    return run.result


class _Primed(Side):
    """A side with a file already read, or found unreadable (the check's): not asked for it
    twice (four more attempts at a site that timed out)."""

    def __init__(self, side: Side, bodies: dict[str, bytes | FetchError]) -> None:
        self.side, self.bodies, self.name = side, bodies, side.name

    def fetch(self, relpath: str) -> bytes | None:
        body = self.bodies.pop(relpath, None)
        if isinstance(body, FetchError):
            raise body
        return body if body is not None else self.side.fetch(relpath)


def _check_a_site(here: Side, there: Side, cats: list[Category]) -> dict[str, bytes | FetchError]:
    """Refuse a place that holds no category file at all (a directory or URL one level off)
    while this side has some: every file was "missing there", and the verdict "N of N
    differ" named no cause. The file found, by its path (not asked for twice)."""
    paths = [f"{c.stem}/{c.prefix}_{n}" for c in cats for n in ("packages.txt", "stats.tab")]
    for path in paths:
        try:
            body = there.fetch(path)
        except FetchError as exc:  # unreadable is not absent: the comparison reports it
            return {path: exc}
        if body is not None:
            return {path: body}
    try:
        if all(here.fetch(path) is None for path in paths):
            return {}  # neither side: "nothing was compared" says so
    except FetchError:
        return {}
    raise WebstatsError(
        f"compare: {there.name} holds no file of the categories (not even {paths[0]}): give "
        "the directory or URL that holds the category directories (…/packages/stats/)"
    )


def _compare_category(run: Comparison, cat: Category, only: list[str] | None) -> set[str]:
    """Compare the category's files; the package names either side lists."""
    stem, prefix = cat.stem, cat.prefix
    listing = f"{stem}/{prefix}_packages.txt"
    totals = f"{stem}/{prefix}_stats.tab"
    if only is None:
        heavy = [f"{stem}/{prefix}_pkg_stats.tab", f"{stem}/{prefix}_pkg_scores.tab"]
        kept = run.files([listing, totals, *heavy], {listing: _both_names, totals: _both_years})
        years = _plausible(cat, kept.get(totals, set()))
        run.files([f"{stem}/{prefix}_{y}_stats.tab" for y in years], {})
        names = kept.get(listing, [])
    else:  # only these packages: the lists are read, not compared
        try:
            names = _both_names(run.here.fetch(listing), run.there.fetch(listing))
        except TooManyNames as exc:
            run.record(Outcome(listing, f"cannot compare its packages: {exc}", True))
            names = []
        except FetchError as exc:  # a line, not the run's end; the packages' own files
            run.record(Outcome(listing, f"cannot compare: {exc}", True))  # need no listing
            names = list(dict.fromkeys(only))
    if only is not None:
        names = [n for n in names if n in set(only)]
    unsafe = [n for n in names if not _safe(n)]
    for name in unsafe:
        run.record(Outcome(listing, f"package name {name[:80]!r} is not a usable file name", True))
    names = [n for n in names if _safe(n)]
    # Each package's all-years file first; its year files after (the years both list).
    for start in range(0, len(names), 200):  # 200 packages, then their year files
        chunk = names[start : start + 200]
        paths = [f"{stem}/{n}/{n}_stats.tab" for n in chunk]
        tabs = run.files(paths, dict.fromkeys(paths, _both_years))
        year_files = []
        for name in chunk:
            years = _plausible(cat, tabs.get(f"{stem}/{name}/{name}_stats.tab", set()))
            year_files += [f"{stem}/{name}/{name}_{y}_stats.tab" for y in years]
        run.files(year_files, {})
    return set(names)
