"""The published site on disk: one directory per data version, ``current`` pointing at one.

``<publish_dir>/v<version>-<token>-<code version>-<published>/packages/stats/<URL path>``;
``<publish_dir>/current`` is a symlink to one of them, replaced by a rename (atomic: a reader
follows either the old or the new link, never a mix). nginx sends what exists under
``current``; everything else goes to the app, which builds the missing page or file into the
same directory (:meth:`PublishedSite.get_or_build`) — so a version directory fills up from
two sides (the publish step, eagerly, and requests, lazily) with bodies of one data version.

Every file of a version gets the version's publish time as mtime: nginx's validators (ETag
``"<mtime hex>-<size hex>"``, Last-Modified = mtime) and the app's (:func:`validators`, the
same rule) then change with every version, and a version published later always has a later
time — also after a restore, which gets a new directory rather than an old one back.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import __version__

log = logging.getLogger(__name__)

CURRENT = "current"
SITE_PREFIX = "packages/stats"  # URL prefix, mirrored under each version directory
META_FILE = ".version.json"  # nginx never serves dot-files; the app 404s them
MAX_PUBLISH_WAIT = 2.0  # seconds a publish waits for a second later than the last one
PUBLISH_LOCK_WAIT = 30.0  # seconds it waits for the others' (each holds it about a second)
KEEP = 2  # version directories kept: the current one and the one before (requests in flight)
_DIR_RE = re.compile(r"^v([0-9]+)-([0-9A-Za-z]+)-(.+)-([0-9]+)$")


@dataclass(frozen=True)
class Version:
    """One version directory: its path, data key (``<version>-<token>``), code version and
    publish time (integer seconds since the epoch, the mtime of its files)."""

    path: Path
    key: str
    code: str
    published: int

    @property
    def data_version(self) -> int:
        return int(self.key.split("-", 1)[0])

    def file(self, relpath: str) -> Path:
        """The file of a URL path under the site prefix (``bioc/affy/index.html``)."""
        return self.path / SITE_PREFIX / relpath

    def lock(self, relpath: str) -> Path:
        """The lock its builders share (a dot-file: nginx never serves it)."""
        return self.path / (".lock-" + hashlib.sha256(relpath.encode()).hexdigest()[:24])


def file_etag(mtime: float, size: int) -> str:
    """nginx's strong ETag of a file of this mtime and size, so both answer alike."""
    return f'"{int(mtime):x}-{size:x}"'


def validators(path: Path) -> tuple[str, float, int]:
    """(strong ETag, mtime, size) of a published file."""
    st = os.stat(path)
    return file_etag(st.st_mtime, st.st_size), st.st_mtime, st.st_size


