"""``etl run --engine athena``: the filtering and counting run as one Amazon Athena query over
the log bucket; the result goes through the same ledger and statistics code as a local run.

When: rebuilding years of history from the raw logs, or when a day of logs outgrows what
the instance can read in its nightly window. The daily run stays on the local engine.

Steps: list the bucket and pick the objects to ingest exactly like a local run (ledger,
look-back, ``--since``); make sure the database and the table exist (DDL shipped in
``sql/``; partition projection when the objects sit in one folder per day); run
``sql/downloads.sql`` (start, poll with backoff, stop on timeout, fail on FAILED/CANCELLED);
page through the result and store each object in its own transaction; delete the result
file (it holds client addresses); recompute.

Limits (documented in docs): only the standard ``#Fields`` layouts (the 33 columns, or the
old first 15) are counted in Athena — an object with another layout, without ``#Fields``, or
that Athena returns nothing for (empty) is reported failed and left for the local engine;
"a #Fields line before the first data line" is checked as "a #Fields line in the object".

No secret is sent to AWS: query texts stay in Athena's history and in CloudTrail, so the
query returns downloads per (category, package, day, client address) and this process hashes
the addresses with ``etl/ip_hash_key`` (:func:`bioc_webstats.logs.ip_hasher`, as the local
engine does) before anything is stored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import time
from collections.abc import Iterable, Iterator
from importlib import resources
from typing import Any

from ..categories import CATEGORIES
from ..config import Settings
from ..errors import ConfigError, WebstatsError
from ..store import records
from . import ingest, rule, sources

log = logging.getLogger(__name__)

COLUMNS = ["kind", "path", "category", "package", "day", "ip", "n1", "n2", "n3", "status"]
QUERY_TIMEOUT = 4 * 3600.0
_DAY_DIR = re.compile(r"^(?P<dir>(?:[^/]+/)*)(?P<day>[0-9]{4}-[0-9]{2}-[0-9]{2})/[^/]+$")
_STATUS = {
    "no-fields": "no #Fields line (Athena engine)",
    "layout": "non-standard #Fields layout: ingest it with the local engine",
}


def _sql(name: str) -> str:
    return (resources.files("bioc_webstats.etl") / "sql" / name).read_text(encoding="utf-8")


def _identifier(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ConfigError(f"Athena name {name!r}: lower-case letters, digits and _ only")
    return name


def table_name(location: str, by_day: bool) -> str:
    """One table per log location (and layout), named after it."""
    digest = hashlib.sha256(location.encode()).hexdigest()[:12]
    return f"cloudfront_logs_{'d' if by_day else 'f'}_{digest}"


def day_layout(prefix: str, keys: Iterable[str]) -> str | None:
    """The folder holding the ``<YYYY-MM-DD>/`` folders when every key sits in one of them
    (under the same parent), else None (a flat layout)."""
    parents = set()
    for key in keys:
        m = _DAY_DIR.match(key[len(prefix) :] if key.startswith(prefix) else key)
        if not m:
            return None
        parents.add(m["dir"])
    return parents.pop() if len(parents) == 1 else None


def table_ddl(database: str, table: str, location: str, days_dir: str | None) -> str:
    """CREATE EXTERNAL TABLE for the location (with partition projection by day or flat)."""
    full = f"{_identifier(database)}.{_identifier(table)}"
    where = location + (days_dir or "")
    if "'" in where or "\\" in where:  # it goes between quotes in the statement
        raise WebstatsError(f"Athena: the log location {where} holds a ' or a \\: not usable")
    if days_dir is None:
        sql = _sql("cloudfront_logs_table.sql")
    else:
        sql = _sql("cloudfront_logs_by_day_table.sql").replace(
            "@@DAYS_TEMPLATE@@", location + days_dir + "${day}/"
        )
    return sql.replace("@@TABLE@@", full).replace("@@LOCATION@@", location)


def downloads_sql(
    database: str,
    table: str,
    days: tuple[dt.date, dt.date] | None,
    floor: dt.date | None = None,
) -> str:
    """The counting query (``sql/downloads.sql``) with its placeholders filled. It holds no
    secret: the client addresses come back in clear and are hashed here. Lines dated before
    ``floor`` (the cut-over day) are not counted, as in the local engine."""
    where = ""
    if days is not None:
        where = f"WHERE day BETWEEN '{days[0].isoformat()}' AND '{days[1].isoformat()}'"
    fields33 = " ".join(rule.CLOUDFRONT_FIELDS)
    return (
        _sql("downloads.sql")
        .replace("@@TABLE@@", f"{_identifier(database)}.{_identifier(table)}")
        .replace("@@WHERE@@", where)
        .replace("@@RULE@@", rule.DOWNLOAD_PATTERN.replace("'", "''"))
        .replace("@@CATEGORIES@@", _category_cases())
        .replace("@@F33@@", fields33)
        .replace("@@F15@@", " ".join(rule.CLOUDFRONT_FIELDS[:15]))
        .replace("@@FLOOR@@", (floor or dt.date.min).isoformat())
        .replace("@@MAX_IP@@", str(rule.MAX_IP))
        .replace("@@MAX_URI@@", str(rule.MAX_URI))
        .replace("@@MAX_STATUS@@", str(rule.MAX_STATUS_DIGITS))
    )


# --- running queries ---------------------------------------------------------------------------


def _category_cases() -> str:
    """``WHEN '<repo path>' THEN '<prefix>'`` for each category (categories.py)."""
    return "\n            ".join(f"WHEN '{c.repo_path}' THEN '{c.prefix}'" for c in CATEGORIES)


def _aws_error(what: str, exc: BaseException) -> WebstatsError:
    from ..aws import describe_error

    return WebstatsError(f"Athena {what}: {describe_error(exc)}")


def start_query(client: Any, sql: str, database: str, workgroup: str, output: str) -> str:
    """StartQueryExecution; returns the query id."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        answer = client.start_query_execution(
            QueryString=sql,
            QueryExecutionContext={"Database": database},
            WorkGroup=workgroup,
            ResultConfiguration={"OutputLocation": output},
        )
    except (BotoCoreError, ClientError) as exc:
        raise _aws_error("start of a query", exc) from None
    return answer["QueryExecutionId"]


