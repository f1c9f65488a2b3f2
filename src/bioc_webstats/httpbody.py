"""The body of an HTTP answer from another site (or of a file in a directory copy of it), read
with bounds: what reads the packages source (``etl/manifest.py``) and ``compare`` both need
it. The socket timeout bounds each read; a deadline bounds the whole answer, from the
connection to the body's last byte (a server sending a byte a second never times out a read,
in the headers as in the body); a size cap bounds memory; a body that ends before its
``Content-Length`` is an error, not a shorter file. Only http(s) redirects are followed."""

from __future__ import annotations

import functools
import http.client
import io
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from email.message import Message
from typing import Any, Protocol

from .errors import WebstatsError
from .files import NotARegularFile, open_regular

_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)\S*@")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")  # what http.client refuses in a host


def mask(text: str) -> str:
    """``text`` with the ``user:password@`` of every URL in it (any scheme) shown as ``***@``."""
    return _USERINFO.sub(r"\1***@", text)


def one_line(text: str, limit: int = 300) -> str:
    """Text from elsewhere (a reason phrase, a server's reply) as one short line of a message:
    a multi-line reply must not forge journal lines; masked before it is cut (no half secret)."""
    text = mask(" ".join("".join(c if c.isprintable() else " " for c in text).split()))
    return text if len(text) <= limit else text[:limit] + "…"


def is_http(url: str) -> bool:
    """Whether ``url`` is http(s): schemes are case-insensitive (``HTTP://`` is no directory)."""
    return url[:8].lower().startswith(("http://", "https://"))


def url_problem(url: str) -> str | None:
    """Why an http(s) URL cannot be fetched, found before any request (a site given, a
    redirect's target) rather than as a network error retried for every file."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError as exc:  # "http://[::1", "http://h:99999/"
        return one_line(str(exc))
    if "@" in parts.netloc:  # urllib would not send them, and every line names the URL
        return "credentials in the URL are not supported: the site must be public"
    if not parts.hostname:
        return "no host"
    if _CONTROL.search(parts.netloc):
        return "a space or a control character in the host"
    try:
        parts.hostname.encode("idna")  # what the resolver does (a label over 63 characters)
    except UnicodeError as exc:
        return f"host name not usable: {one_line(str(exc))}"
    return None


class BodyError(WebstatsError):
    """The body could not be read whole; ``retry`` says whether trying again may help."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class _Response(Protocol):
    headers: Message

    def read1(self, n: int = -1) -> bytes: ...


def _digits(text: str) -> bool:
    """ASCII digits only (str.isdigit() also takes '²', which int() refuses)."""
    return text.isascii() and text.isdigit()


