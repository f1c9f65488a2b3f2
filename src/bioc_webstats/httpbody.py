"""The body of an HTTP answer from another site, read with bounds: what reads the packages
source (``etl/manifest.py``) and ``compare`` both need it. The socket timeout bounds each
read; a deadline bounds the whole body (a server sending a byte a second never times out a
read); a size cap bounds memory; a body that ends before its ``Content-Length`` is an error,
not a shorter file."""

from __future__ import annotations

import time
import urllib.error
from email.message import Message
from typing import Protocol

from .errors import WebstatsError


def no_credentials(url: str, what: str) -> None:
    """Refuse an http(s) URL carrying ``user:password@``: urllib would not send them, and
    the URL is printed in every line about it (a secret in the journal)."""
    authority = url.partition("://")[2].split("/", 1)[0].split("?", 1)[0]
    if "@" in authority:
        scheme = url.partition("://")[0]
        host = authority.rpartition("@")[2]
        raise WebstatsError(
            f"{what} {scheme}://***@{host}/…: credentials in the URL are not supported "
            "(the site must be public)"
        )


class BodyError(WebstatsError):
    """The body could not be read whole; ``retry`` says whether trying again may help."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class _Response(Protocol):
    headers: Message

    def read1(self, n: int = -1) -> bytes: ...


def read_body(resp: _Response, max_bytes: int, deadline: float) -> bytes:
    """All of ``resp``'s body, one network read at a time."""
    give_up = time.monotonic() + deadline
    chunks: list[bytes] = []
    size = 0
    while chunk := resp.read1(1 << 16):
        size += len(chunk)
        if size > max_bytes:
            raise BodyError(f"larger than {max_bytes} bytes", retry=False)
        chunks.append(chunk)
        if time.monotonic() > give_up:
            raise BodyError(f"not complete after {deadline:g} s ({size} bytes)", retry=True)
    expected = resp.headers.get("Content-Length")
    if expected and expected.strip().isdigit() and not resp.headers.get("Transfer-Encoding"):
        if size != int(expected):
            raise BodyError(f"cut short: {size} of {int(expected)} bytes", retry=True)
    return b"".join(chunks)


def http_error(exc: urllib.error.HTTPError) -> str:
    """``HTTP 404 Not Found`` on one line (urllib's redirect-loop reason has three)."""
    return " ".join(f"HTTP {exc.code} {exc.reason}".split())


def not_http(exc: Exception) -> str:
    """One line for an answer that is not HTTP (http.client's exceptions quote raw bytes)."""
    return f"not a valid HTTP answer ({type(exc).__name__})"
