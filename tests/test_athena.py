"""``etl run --engine athena``: the generated SQL, and the orchestration against moto's server
(start, poll, paginate, failure states, loading through the ledger)."""

from __future__ import annotations

import datetime as dt
import json
import re
import urllib.request
from collections import defaultdict
from pathlib import Path

import boto3
import pytest
from sqlalchemy import select

import loggen
from bioc_webstats.config import Settings
from bioc_webstats.errors import WebstatsError
from bioc_webstats.etl import athena, ingest, parse, rule, sources
from bioc_webstats.store import db
from bioc_webstats.store.models import DownloadRecord, IngestedObject
from test_ingest import assert_truth
from test_ingest import loaded as loaded_dir


def loaded(db_url: str, tmp_path: Path, **env: str) -> Settings:
    """A bucket's first run needs the cut-over day (the whole bucket is refused)."""
    env.setdefault("WEBSTATS_ETL_LOGS_SINCE", "2009-01-01")
    return loaded_dir(db_url, tmp_path, **env)


BUCKET = "bioc-cloudfront-logs"
OUTPUT = "s3://athena-results/webstats/"


def moto_api(base: str, path: str, body: dict) -> None:
    req = urllib.request.Request(
        f"{base}/moto-api/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(req, timeout=10).read()


def seed_results(base: str, *results: list[list[str | None]]) -> None:
    """Queue query results in moto, one list of rows per query started (in order)."""
    payload = []
    for rows in results:
        payload.append(
            {
                "rows": [
                    {"Data": [{} if v is None else {"VarCharValue": str(v)} for v in row]}
                    for row in rows
                ],
                "column_info": [{"Name": c, "Type": "varchar"} for c in athena.COLUMNS],
            }
        )
    moto_api(base, "static/athena/query-results", {"results": payload})


@pytest.fixture
def manual_athena(aws_env):
    """Athena executions advance one state per GetQueryExecution call after ``times`` calls."""

    def set_times(times: int) -> None:
        moto_api(
            aws_env,
            "state-manager/set-transition",
            {
                "model_name": "athena::execution",
                "transition": {"progression": "manual", "times": times},
            },
        )

    yield set_times
    moto_api(aws_env, "state-manager/unset-transition", {"model_name": "athena::execution"})


# --- the SQL --------------------------------------------------------------------------------


def test_download_pattern_is_the_same_rule_in_sql_syntax(tmp_path):
    """The pattern given to Athena, as a plain anchored regex, classifies every path the
    generator makes exactly like the local engine."""
    out = tmp_path / "logs"
    loggen.generate(out, days=1, files_per_day=2, lines_per_file=2000, seed=4)
    uris = set()
    for f in out.glob("*.gz"):
        for lines in sources.line_batches([f.read_bytes()]):
            for line in lines:
                parts = line.split(b"\t")
                if len(parts) > 8 and not line.startswith(b"#"):
                    uris.update(p for p in parts if p.startswith(b"/"))
    plain = re.compile("^" + rule.DOWNLOAD_PATTERN + "$")
    categories = {"bioc": "bioc", "data/annotation": "annotation"}
    categories |= {"data/experiment": "experiment", "workflows": "workflows"}
    hits = 0
    for uri in uris:
        collapsed = re.sub("/+", "/", uri.decode())
        m = plain.match(collapsed)
        sql_view = (categories[m[1]], m[2] or m[3]) if m else None
        assert sql_view == rule.classify_uri(uri), uri
        hits += m is not None
    assert hits > 100 and len(uris) > hits


def test_downloads_sql_is_filled_in():
    sql = athena.downloads_sql("bioc_webstats", "t1", (dt.date(2024, 1, 1), dt.date(2024, 1, 3)))
    assert "@@" not in sql
    assert "FROM bioc_webstats.t1" in sql
    assert "WHERE day BETWEEN '2024-01-01' AND '2024-01-03'" in sql
    assert "hmac_sha256(" not in sql  # hashing happens on the instance: no key in the text
    assert f"'^{rule.DOWNLOAD_PATTERN}$'" in sql
    assert "'" + " ".join(rule.CLOUDFRONT_FIELDS) + "'" in sql
    assert "'" + " ".join(rule.CLOUDFRONT_FIELDS[:15]) + "'" in sql
    assert "IN (200, 301, 302, 307, 308)" in sql and "172800" in sql
    assert "ORDER BY path, kind" in sql
    # the local engine's byte bounds: a longer address or path is a rejected line
    assert f"WHEN length(to_utf8(element_at(f, 5))) > {rule.MAX_IP} THEN false" in sql
    assert f"WHEN length(to_utf8(element_at(f, 8))) > {rule.MAX_URI} THEN false" in sql
    # and its status digits: 0000000200 is malformed there, not a download
    assert f"'^[0-9]{{1,{rule.MAX_STATUS_DIGITS}}}$'" in sql
    assert rule.status_class(b"0" * (rule.MAX_STATUS_DIGITS - 3) + b"200") == rule.DL
    assert rule.status_class(b"0" * (rule.MAX_STATUS_DIGITS - 2) + b"200") == rule.BAD
    assert "WHERE day" not in athena.downloads_sql("d", "t", None)
    # the cut-over day: lines dated before it are not counted (0001-01-01 when unset)
    assert "WHEN element_at(f, 1) < '0001-01-01' THEN false" in sql
    floored = athena.downloads_sql("d", "t", None, dt.date(2024, 3, 1))
    assert "WHEN element_at(f, 1) < '2024-03-01' THEN false" in floored and "@@" not in floored
    with pytest.raises(WebstatsError):
        athena.downloads_sql("bad-name; drop", "t", None)


def test_table_ddl_flat_and_projected():
    flat = athena.table_ddl("db1", "tf", "s3://b/cf/", None)
    assert "LOCATION 's3://b/cf/'" in flat and "projection" not in flat and "@@" not in flat
    by_day = athena.table_ddl("db1", "td", "s3://b/cf/", "E1TV/")
    assert "'storage.location.template' = 's3://b/cf/E1TV/${day}/'" in by_day
    assert "PARTITIONED BY (day STRING)" in by_day and "@@" not in by_day
    # between quotes in the statement: a quote in a prefix or a folder broke out of them
    for location, days in (("s3://b/it's/", None), ("s3://b/cf/", "E1\\'/")):
        with pytest.raises(athena.WebstatsError, match=r"holds a ' or a \\: not usable"):
            athena.table_ddl("db1", "t", location, days)


def test_day_layout_detection():
    keys = ["cf/E1/2024-01-30/E1.2024-01-30-01.a.gz", "cf/E1/2024-01-31/E1.2024-01-31-00.b.gz"]
    assert athena.day_layout("cf/", keys) == "E1/"
    assert athena.day_layout("", ["2024-01-30/E1.2024-01-30-01.a.gz"]) == ""
    assert athena.day_layout("cf/", ["cf/E1.2024-01-30-01.a.gz"]) is None
    assert athena.day_layout("cf/", [*keys, "cf/E2/2024-01-30/E2.2024-01-30-01.c.gz"]) is None


# --- orchestration pieces -----------------------------------------------------------------------


def test_check_state():
    assert athena.check_state("q", {"State": "SUCCEEDED"}) is True
    assert athena.check_state("q", {"State": "RUNNING"}) is False
    assert athena.check_state("q", {"State": "QUEUED"}) is False
    with pytest.raises(WebstatsError, match="q failed: HIVE_BAD_DATA: bad gzip"):
        athena.check_state("q", {"State": "FAILED", "StateChangeReason": "HIVE_BAD_DATA: bad gzip"})
    with pytest.raises(WebstatsError, match="q cancelled"):
        athena.check_state("q", {"State": "CANCELLED"})


def test_result_rows_across_pages():
    def page(rows):
        return {"ResultSet": {"Rows": [{"Data": [{"VarCharValue": v} for v in r]} for r in rows]}}

    header = athena.COLUMNS
    rows = [[f"o{i}"] + ["x"] * 9 for i in range(5)]
    pages = [page([header, *rows[:2]]), page(rows[2:4]), page(rows[4:])]
    assert [r[0] for r in athena.result_rows(pages)] == ["o0", "o1", "o2", "o3", "o4"]
    with pytest.raises(WebstatsError, match="unexpected columns"):
        list(athena.result_rows([page([["a", "b"]])]))


def test_polling_waits_through_queued_and_running(aws_env, manual_athena):
    manual_athena(2)
    client = boto3.client("athena")
    qid = athena.start_query(client, "SELECT 1", "default", "primary", OUTPUT)
    calls = []
    client.meta.events.register("after-call.athena.GetQueryExecution", lambda **kw: calls.append(1))
    athena.wait_query(client, qid, timeout=60, first_delay=0.01)
    assert len(calls) >= 3  # QUEUED, RUNNING, SUCCEEDED


def test_timeout_stops_the_query(aws_env, manual_athena):
    manual_athena(10_000)
    client = boto3.client("athena")
    qid = athena.start_query(client, "SELECT 1", "default", "primary", OUTPUT)
    with pytest.raises(WebstatsError, match="still running"):
        athena.wait_query(client, qid, timeout=0.05, first_delay=0.01)
    state = client.get_query_execution(QueryExecutionId=qid)["QueryExecution"]["Status"]["State"]
    assert state == "CANCELLED"
    with pytest.raises(WebstatsError, match="cancelled"):
        athena.wait_query(client, qid, timeout=5, first_delay=0.01)


# --- end to end against moto ---------------------------------------------------------------------


def expected_rows(out, files, bucket_prefix: str) -> list[list[str | None]]:
    """What the Athena query returns for these objects (computed with the local engine):
    downloads per (category, package, day, client address), the address in clear."""
    rows: list[list[str | None]] = [athena.COLUMNS]
    for rel in sorted(files):
        hour = sources.parse_name(rel)
        res = parse.count_object([(out / rel).read_bytes()], hour)
        path = f"s3://{BUCKET}/{bucket_prefix}{rel}"
        rows.append(
            ["o", path, None, None, None, None, res.lines_read, res.accepted, res.rejected, "ok"]
        )
        agg: dict[tuple, int] = defaultdict(int)
        for ((cat, pkg), day, ip), n in res.counts.items():
            agg[(cat, pkg, day.isoformat(), ip.decode())] += n
        for (cat, pkg, day, ip), n in sorted(agg.items()):
            rows.append(["r", path, cat, pkg, day, ip, n, None, None, None])
    return rows


def test_athena_run_loads_through_the_ledger(db_url, tmp_path, aws_env, manual_athena):
    manual_athena(1)
    out = tmp_path / "logs"
    truth = loggen.generate(
        out, days=1, start=dt.date(2024, 4, 2), files_per_day=6, lines_per_file=150, subdirs=True
    )
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.create_bucket(Bucket="athena-results")
    for rel in truth.files:
        s3.put_object(Bucket=BUCKET, Key=f"cf/{rel}", Body=(out / rel).read_bytes())
    empty = f"cf/{loggen.DIST}/2024-04-02/{loggen.DIST}.2024-04-02-23.empty.gz"
    s3.put_object(Bucket=BUCKET, Key=empty, Body=b"")
    settings = loaded(db_url, tmp_path, WEBSTATS_ETL_ATHENA_OUTPUT=OUTPUT)
    rows = expected_rows(out, truth.files, "cf/")
    seed_results(aws_env, [], [], rows)  # CREATE DATABASE, CREATE TABLE, the query

    assert athena.run(settings, source=f"s3://{BUCKET}/cf/", poll_delay=0.01) is False
    assert_truth(db_url, truth)
    with db.session_factory(db_url)() as s:
        ledger = set(s.scalars(select(IngestedObject.key)))
    assert ledger == {f"cf/{rel}" for rel in truth.files}  # the empty object failed

    client = boto3.client("athena")
    queries = [
        client.get_query_execution(QueryExecutionId=q)["QueryExecution"]["Query"]
        for q in client.list_query_executions()["QueryExecutionIds"]
    ]
    assert any(q.startswith("CREATE DATABASE IF NOT EXISTS bioc_webstats") for q in queries)
    ddl = next(q for q in queries if "CREATE EXTERNAL TABLE" in q)
    assert f"s3://{BUCKET}/cf/{loggen.DIST}/${{day}}/" in ddl
    select_q = next(q for q in queries if "ORDER BY path, kind" in q)
    assert "WHERE day BETWEEN '2024-04-02' AND '2024-04-02'" in select_q


def records(url: str) -> list[tuple]:
    with db.session_factory(url)() as s:
        return sorted(
            (r.category, r.package, r.day, r.ip_hash, r.downloads)
            for r in s.scalars(select(DownloadRecord))
        )


def test_no_secret_reaches_aws_and_records_equal_the_local_engine(
    db_url, tmp_path, aws_env, manual_athena
):
    """The hash key is in no query text AWS keeps (history, CloudTrail): the addresses come
    back in clear and are hashed on the instance, giving the local engine's records."""
    secret = "k3y-Only-On-The-Instance-7d1e0c"
    manual_athena(1)
    out = tmp_path / "logs"
    truth = loggen.generate(
        out, days=1, start=dt.date(2024, 5, 6), files_per_day=4, lines_per_file=200, seed=9
    )
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.create_bucket(Bucket="athena-results")
    for rel in truth.files:
        s3.put_object(Bucket=BUCKET, Key=f"cf/{rel}", Body=(out / rel).read_bytes())
    settings = loaded(
        db_url, tmp_path, WEBSTATS_ETL_ATHENA_OUTPUT=OUTPUT, WEBSTATS_IP_HASH_KEY=secret
    )
    seed_results(aws_env, [], [], expected_rows(out, truth.files, "cf/"))
    assert athena.run(settings, source=f"s3://{BUCKET}/cf/", poll_delay=0.01) is True
    assert_truth(db_url, truth)

    client = boto3.client("athena")
    ids = client.list_query_executions()["QueryExecutionIds"]
    assert len(ids) == 3  # database, table, the counting query
    for qid in ids:
        execution = client.get_query_execution(QueryExecutionId=qid)["QueryExecution"]
        text = json.dumps(execution, default=str)  # the query and everything sent with it
        for form in (secret, secret.encode().hex(), secret.upper(), secret.lower()):
            assert form not in text
        assert "hmac_sha256(" not in execution["Query"]

    # the loaded result (client addresses in clear) is not left in the results bucket
    counting = next(
        q
        for q in ids
        if "ORDER BY path, kind"
        in client.get_query_execution(QueryExecutionId=q)["QueryExecution"]["Query"]
    )
    left = s3.list_objects_v2(Bucket="athena-results").get("Contents", [])
    assert not [o["Key"] for o in left if o["Key"].startswith(f"webstats/{counting}.csv")]

    # the same files through the local engine, same key: the same records, hash for hash
    local_url = f"sqlite:///{tmp_path / 'local.db'}"
    db.upgrade(local_url)
    local = loaded(local_url, tmp_path / "local", WEBSTATS_IP_HASH_KEY=secret)
    assert ingest.run(local, source=str(out)) is True
    assert records(db_url) == records(local_url)
    assert len(records(db_url)) > 50


def test_athena_engine_needs_s3_and_output(db_url, tmp_path):
    settings = loaded(db_url, tmp_path)
    with pytest.raises(WebstatsError, match="not an s3:// URL"):
        athena.run(settings, source=str(tmp_path))
    with pytest.raises(WebstatsError, match="athena_output"):
        athena.run(settings, source="s3://bucket/cf/")


def test_result_file_is_deleted_and_a_refusal_is_an_error(aws_env):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="athena-results")
    client = boto3.client("athena")
    seed_results(aws_env, [athena.COLUMNS, ["o", "s3://b/k", *[None] * 8]])
    qid = athena.start_query(client, "SELECT 1", "default", "primary", OUTPUT)
    athena.wait_query(client, qid, timeout=60, first_delay=0.01)
    assert len(list(athena.fetch_rows(client, qid))) == 1
    location = athena.result_location(client, qid, OUTPUT)
    assert location == f"{OUTPUT}{qid}.csv"
    s3.head_object(Bucket="athena-results", Key=f"webstats/{qid}.csv")  # moto wrote it
    assert athena.delete_results(s3, location) == [location, location + ".metadata"]
    assert "Contents" not in s3.list_objects_v2(Bucket="athena-results")
    with pytest.raises(WebstatsError, match=r"s3://no-such-bucket/x\.csv: NoSuchBucket"):
        athena.delete_results(s3, "s3://no-such-bucket/x.csv")