def check_state(qid: str, status: dict[str, Any]) -> bool:
    """True when SUCCEEDED, False while QUEUED/RUNNING; WebstatsError on FAILED/CANCELLED."""
    state = status.get("State")
    if state == "SUCCEEDED":
        return True
    if state in ("QUEUED", "RUNNING"):
        return False
    reason = " ".join(str(status.get("StateChangeReason") or "no reason given").split())
    raise WebstatsError(f"Athena query {qid} {str(state).lower()}: {reason}")


def wait_query(
    client: Any, qid: str, timeout: float = QUERY_TIMEOUT, first_delay: float = 0.5
) -> None:
    """Poll until the query ends (backoff up to 10 s); on timeout stop it and fail."""
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + timeout
    delay = first_delay
    while True:
        try:
            status = client.get_query_execution(QueryExecutionId=qid)["QueryExecution"]["Status"]
        except (BotoCoreError, ClientError) as exc:
            raise _aws_error(f"query {qid}", exc) from None
        if check_state(qid, status):
            return
        if time.monotonic() >= deadline:
            try:
                client.stop_query_execution(QueryExecutionId=qid)
            finally:
                raise WebstatsError(f"Athena query {qid} still running after {timeout:.0f}s")
        time.sleep(delay)  # polling a remote service: backoff, not a test wait
        delay = min(delay * 2, 10.0)


def result_rows(pages: Iterable[dict[str, Any]]) -> Iterator[list[str | None]]:
    """Rows of GetQueryResults pages as lists of values; the header row (first row of the
    first page) is checked and dropped."""
    first = True
    for page in pages:
        rows = page.get("ResultSet", {}).get("Rows", [])
        for row in rows:
            values = [d.get("VarCharValue") for d in row.get("Data", [])]
            if first:
                first = False
                if values != COLUMNS:
                    raise WebstatsError(f"Athena result: unexpected columns {values}")
                continue
            yield values