class PublishedSite:
    """The version directories under ``root`` and the ``current`` link."""

    def __init__(self, root: Path, code: str = __version__) -> None:
        self.root = root
        self.code = code

    # --- versions ---------------------------------------------------------------------------

    def _read(self, path: Path) -> Version | None:
        m = _DIR_RE.match(path.name)
        if m is None:
            return None
        return Version(path, f"{m[1]}-{m[2]}", m[3], int(m[4]))

    def versions(self) -> list[Version]:
        """Every version directory, oldest publish first."""
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return []
        found = [v for e in entries if not e.is_symlink() and (v := self._read(e)) is not None]
        return sorted(found, key=lambda v: v.published)

    def current(self) -> Version | None:
        """The version ``current`` points at, or None (nothing published yet)."""
        try:
            target = os.readlink(self.root / CURRENT)
        except OSError:
            return None
        version = self._read(self.root / target)
        return version if version is not None and version.path.is_dir() else None

    def open_version(
        self, key: str, force: bool = False, valid_thru: dt.date | None = None
    ) -> Version:
        """The directory to publish data version ``key`` into: the current one when it holds
        that key and this code version (unless ``force``), one being filled that is newer than
        the current, or a new one with a publish time later than every other's."""
        if not force and (found := self._of_key(key)) is not None:
            return found
        if self.root.exists() and not self.root.is_dir():  # mkdir would say "File exists"
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.root))
        self.root.mkdir(parents=True, exist_ok=True)
        # One publisher at a time picks its time (flock): a second later than every other
        # version's (the validators are the second and the size), and not in the future
        # (Last-Modified): one published within this second waits for the next. Who waited
        # looks again: the one before may have made this key's directory (workers of the web
        # and the ETL's publish that met the same new data version).
        with _publish_lock(self.root):
            if not force and (found := self._of_key(key)) is not None:
                return found
            latest = max((v.published for v in self.versions()), default=0)
            wait = latest + 1 - time.time()
            if 0 < wait <= MAX_PUBLISH_WAIT:  # (further: the clock went back; not waited for)
                time.sleep(wait)
            published = max(int(time.time()), latest + 1)
            path = self.root / f"v{key}-{self.code}-{published}"
            (path / SITE_PREFIX).mkdir(parents=True, exist_ok=True)
            _touch(path / SITE_PREFIX, published)
            meta = {
                "key": key,
                "code": self.code,
                "published": published,
                # what the app answers from when the database is down and it knows no data
                # version yet (StatsSite.state)
                "valid_thru": valid_thru.isoformat() if valid_thru else None,
            }
            _write_atomic(path / META_FILE, json.dumps(meta).encode() + b"\n", published)
        return Version(path, key, self.code, published)

    def _of_key(self, key: str) -> Version | None:
        """The current directory when it holds ``key`` and this code version, else the newest
        one of them being filled (newer than the current), else None."""
        cur = self.current()
        if cur is not None and cur.key == key and cur.code == self.code:
            return cur
        newer = [
            v
            for v in self.versions()
            if v.key == key and v.code == self.code and (cur is None or v.published > cur.published)
        ]
        return newer[-1] if newer else None

    def switch(self, version: Version) -> bool:
        """Point ``current`` at ``version`` (a rename: atomic for every reader) unless it
        points at a version published later; prune old versions. True if it switched."""
        cur = self.current()
        if cur is not None and (cur.path == version.path or cur.published > version.published):
            return False
        link = self.root / f".tmp-current-{os.getpid()}-{time.monotonic_ns()}"
        os.symlink(version.path.name, link)
        try:
            os.replace(link, self.root / CURRENT)
        except OSError as exc:  # `current` made a directory by hand, say: name it, not the link
            link.unlink(missing_ok=True)
            raise OSError(exc.errno, exc.strerror, str(self.root / CURRENT)) from None
        self.prune()
        return True

    def prune(self) -> list[Path]:
        """Remove version directories other than the current and the ``KEEP`` - 1 published
        before it (open files stay readable to whoever has them open); also versions that
        were being filled and lost to a later one. Returns what was removed."""
        cur = self.current()
        if cur is None:
            return []
        older = [v for v in self.versions() if v.published < cur.published]
        removed = [v.path for v in older[: max(0, len(older) - (KEEP - 1))]]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    # --- files ------------------------------------------------------------------------------

    def meta(self, version: Version) -> dict | None:
        """The version's ``.version.json`` (None when unreadable)."""
        try:
            meta = json.loads((version.path / META_FILE).read_bytes())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def lookup(self, version: Version, relpath: str) -> Path | None:
        path = version.file(relpath)
        return path if path.is_file() else None

    def write(self, version: Version, relpath: str, body: bytes) -> Path:
        """Write one body of ``version`` (atomic: tmp file + rename; mtime = publish time)."""
        path = version.file(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, body, version.published)
        return path

    def get_or_build(
        self,
        version: Version,
        relpath: str,
        build: Callable[[], tuple[bytes, bool]],
        strict: bool = False,
    ) -> Path | bytes:
        """The file, building it first if needed. One builder per file at a time, across
        threads and processes (flock), so the first requests after a change do not start the
        same heavy build in every worker; the second look after the lock finds the file the
        other builder wrote. ``build`` returns (body, storable): a body built while the data
        version moved on is served once but not stored. A disk that refuses is logged and the
        body served from memory, or, ``strict`` (a publish, which must not switch to a partial
        directory), raises its OSError."""
        path = self.lookup(version, relpath)
        if path is not None:
            return path
        try:
            lock = open(version.lock(relpath), "a+b")
        except OSError as exc:
            if strict:
                raise
            log.warning("site: cannot lock in %s (%s); serving from memory", version.path, exc)
            return build()[0]
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.lookup(version, relpath)
            if path is not None:
                return path
            body, storable = build()
            if not storable:
                return body
            try:
                return self.write(version, relpath, body)
            except OSError as exc:
                if strict:
                    raise
                log.warning("site: cannot write %s (%s); serving from memory", relpath, exc)
                return body
        finally:
            lock.close()  # releases the lock


@contextlib.contextmanager
def _publish_lock(root: Path) -> Iterator[None]:
    """Held while a publisher picks its time and makes its directory (the ETL's user, or the
    web's: read-only is enough for flock). Not through a link, only on a regular file, and
    waited for PUBLISH_LOCK_WAIT at most (a stuck holder, the web's user among them, cannot
    hold a publish for ever): without it, the publish goes on unlocked."""
    flags = os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(root / ".lock-publish", flags, 0o644)
    except OSError as exc:
        log.warning("site: no publish lock in %s (%s)", root, exc.strerror)
        yield
        return
    try:
        held = False
        if stat.S_ISREG(os.fstat(fd).st_mode):
            deadline = time.monotonic() + PUBLISH_LOCK_WAIT
            while not held:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = True
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
        if not held:
            log.warning("site: the publish lock in %s is not to be had; publishing without", root)
        yield
    finally:
        os.close(fd)  # releases the lock


def _touch(path: Path, when: int) -> None:
    os.utime(path, (when, when))


def _write_atomic(path: Path, body: bytes, mtime: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.chmod(tmp, 0o644)  # readers: the front server (the publish directory limits who)
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