def test_athena_run_honours_the_window_and_the_cutover(db_url, tmp_path, aws_env, manual_athena):
    """--until and etl/logs_since: the objects listed (from two days before the cut-over day
    to --until), the partition filter of the query, and its floor on the line dates."""
    manual_athena(1)
    out = tmp_path / "logs"
    truth = loggen.generate(
        out, days=5, start=dt.date(2024, 4, 1), files_per_day=2, lines_per_file=50, subdirs=True
    )
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    s3.create_bucket(Bucket="athena-results")
    for rel in truth.files:
        s3.put_object(Bucket=BUCKET, Key=f"cf/{rel}", Body=(out / rel).read_bytes())
    settings = loaded(
        db_url, tmp_path, WEBSTATS_ETL_ATHENA_OUTPUT=OUTPUT, WEBSTATS_ETL_LOGS_SINCE="2024-04-04"
    )
    wanted = [r for r in truth.files if "2024-04-02" <= r.split("/")[1] <= "2024-04-03"]
    assert len(wanted) == 4
    seed_results(aws_env, [], [], expected_rows(out, wanted, "cf/"))
    assert athena.run(settings, source=f"s3://{BUCKET}/cf/", until="2024-04-03", poll_delay=0.01)
    with db.session_factory(db_url)() as s:
        ledger = set(s.scalars(select(IngestedObject.key)))
    assert ledger == {f"cf/{rel}" for rel in wanted}
    client = boto3.client("athena")
    queries = [
        client.get_query_execution(QueryExecutionId=q)["QueryExecution"]["Query"]
        for q in client.list_query_executions()["QueryExecutionIds"]
    ]
    select_q = next(q for q in queries if "ORDER BY path, kind" in q)
    assert "WHERE day BETWEEN '2024-04-02' AND '2024-04-03'" in select_q
    assert "WHEN element_at(f, 1) < '2024-04-04' THEN false" in select_q