def fetch_rows(client: Any, qid: str, page_size: int = 1000) -> Iterator[list[str | None]]:
    """Every result row of a finished query, page by page (GetQueryResults paginator)."""
    from botocore.exceptions import BotoCoreError, ClientError

    paginator = client.get_paginator("get_query_results")
    try:
        yield from result_rows(
            paginator.paginate(QueryExecutionId=qid, PaginationConfig={"PageSize": page_size})
        )
    except (BotoCoreError, ClientError) as exc:
        raise _aws_error(f"results of query {qid}", exc) from None


def result_location(client: Any, qid: str, output: str) -> str:
    """Where Athena wrote the result of a query: ``s3://…/<qid>.csv`` (the workgroup may
    override the output location given at start)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        execution = client.get_query_execution(QueryExecutionId=qid)["QueryExecution"]
        location = execution.get("ResultConfiguration", {}).get("OutputLocation") or ""
    except (BotoCoreError, ClientError):
        location = ""
    if not location.startswith("s3://"):
        location = output.rstrip("/") + f"/{qid}.csv"
    return location


def delete_results(s3: Any, location: str) -> list[str]:
    """Delete a loaded query result (``.csv`` and ``.csv.metadata``): it holds client
    addresses in clear, like the logs, and nothing needs it once stored. Returns the URLs
    deleted; raises WebstatsError when S3 refuses."""
    from botocore.exceptions import BotoCoreError, ClientError

    from ..aws import describe_error

    bucket, _, key = location.removeprefix("s3://").partition("/")
    done = []
    for k in (key, key + ".metadata"):
        try:
            s3.delete_object(Bucket=bucket, Key=k)
        except (BotoCoreError, ClientError) as exc:
            raise WebstatsError(f"s3://{bucket}/{k}: {describe_error(exc)}") from None
        done.append(f"s3://{bucket}/{k}")
    return done


def rows_to_parsed(
    rows: Iterable[list[str | None]],
    bucket: str,
    wanted: dict[str, sources.LogObject],
    key: bytes,
) -> Iterator[ingest.Parsed]:
    """Group result rows (ordered by object) into one Parsed per wanted object, hashing the
    client addresses with ``key`` exactly like the local engine (each distinct address once
    per object). Only one object's rows are held at a time."""
    prefix = f"s3://{bucket}/"
    hasher = rule.ip_hasher(key)
    hashes: dict[str, int] = {}
    kept: list[records.Row] = []  # the current object's records
    current: ingest.Parsed | None = None
    for kind, path, cat, pkg, day, ip, n1, n2, n3, status in rows:
        object_key = (path or "").removeprefix(prefix)
        if kind == "o":
            if current is not None:
                yield _done(current, kept)
            hashes.clear()
            kept = []
            obj = wanted.get(object_key)
            current = None if obj is None else ingest.Parsed(obj)
            if current is not None:
                if status != "ok":
                    current.error = _STATUS.get(str(status), f"Athena status {status}")
                current.lines_read, current.accepted = int(n1 or 0), int(n2 or 0)
                current.rejected = int(n3 or 0)
                if current.rejected:
                    current.reasons = {"malformed (Athena engine)": current.rejected}
            continue
        if current is None or object_key != current.obj.key or current.error:
            continue
        d = dt.date.fromisoformat(str(day))
        address = str(ip)
        h = hashes.get(address)
        if h is None:
            h = hashes[address] = hasher(address.encode("utf-8"))
        n = int(str(n1))
        kept.append((str(cat), str(pkg), d, h, n))  # COPY text made in _done
        if current.max_day is None or d > current.max_day:
            current.max_day = d
    if current is not None:
        yield _done(current, kept)


def _done(parsed: ingest.Parsed, rows: list[records.Row]) -> ingest.Parsed:
    parsed.copy_data, parsed.copy_format = records.text_rows(rows), "text"
    return parsed


# --- the run ---------------------------------------------------------------------------------


