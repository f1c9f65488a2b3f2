"""Download records in, one way for every loader.

Every loader (the log ETL's two per-line loops, the Athena engine, the legacy importer)
hands an object's records over as PostgreSQL ``COPY`` data of
``(category, package, day, ip_hash, downloads)`` rows — binary (the C scanner makes it) or
text (:func:`text_rows` makes it) — and :func:`write` stores them with the object's id: by
``COPY`` on PostgreSQL, decoded into rows on SQLite (development and tests).
"""

from __future__ import annotations

import datetime as dt
import io
import struct
from collections.abc import Iterable, Iterator
from itertools import islice

from sqlalchemy import insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from .models import DownloadRecord

COLUMNS = ("category", "package", "day", "ip_hash", "downloads", "object_id")
_COPY = f"COPY download_records ({', '.join(COLUMNS)}) FROM STDIN"
_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_PG_EPOCH = dt.date(2000, 1, 1)

Row = tuple[str, str, dt.date, int, int]  # category, package, day, ip_hash, downloads


def text_rows(rows: Iterable[Row]) -> bytes:
    """COPY text of ``rows`` (no object id yet: :func:`write` adds it)."""
    return "".join(f"{c}\t{p}\t{d.isoformat()}\t{h}\t{n}\n" for c, p, d, h, n in rows).encode(
        "utf-8"
    )


def write(session: Session, data: bytes, copy_format: str) -> None:
    """Store COPY data that already carries the object id in its last column, in the
    caller's transaction."""
    if not data:
        return
    if session.get_bind().dialect.name == "postgresql":
        import psycopg2  # (only on PostgreSQL: the driver is there)

        options = " (FORMAT binary)" if copy_format == "binary" else ""
        try:
            with session.connection().connection.cursor() as cur:
                cur.copy_expert(_COPY + options, io.BytesIO(data))
        except psycopg2.Error as exc:
            # On the driver's own cursor: its error is made SQLAlchemy's, as any statement's
            # is, so that a full disk or a timeout is the one line of a database error.
            raise DBAPIError.instance(_COPY, None, exc, psycopg2.Error) from None
        return
    rows = decode(data, copy_format)
    # In batches: a list of every row as a dict took ten times the COPY data (3 GB for an
    # object of 2 M distinct clients).
    while batch := [dict(zip(COLUMNS, row, strict=True)) for row in islice(rows, _BATCH)]:
        session.execute(insert(DownloadRecord), batch)


_BATCH = 10_000  # rows per INSERT on SQLite


def decode(data: bytes, copy_format: str) -> Iterator[tuple[str, str, dt.date, int, int, int]]:
    """The rows of COPY data with object ids (for SQLite, which has no COPY), one at a time."""
    return _binary(data) if copy_format == "binary" else _text(data)


def _text(data: bytes) -> Iterator[tuple[str, str, dt.date, int, int, int]]:
    for raw in io.BytesIO(data):  # a line at a time (no list of every line)
        c, p, d, h, n, o = raw.decode("utf-8").rstrip("\n").split("\t")
        yield c, p, dt.date.fromisoformat(d), int(h), int(n), int(o)


def _binary(data: bytes) -> Iterator[tuple[str, str, dt.date, int, int, int]]:
    if not data.startswith(_SIGNATURE):
        raise ValueError("not COPY binary data")
    pos = len(_SIGNATURE) + 4
    (ext,) = struct.unpack_from(">I", data, pos)
    pos += 4 + ext
    while True:
        (nfields,) = struct.unpack_from(">h", data, pos)
        pos += 2
        if nfields == -1:
            return
        values = []
        for _ in range(nfields):
            (size,) = struct.unpack_from(">i", data, pos)
            pos += 4
            values.append(data[pos : pos + size])
            pos += size
        c, p, d, h, n, o = values
        yield (
            c.decode("utf-8"),
            p.decode("utf-8"),
            _PG_EPOCH + dt.timedelta(days=struct.unpack(">i", d)[0]),
            struct.unpack(">q", h)[0],
            struct.unpack(">i", n)[0],
            struct.unpack(">q", o)[0],
        )
