"""The S3 source against moto's server: real gzip objects, paginated listing, ingested
objects never downloaded again, ETags in the ledger."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import boto3
import pytest
from sqlalchemy import select

import loggen
from bioc_webstats.config import Settings
from bioc_webstats.errors import WebstatsError
from bioc_webstats.etl import ingest, parse, sources
from bioc_webstats.store import db
from bioc_webstats.store.models import IngestedObject
from test_ingest import assert_truth, snapshot
from test_ingest import loaded as loaded_dir


def loaded(db_url: str, tmp_path: Path, **env: str) -> Settings:
    """A bucket's first run needs the cut-over day (the whole bucket is refused)."""
    env.setdefault("WEBSTATS_ETL_LOGS_SINCE", "2009-01-01")
    return loaded_dir(db_url, tmp_path, **env)


BUCKET = "bioc-cloudfront-logs"


def upload_dir(s3, root, prefix: str) -> dict[str, str]:
    """Upload every file under ``root``; returns key → ETag."""
    etags = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = prefix + path.relative_to(root).as_posix()
        etags[key] = s3.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())["ETag"]
    return {k: v.strip('"') for k, v in etags.items()}


@pytest.fixture
def s3(aws_env):
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


def test_s3_source_ingests_and_never_rereads(db_url, tmp_path, s3, caplog):
    out = tmp_path / "logs"
    truth = loggen.generate(
        out, days=2, start=dt.date(2024, 2, 28), files_per_day=4, lines_per_file=150, subdirs=True
    )
    etags = upload_dir(s3, out, "cf/")
    s3.put_object(Bucket=BUCKET, Key="cf/README.txt", Body=b"not a log")
    # (moto's server takes no newline in a key; an escape sequence rewrites a terminal's line)
    s3.put_object(Bucket=BUCKET, Key="cf/x\x1b[2K\rERROR forged", Body=b"a control key")
    s3.put_object(Bucket=BUCKET, Key="elsewhere/E1.2024-02-28-00.aa.gz", Body=b"outside prefix")
    settings = loaded(db_url, tmp_path, WEBSTATS_ETL_WORKERS="2")
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert ingest.run(settings, source=f"s3://{BUCKET}/cf/") is True
    assert_truth(db_url, truth)
    assert "skipped 'cf/x\\x1b[2K\\rERROR forged': not a log object name" in caplog.text
    assert "\x1b" not in caplog.text and "\r" not in caplog.text
    with db.session_factory(db_url)() as s:
        ledger = {o.key: o.etag for o in s.scalars(select(IngestedObject))}
    assert ledger == {k: v for k, v in etags.items() if k.endswith(".gz")}
    before = snapshot(db_url)
    # Ingested objects are not read again: overwritten with garbage, they would fail the run.
    for key in ledger:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"garbage, not gzip")
    assert ingest.run(settings, source=f"s3://{BUCKET}/cf/") is True
    assert snapshot(db_url) == before


def test_s3_listing_across_pages(s3):
    # 1,000 other objects sort before the logs, so the logs are on the second page.
    for i in range(1000):
        s3.put_object(Bucket=BUCKET, Key=f"cf/0-{i:04d}.txt", Body=b"")
    data = loggen.log_bytes(loggen.log_line())
    names = [f"cf/{loggen.DIST}.2024-01-30-{h:02d}.u{h}.gz" for h in range(5)]
    for key in names:
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    calls = []
    client = boto3.client("s3")
    client.meta.events.register("after-call.s3.ListObjectsV2", lambda **kw: calls.append(1))
    objects, skipped = sources.S3Source(f"s3://{BUCKET}/cf/", client=client).list()
    assert sorted(o.key for o in objects) == names
    assert len(skipped) == 1000
    assert len(calls) == 2
    calls.clear()
    objects, _ = sources.S3Source(f"s3://{BUCKET}/cf/E", client=client, page_size=2).list()
    assert len(objects) == 5 and len(calls) == 3
    obj = objects[0]
    assert obj.etag and obj.size == len(data)
    res = parse.count_object(
        sources.S3Source(f"s3://{BUCKET}/", client=client).chunks(obj), obj.name_hour
    )
    assert res.accepted == 1