def read_body(resp: _Response, max_bytes: int) -> bytes:
    """All of ``resp``'s body, one network read at a time (the deadline is the socket's)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := resp.read1(1 << 16):
        size += len(chunk)
        if size > max_bytes:
            raise BodyError(f"larger than {max_bytes} bytes", retry=False)
        chunks.append(chunk)
    expected = resp.headers.get("Content-Length")
    if expected and _digits(expected.strip()) and not resp.headers.get("Transfer-Encoding"):
        if size != int(expected):
            raise BodyError(f"cut short: {size} of {int(expected)} bytes", retry=True)
    return b"".join(chunks)


class _DeadlineIO(io.RawIOBase):
    """A socket's reads, each bounded by what is left of the answer's deadline."""

    def __init__(self, sock: Any, conn: _Bounded) -> None:
        super().__init__()
        # makefile: a reference that keeps the socket open after urllib closes the connection's
        self.sock, self.raw, self.conn = sock, sock.makefile("rb", buffering=0), conn
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int | None:
        self.sock.settimeout(self.conn.left())
        try:
            n = self.raw.readinto(buf)
        except TimeoutError:
            if time.monotonic() >= self.conn.give_up:
                raise self.conn.overdue(f"{self.received} bytes received") from None
            raise
        self.received += n or 0
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


class _Bounded:
    """An HTTP(S) connection whose connect and every read share one deadline."""

    timeout: Any
    _per_read: float

    def __init__(self, *args: Any, give_up: float, deadline: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.give_up, self.deadline, self._per_read = give_up, deadline, self.timeout

    def overdue(self, detail: str) -> BodyError:
        # Not retried: another attempt would be as slow (4 attempts held a file 4 deadlines).
        return BodyError(f"not complete after {self.deadline:g} s ({detail})", retry=False)

    def left(self) -> float:
        """The socket timeout for the next read: the per-read one, or less near the deadline."""
        left = self.give_up - time.monotonic()
        if left <= 0:
            raise self.overdue("deadline passed")
        return min(self._per_read, left)

    def connect(self) -> None:
        self.timeout = self.left()
        super().connect()

    def response_class(self, sock: Any, *args: Any, **kwargs: Any) -> http.client.HTTPResponse:
        reader = io.BufferedReader(_DeadlineIO(sock, self))
        return http.client.HTTPResponse(_Socket(reader), *args, **kwargs)


class _Socket:
    """What HTTPResponse reads through: only its ``makefile`` is used."""

    def __init__(self, reader: io.BufferedReader) -> None:
        self.reader = reader

    def makefile(self, _mode: str) -> io.BufferedReader:
        return self.reader


class _HTTP(_Bounded, http.client.HTTPConnection):
    pass


class _HTTPS(_Bounded, http.client.HTTPSConnection):
    pass


class _BoundedOpen:
    """The two handlers' part: the fetch's bounds, handed to the connection they open."""

    connection: type[_Bounded]
    do_open: Any  # (urllib's AbstractHTTPHandler)

    def __init__(self, **bound: float) -> None:
        super().__init__()
        self.bound = bound

    def _open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(self.connection, **self.bound), req)


class _HTTPHandler(_BoundedOpen, urllib.request.HTTPHandler):
    connection = _HTTP

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self._open(req)


class _HTTPSHandler(_BoundedOpen, urllib.request.HTTPSHandler):
    connection = _HTTPS

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self._open(req)


class _Redirect(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a usable http(s) URL (urllib also follows ftp://)."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Message,
        newurl: str,
    ) -> urllib.request.Request | None:  # fmt: skip
        problem = url_problem(newurl) if is_http(newurl) else "not http(s)"
        if problem:
            raise urllib.error.HTTPError(
                req.full_url, code, f"redirect to {newurl} refused: {problem}", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)

    def http_error_302(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Message
    ) -> Any:
        # urllib reads a redirect's whole body before following it (a 2 GB one took 4 GB):
        # closed first, it reads nothing.
        fp.close()
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _opened(url: str, agent: str, timeout: float, deadline: float) -> http.client.HTTPResponse:
    bound = {"give_up": time.monotonic() + deadline, "deadline": deadline}
    opener = urllib.request.build_opener(_Redirect(), _HTTPHandler(**bound), _HTTPSHandler(**bound))
    req = urllib.request.Request(url, headers={"User-Agent": agent})  # noqa: S310 - http(s)
    return opener.open(req, timeout=timeout)  # type: ignore[no-any-return]


def fetch(url: str, agent: str, timeout: float, max_bytes: int, deadline: float) -> bytes:
    """The body of ``url`` (http(s), checked by :func:`url_problem`): ``timeout`` seconds per
    read, ``deadline`` for all of it, connection and headers included (BodyError past it)."""
    with _opened(url, agent, timeout, deadline) as resp:
        # (none asked for: compressed bytes compared or parsed as the file's were every line
        # of every file "differing", or a PACKAGES of no package)
        coding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
        if coding != "identity":
            raise BodyError(f"answered in Content-Encoding {one_line(coding)[:40]!r}, not "
                            "as the file's own bytes", retry=False)  # fmt: skip
        return read_body(resp, max_bytes)


class FetchFailed(WebstatsError):
    """A fetch that failed, as one line; ``retry``: whether trying again may help;
    ``status``: the HTTP status answered (None: no answer); ``retry_after``: its header."""

    def __init__(
        self, why: str, retry: bool, status: int | None = None, retry_after: str | None = None
    ) -> None:
        super().__init__(why)
        self.retry, self.status, self.retry_after = retry, status, retry_after


def get(url: str, agent: str, timeout: float, max_bytes: int, deadline: float) -> bytes:
    """:func:`fetch`, with every way it can fail (an HTTP error, no answer, a body cut short
    or too large, a host the resolver refuses) as one :class:`FetchFailed`."""
    try:
        return fetch(url, agent, timeout, max_bytes, deadline)
    except _FAILURES as exc:
        raise _failed(exc) from None


def status(url: str, agent: str, timeout: float, deadline: float) -> int:
    """The HTTP status ``url`` answers, its body not read (the watchdog's check), redirects
    followed as :func:`fetch` follows them; no answer at all is one :class:`FetchFailed`."""
    try:
        with _opened(url, agent, timeout, deadline) as resp:
            return resp.status
    except _FAILURES as exc:
        failed = _failed(exc)
        if failed.status is None or 300 <= failed.status < 400:  # (a redirect refused: why)
            raise failed from None
        return failed.status


# Every way a fetch fails (urllib's errors are OSErrors; ValueError: a host the resolver refuses)
_FAILURES = (BodyError, OSError, http.client.HTTPException, ValueError)


def _failed(exc: Exception) -> FetchFailed:
    """A fetch's failure (one of ``_FAILURES``) as one line."""
    if isinstance(exc, BodyError):
        return FetchFailed(str(exc), exc.retry)
    if isinstance(exc, urllib.error.HTTPError):  # (before URLError: it is one)
        after = exc.headers.get("Retry-After") if exc.headers else None
        return FetchFailed(http_error(exc), True, exc.code, after)
    if isinstance(exc, urllib.error.URLError):
        return FetchFailed(_reason(exc.reason), True)
    if isinstance(exc, OSError):  # TimeoutError: a read that stalls after the headers
        return FetchFailed(_reason(exc), True)
    if isinstance(exc, http.client.HTTPException):
        return FetchFailed(not_http(exc), True)
    return FetchFailed(f"not a usable URL ({one_line(str(exc))})", False)  # a ValueError


def _reason(reason: object) -> str:
    if isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return one_line(str(reason)) or type(reason).__name__


def read_local(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """A regular file's bytes, at most ``max_bytes``. A FIFO (its open does not wait for a
    writer), a device (a link to /dev/zero) or a socket is refused, a directory is
    IsADirectoryError."""
    try:
        fh = open_regular(path)
    except NotARegularFile as exc:
        raise BodyError(exc.strerror, retry=False) from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        # A buffer of the file's size, not of the cap; one that grew (or says 0, as in
        # /proc) is read on, up to the cap.
        data = fh.read(min(size, max_bytes) + 1)
        if len(data) > size:
            data += fh.read(max_bytes + 1 - len(data))
    if len(data) > max_bytes:
        raise BodyError(f"larger than {max_bytes} bytes", retry=False)
    return data


def lines(data: bytes) -> Iterator[bytes]:
    """The lines of ``data`` without their ``\\n`` or ``\\r\\n``, one at a time (a BytesIO
    shares the bytes: no list of millions of lines). Split at ``\\n`` only: splitlines also
    splits at U+2028, ``\\x1c`` or ``\\x85`` (a phantom ``Package:`` line)."""
    for line in io.BytesIO(data):
        yield line.rstrip(b"\r\n")


def http_error(exc: urllib.error.HTTPError) -> str:
    """``HTTP 404 Not Found`` on one line (urllib's redirect-loop reason has three)."""
    return one_line(f"HTTP {exc.code} {exc.reason}")


def not_http(exc: Exception) -> str:
    """One line for an answer that is not HTTP (http.client's exceptions quote raw bytes)."""
    return f"not a valid HTTP answer ({type(exc).__name__})"
