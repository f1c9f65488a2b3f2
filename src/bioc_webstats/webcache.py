"""The disk cache of generated pages and text files, one directory per data version.

``<state_dir>/cache/v<data version>-<code version>/<URL path>``: written once (tmp file +
``os.replace``) by whichever worker first needs it, then served by every worker of every
process with sendfile. A new data version gets a new directory; older ones are pruned.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import __version__

_DIR_RE = re.compile(r"^v(\d+)-(.+)$")
log = logging.getLogger(__name__)


class DiskCache:
    """Files keyed by (data version, relative path)."""

    def __init__(self, root: Path, code_tag: str = __version__) -> None:
        self.root = root
        self.code_tag = code_tag
        self._pruned_for: int | None = None

    def version_dir(self, data_version: int) -> Path:
        """The directory of one data version (for this code version)."""
        return self.root / f"v{data_version}-{self.code_tag}"

    def lookup(self, data_version: int, relpath: str) -> Path | None:
        """The cached file, or None."""
        path = self.version_dir(data_version) / relpath
        return path if path.is_file() else None

    def write(self, data_version: int, relpath: str, body: bytes) -> Path:
        """Write ``body`` atomically (tmp file + rename); OSError if the disk refused."""
        path = self.version_dir(data_version) / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            os.chmod(tmp, 0o644)  # inside the 0750 state directory: owner and group only
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self._pruned_for != data_version:
            self._pruned_for = data_version
            self.prune(data_version)
        return path

    def store(self, data_version: int, relpath: str, body: bytes) -> Path | None:
        """Write ``body`` atomically; None if the disk refused (the caller serves from memory)."""
        try:
            return self.write(data_version, relpath, body)
        except OSError as exc:
            path = self.version_dir(data_version) / relpath
            log.warning("cache: cannot write %s (%s); serving from memory", path, exc.strerror)
            return None

    def get_or_build(
        self,
        data_version: int,
        relpath: str,
        build: Callable[[], tuple[bytes, bool]],
        strict: bool = False,
    ) -> Path | bytes:
        """The cached file, building it first if needed. One builder per file at a time,
        across threads and processes (flock), so a new data version does not start the
        same heavy build in every worker. ``build`` returns (body, cacheable): a body built
        while the data version moved on is served once but not stored. A disk that refuses
        is logged and the body served from memory; with ``strict`` the OSError is raised."""
        path = self.lookup(data_version, relpath)
        if path is not None:
            return path
        vdir = self.version_dir(data_version)
        lock_name = ".lock-" + hashlib.sha256(relpath.encode()).hexdigest()[:24]
        try:
            vdir.mkdir(parents=True, exist_ok=True)
            lock = open(vdir / lock_name, "a+b")
        except OSError as exc:
            if strict:
                raise
            log.warning("cache: cannot use %s (%s); serving from memory", vdir, exc.strerror)
            return build()[0]  # no usable disk: still answer, from memory
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.lookup(data_version, relpath)
            if path is not None:
                return path
            body, cacheable = build()
            if not cacheable:
                return body
            if strict:
                return self.write(data_version, relpath, body)
            return self.store(data_version, relpath, body) or body
        finally:
            lock.close()  # releases the lock

    def prune(self, data_version: int) -> None:
        """Remove directories of older data versions (open files stay readable until closed)."""
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return
        for entry in entries:
            m = _DIR_RE.match(entry.name)
            if m and int(m.group(1)) < data_version:
                shutil.rmtree(entry, ignore_errors=True)