def test_a_distributions_flat_names_beside_its_day_folders_are_all_listed(s3):
    """A bucket moved to the folder layout: a distribution's old names at the top, its newer
    ones under <dist>/<day>/. The walk jumped past the run of flat names to "<dist>/", a
    StartAfter that passes over that whole folder: its objects were never listed, and the run
    ended well (24 of 72 objects, ValidThru two days short)."""
    data = loggen.log_bytes(loggen.log_line())
    flat = [f"{loggen.DIST}.2024-01-30-{h:02d}.f{h}.gz" for h in range(3)]
    nested = [f"{loggen.DIST}/2024-01-{d}/{loggen.DIST}.2024-01-{d}-00.n{d}.gz" for d in (30, 31)]
    window = sources.Window(start=dt.date(2024, 1, 29), until=dt.date(2024, 2, 5))
    for prefix in ("", "logs/"):  # at the bucket's top, and in a folder of it
        keys = [prefix + k for k in flat + nested]
        for key in keys:
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        for source in (f"s3://{BUCKET}/{prefix}", f"s3://{BUCKET}/{prefix}".rstrip("/")):
            objects, skipped = sources.S3Source(source).list(window)
            found = sorted(o.key for o in objects)
            assert found == sorted(keys) and skipped == [], source


def test_a_bucket_without_the_cutover_day_is_not_read_from_its_beginning(s3, tmp_path, db_url):
    """etl.md: an empty ledger starts at etl/logs_since, never at the bucket's beginning (a
    whole bucket overran the unit every day, and counted a legacy import's days twice)."""
    line = loggen.log_line(date="2024-03-10", time="05:00:00")
    key = f"{loggen.DIST}.2024-03-10-05.a.gz"
    s3.put_object(Bucket=BUCKET, Key=key, Body=loggen.log_bytes(line))
    settings = loaded_dir(db_url, tmp_path)
    with pytest.raises(WebstatsError) as exc:
        ingest.run(settings, source=f"s3://{BUCKET}/")
    assert str(exc.value) == (
        "etl run: the ledger is empty and etl/logs_since is not set: the first run would read "
        "the whole bucket; set the cut-over day (etl/logs_since, docs/CUTOVER.md) or give --since"
    )
    assert snapshot(db_url)[1] == []
    assert ingest.run(settings, source=f"s3://{BUCKET}/", since="2024-03-01")
    assert len(snapshot(db_url)[1]) == 1
    assert ingest.run(settings, source=f"s3://{BUCKET}/")  # a ledger: its look-back


def test_s3_errors_are_one_line(s3, tmp_path, db_url):
    settings = loaded(db_url, tmp_path)
    with pytest.raises(WebstatsError, match="NoSuchBucket") as exc:
        ingest.run(settings, source="s3://no-such-bucket/x/")
    assert "\n" not in str(exc.value)
    # a name S3 would refuse (botocore's validation error was two lines, with its regex)
    for bad in ("s3://bad bucket/p", "s3://Upper/p", "s3://ab/p"):
        with pytest.raises(WebstatsError) as exc:
            ingest.run(settings, source=bad)
        assert str(exc.value) == (
            f"log source {bad}: {bad[5:].split('/')[0]!r} is not an S3 bucket name "
            "(3-63 lower-case letters, digits, dots and hyphens)"
        )


