"""Writing a small file whole or not at all; opening one to read without waiting on a FIFO;
showing a name from the disk in a log line."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO


def is_text(value: str) -> bool:
    """Whether a string from the OS (a file name, an environment value) is text: bytes that
    are not UTF-8 come back as surrogates, which no database, URL or log line takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class NotARegularFile(OSError):
    """A FIFO, a device or a socket where a file was expected."""


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened to read, if it is a regular file. Opened non-blocking, so that a FIFO's
    open does not wait for a writer (forever): a FIFO, a device (a link to /dev/zero) or a
    socket is NotARegularFile, a directory IsADirectoryError; both are OSErrors whose
    ``strerror`` says so in a few words."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(mode):
            raise NotARegularFile(errno.EINVAL, "not a regular file (a FIFO, a device or a socket)")
        return open(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def shown(name: str) -> str:
    """A name from the disk (or a bucket) for a log line: bytes that are not UTF-8 (decoded as
    surrogates) as U+FFFD, and the whole name escaped (``ascii``) if a character in it, a
    newline say, would break or forge the line."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text if text.isprintable() else ascii(text)


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace ``path`` with ``text``: a temporary file beside it (mode 0600 from its first
    byte, then ``mode``), renamed over it, so a reader sees the old file or the new one; on an
    error the temporary file is removed and the OSError raised."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as out:
            os.fchmod(out.fileno(), mode)
            out.write(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