def run(
    settings: Settings,
    source: str | None = None,
    since: str | None = None,
    dry_run: bool = False,
    until: str | None = None,
    poll_delay: float = 0.5,
) -> bool:
    """``etl run --engine athena``: same contract as :func:`bioc_webstats.ingest.run`."""
    from ..aws import _aws_errors, describe_error
    from ..aws import client as aws_client

    t0 = time.monotonic()
    url = ingest.source_url(settings, source)
    if not url.startswith("s3://"):
        raise ConfigError(f"--engine athena reads the log bucket: {url} is not an s3:// URL")
    database = settings.get("etl/athena_database") or "bioc_webstats"
    workgroup = settings.get("etl/athena_workgroup") or "primary"
    output = settings.get("etl/athena_output")
    if not output or not output.startswith("s3://"):
        raise ConfigError("etl/athena_output (WEBSTATS_ETL_ATHENA_OUTPUT) must be an s3:// URL")
    key = b"" if dry_run else ingest.ip_hash_key(settings, url)
    src, todo, skipped, window, last = ingest.list_window(settings, url, since, until)
    assert isinstance(src, sources.S3Source)
    summary = ingest.listed_summary(skipped, window, last)
    summary.failures += src.unreadable  # copies of one name that differ: named, the run fails
    summary.failed += len(src.unreadable)
    summary.failed_days += ingest.named_days(src.unreadable)
    if dry_run or not todo:
        if dry_run:
            for o in todo:
                log.info("would ingest %s (%d bytes)", o.key, o.size)
        else:
            ingest.finish_run(settings, summary)
        summary.elapsed = time.monotonic() - t0
        log.info("%s", summary.line("etl run --engine athena"))
        return summary.failed == 0

    location = f"s3://{src.bucket}/{src.prefix}"
    if not location.endswith("/"):
        location = location.rsplit("/", 1)[0] + "/"  # a table location is a folder
    days_dir = day_layout(location.removeprefix(f"s3://{src.bucket}/"), (o.key for o in todo))
    table = table_name(location + (days_dir or ""), days_dir is not None)
    days = None
    if days_dir is not None:
        days = (min(o.name_hour.date() for o in todo), max(o.name_hour.date() for o in todo))
    try:  # credentials are resolved here
        client = aws_client("athena")
    except _aws_errors() as exc:
        raise WebstatsError(f"Athena: {describe_error(exc)}") from None
    for sql in (
        f"CREATE DATABASE IF NOT EXISTS {_identifier(database)}",
        table_ddl(database, table, location, days_dir),
    ):
        wait_query(client, start_query(client, sql, database, workgroup, output), 600, poll_delay)
    sql = downloads_sql(database, table, days, ingest.logs_since(settings))
    qid = start_query(client, sql, database, workgroup, output)
    log.info("Athena query %s started (table %s.%s)", qid, database, table)
    wait_query(client, qid, QUERY_TIMEOUT, poll_delay)

    wanted = {o.key: o for o in todo}
    seen: set[str] = set()

    def parsed_objects() -> Iterator[ingest.Parsed]:
        for parsed in rows_to_parsed(fetch_rows(client, qid), src.bucket, wanted, key):
            seen.add(parsed.obj.key)
            yield parsed
        for obj in todo:  # objects Athena returned nothing for: empty or unreadable
            if obj.key not in seen:
                yield ingest.Parsed(obj, error="no lines returned by Athena (empty object?)")

    progress = ingest.Progress(len(todo), sum(o.size for o in todo))
    ingest.store_all(settings, parsed_objects(), summary, ingest.store_new, progress)
    location = result_location(client, qid, output)
    try:  # the records are stored: a failure here is not a reason to fail the run
        delete_results(aws_client("s3"), location)
    except (WebstatsError, *_aws_errors()) as exc:
        log.warning(
            "Athena result not deleted (%s): it holds client addresses, remove it or let "
            "the bucket's lifecycle rule expire it",
            exc,
        )
    else:
        log.info("Athena result %s deleted (loaded)", location)
    ingest.finish_run(settings, summary)
    summary.elapsed = time.monotonic() - t0
    log.info("%s", summary.line("etl run --engine athena"))
    return summary.failed == 0