def test_no_credentials_is_one_line(aws_env, tmp_path, db_url, monkeypatch):
    """No role and no instance metadata (IMDS down, or not on EC2): boto3 fails while making
    the client, before any request."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9/")
    settings = loaded(db_url, tmp_path)
    with pytest.raises(WebstatsError) as exc:
        ingest.run(settings, source=f"s3://{BUCKET}/cf/")
    assert str(exc.value).startswith(f"log source s3://{BUCKET}/cf/: MetadataRetrievalError")
    assert "\n" not in str(exc.value)


def test_s3_source_requires_configured_key(s3, tmp_path, db_url):
    settings = loaded(db_url, tmp_path, WEBSTATS_IP_HASH_KEY="")
    with pytest.raises(WebstatsError, match="ip_hash_key"):
        ingest.run(settings, source=f"s3://{BUCKET}/")


def cli_run(monkeypatch, db_url, tmp_path, *args: str, **env: str) -> int:
    """``bioc-webstats ARGS`` in this process, configured through the environment."""
    from bioc_webstats import cli

    base = {
        "WEBSTATS_DATABASE_URL": db_url,
        "WEBSTATS_STATE_DIR": str(tmp_path / "state"),
        "WEBSTATS_ENV_FILE": "/dev/null",
        "WEBSTATS_IP_HASH_KEY": "test-key",
    }
    for k, v in {**base, **env}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exc:
        cli.main(list(args))
    return int(exc.value.code or 0)


def test_every_change_publishes_and_invalidates(db_url, tmp_path, aws_env, monkeypatch):
    """etl run, stats rebuild, packages load: each change publishes the new data version and
    invalidates CloudFront once; a run that changes nothing does neither."""
    from test_aws import make_distribution
    from test_ingest import SAMPLE

    dist = make_distribution()
    cf = boto3.client("cloudfront", region_name="us-east-1")
    out = tmp_path / "logs"
    loggen.generate(out, days=1, files_per_day=2, lines_per_file=100)
    env = {"WEBSTATS_ETL_CLOUDFRONT_DISTRIBUTION": dist}
    site = tmp_path / "state" / "site"

    def invalidations() -> int:
        return cf.list_invalidations(DistributionId=dist)["InvalidationList"]["Quantity"]

    def published() -> str:
        return (site / "current").readlink().name

    assert cli_run(monkeypatch, db_url, tmp_path, "db", "upgrade") == 0
    assert cli_run(monkeypatch, db_url, tmp_path, "packages", "load", str(SAMPLE), **env) == 0
    assert invalidations() == 1
    first = published()
    assert cli_run(monkeypatch, db_url, tmp_path, "etl", "run", "--source", str(out), **env) == 0
    assert invalidations() == 2
    assert published() != first
    assert (site / "current" / "packages/stats/bioc/bioc_pkg_stats.tab").is_file()
    second = published()
    assert cli_run(monkeypatch, db_url, tmp_path, "etl", "run", "--source", str(out), **env) == 0
    assert (invalidations(), published()) == (2, second)  # nothing new: nothing published
    assert cli_run(monkeypatch, db_url, tmp_path, "stats", "rebuild", **env) == 0
    assert invalidations() == 3
    assert published() != second


def test_failed_invalidation_fails_the_run_but_keeps_the_data(
    db_url, tmp_path, aws_env, monkeypatch, capsys
):
    out = tmp_path / "logs"
    truth = loggen.generate(out, days=1, files_per_day=2, lines_per_file=100)
    loaded(db_url, tmp_path)
    env = {"WEBSTATS_ETL_CLOUDFRONT_DISTRIBUTION": "ENOSUCHDIST"}
    assert cli_run(monkeypatch, db_url, tmp_path, "etl", "run", "--source", str(out), **env) == 1
    assert_truth(db_url, truth)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "CloudFront invalidation of distribution ENOSUCHDIST failed" in err[-1]
    assert "the statistics are published" in err[-1]
    assert (tmp_path / "state" / "site" / "current").is_symlink()


def test_reingest_from_s3(db_url, tmp_path, s3):
    out = tmp_path / "logs"
    truth = loggen.generate(out, days=1, files_per_day=3, lines_per_file=120)
    upload_dir(s3, out, "")
    settings = loaded(db_url, tmp_path)
    assert ingest.run(settings, source=f"s3://{BUCKET}")
    before = snapshot(db_url)
    ingest.reingest(settings, truth.files[:2], source=f"s3://{BUCKET}")
    assert snapshot(db_url)[:3] == before[:3]
    assert_truth(db_url, truth)
    with pytest.raises(WebstatsError, match=r"NoSuchKey|Not Found|404"):
        ingest.reingest(settings, [f"{loggen.DIST}.2024-01-01-00.gone.gz"], source=f"s3://{BUCKET}")
