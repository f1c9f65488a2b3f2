"""The cut-over plumbing of the ETL: the cut-over day (``etl/logs_since``) in both parsers,
listing by window (S3 through moto's server, counted at the HTTP answers; local folders with
symlinks), the first run on an empty ledger, ``--until``."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import boto3
import pytest
from sqlalchemy import func, select

import loggen
import test_scan
from bioc_webstats.errors import ConfigError, WebstatsError
from bioc_webstats.etl import ingest, parse, rule, sources
from bioc_webstats.store import db
from bioc_webstats.store.models import DownloadRecord, IngestedObject
from test_ingest import loaded, make_settings

BUCKET = "bioc-cloudfront-logs"
CUTOVER = dt.date(2024, 3, 1)


# --- the cut-over day in the per-line rule ------------------------------------------------------


def _around_midnight() -> bytes:
    """Downloads on both sides of the cut-over day's midnight, and malformed lines."""
    lines = [
        loggen.log_line(date="2024-02-29", time="23:59:59", ip="10.0.0.1"),
        loggen.log_line(date="2024-02-29", time="22:00:00", ip="10.0.0.2"),
        loggen.log_line(date="2024-03-01", time="00:00:00", ip="10.0.0.3"),
        loggen.log_line(date="2024-03-01", time="05:00:00", ip="10.0.0.1"),
        loggen.log_line(date="2024-02-26", time="05:00:00", ip="10.0.0.4"),  # > 48 h away
        loggen.log_line(date="2024-02-30", time="05:00:00", ip="10.0.0.4"),  # no such day
    ]
    return loggen.log_bytes(*lines)


@pytest.mark.parametrize("force_python", [False, True])
def test_lines_before_the_cutover_are_not_counted(force_python, monkeypatch):
    monkeypatch.setattr(parse, "_FORCE_PYTHON", force_python)
    hour = dt.datetime(2024, 3, 1, 0)
    res = parse.count_object([_around_midnight()], hour, CUTOVER)
    assert {day for (_, day, _) in res.counts} == {CUTOVER}
    assert res.accepted == 2 and res.lines_read == 6
    assert res.reject_reasons == {
        rule.BEFORE_CUTOVER: 2,
        "timestamp more than 48 h from the object's hour": 1,
        "date/time": 1,
    }
    without = parse.count_object([_around_midnight()], hour)
    assert without.accepted == 4 and rule.BEFORE_CUTOVER not in without.reject_reasons
    rec = parse.count_records([_around_midnight()], hour, rule.ip_hasher(b"k"), CUTOVER)
    assert {r[:3] for r in test_scan.copy_rows(rec.copy_data, rec.copy_format)} == {
        ("bioc", "limma", CUTOVER)
    }
    assert rec.max_day == CUTOVER
    assert rec.accepted == 2


def test_both_parsers_agree_with_a_floor(monkeypatch, tmp_path):
    """Generated logs around the cut-over day (late lines of the day before in the first
    hours' files): the C and the Python loop give the same counts, reasons and records."""
    from test_scan import both, records_both, same

    truth = loggen.generate(
        tmp_path, days=2, start=CUTOVER - dt.timedelta(days=1), files_per_day=8,
        lines_per_file=300, seed=5,
    )  # fmt: skip
    before = 0
    for key in truth.files:
        data = (tmp_path / key).read_bytes()
        hour = sources.parse_name(key)
        a, b = both(data, hour, monkeypatch, floor=CUTOVER)
        same(a, b)
        assert all(day >= CUTOVER for (_, day, _) in a.counts)
        before += a.reject_reasons.get(rule.BEFORE_CUTOVER, 0)
        records_both(data, hour, monkeypatch, floor=CUTOVER)
    assert before > 0  # the test exercises the rule


# --- listing by window: S3 -----------------------------------------------------------------------

DAYS = 60
PER_DAY = 4


def _tiny(day: dt.date, hour: int) -> bytes:
    return loggen.log_bytes(loggen.log_line(date=day.isoformat(), time=f"{hour:02d}:10:00"))


def fill_bucket(s3, prefix: str, days: int, first: dt.date) -> list[str]:
    """``days`` days of two distributions: EFLAT's objects at the top of the prefix,
    EDIRS's under ``EDIRS/<YYYY-MM-DD>/``; plus a file that is not a log. Returns the keys."""
    keys = []
    for i in range(days):
        day = first + dt.timedelta(days=i)
        for h in range(0, 24, 24 // PER_DAY):
            stamp = f"{day:%Y-%m-%d}-{h:02d}"
            flat = f"{prefix}EFLAT.{stamp}.f{h:02d}.gz"
            nested = f"{prefix}EDIRS/{day:%Y-%m-%d}/EDIRS.{stamp}.d{h:02d}.gz"
            for key in (flat, nested):
                s3.put_object(Bucket=BUCKET, Key=key, Body=_tiny(day, h))
                keys.append(key)
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}README.txt", Body=b"not a log")
    return keys


class KeyCounter:
    """Counts the keys and folder names S3's ListObjectsV2 answers carry (botocore's
    after-call hook: what came over HTTP from moto's server)."""

    def __init__(self) -> None:
        self.keys = 0
        self.requests = 0

    def __call__(self, parsed, **_kw) -> None:
        self.requests += 1
        self.keys += len(parsed.get("Contents", ())) + len(parsed.get("CommonPrefixes", ()))

    def client(self):
        client = boto3.client("s3")
        client.meta.events.register("after-call.s3.ListObjectsV2", self)
        return client


@pytest.fixture(scope="module")
def bucket(moto_server):
    """One bucket for the module (uploading 500 objects takes a few seconds): ``big/`` holds
    60 days, ``small/`` the last 30 of them."""
    env = {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        s3 = boto3.client("s3")
        if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
            s3.create_bucket(Bucket=BUCKET)
        first = dt.date(2024, 1, 1)
        big = fill_bucket(s3, "big/", DAYS, first)
        small = fill_bucket(s3, "small/", DAYS // 2, first + dt.timedelta(days=DAYS // 2))
        yield {"big/": big, "small/": small, "last": first + dt.timedelta(days=DAYS - 1)}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_env(bucket, moto_server, monkeypatch):
    for k, v in {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(k, v)
    return bucket


def _in(keys: list[str], window: sources.Window) -> list[str]:
    return sorted(k for k in keys if sources.parse_name(k).date() in window)


@pytest.mark.parametrize(
    ("start", "until"),
    [("2024-02-26", None), ("2024-01-10", "2024-01-12"), (None, "2024-01-02"),
     ("2024-02-29", "2024-02-29"), ("2024-03-10", None), (None, None)],
)  # fmt: skip
def test_s3_window_lists_exactly_the_window(s3_env, start, until):
    window = sources.Window(
        start and dt.date.fromisoformat(start), until and dt.date.fromisoformat(until)
    )
    counter = KeyCounter()
    objects, skipped = sources.S3Source(f"s3://{BUCKET}/big/", client=counter.client()).list(window)
    assert [o.key for o in objects] == _in(s3_env["big/"], window)
    assert skipped == ["big/README.txt"]
    assert all(o.etag and o.size > 0 for o in objects)


def test_s3_long_window_pages_instead_of_a_request_a_day(s3_env):
    """A backfill's window (here 52 days, in practice years): pages of names from its start,
    not one request per day and distribution."""
    window = sources.Window(dt.date(2024, 1, 5), dt.date(2024, 2, 25))
    client = boto3.client("s3")
    prefixes: list[str] = []  # of the requests for the flat distribution's run of names
    client.meta.events.register(
        "before-parameter-build.s3.ListObjectsV2",
        lambda params, **_: prefixes.append(params.get("Prefix", "")),
    )
    objects, _ = sources.S3Source(f"s3://{BUCKET}/big/", client=client).list(window)
    assert [o.key for o in objects] == _in(s3_env["big/"], window)
    flat = [p for p in prefixes if p.startswith("big/EFLAT.")]
    assert 1 <= len(flat) <= 3, flat  # 52 requests, one a day, before


def test_s3_daily_listing_is_bounded_by_the_window_not_the_bucket(s3_env):
    """A daily run's window (4 days) costs the same number of keys whether the bucket holds
    30 or 60 days, and a small multiple of the window's own objects; a whole listing costs
    the bucket."""
    window = sources.Window(s3_env["last"] - dt.timedelta(days=3), None)
    listed = {}
    for prefix in ("small/", "big/"):
        counter = KeyCounter()
        objects, _ = sources.S3Source(f"s3://{BUCKET}/{prefix}", client=counter.client()).list(
            window
        )
        assert len(objects) == 4 * 2 * PER_DAY
        listed[prefix] = counter.keys
    whole = KeyCounter()
    sources.S3Source(f"s3://{BUCKET}/big/", client=whole.client()).list()
    assert whole.keys == len(s3_env["big/"]) + 1  # every key (README.txt too)
    assert listed["small/"] == listed["big/"]
    assert listed["big/"] <= 4 * 2 * PER_DAY + 3 * sources.WALK_PAGE
    assert listed["big/"] * 4 < whole.keys
    print(f"listing: window {listed['big/']} keys, whole bucket {whole.keys} keys")


def test_first_run_starts_at_the_cutover_and_daily_runs_list_the_window(
    s3_env, db_url, tmp_path, monkeypatch
):
    """Empty ledger + etl/logs_since: only objects named from the cut-over day (less the
    2-day margin) are read, no record is dated before it; the next daily run lists a few
    days' worth of keys."""
    from bioc_webstats import aws

    counter = KeyCounter()
    real_client = aws.client

    def counting_client(service, region=None):
        c = real_client(service, region)
        if service == "s3":
            c.meta.events.register("after-call.s3.ListObjectsV2", counter)
        return c

    monkeypatch.setattr(aws, "client", counting_client)
    cutover = dt.date(2024, 2, 20)
    settings = loaded(
        db_url, tmp_path, WEBSTATS_ETL_LOGS_SINCE=cutover.isoformat(), WEBSTATS_ETL_WORKERS="1"
    )
    assert ingest.run(settings, source=f"s3://{BUCKET}/big/", until="2024-02-25") is True
    with db.session_factory(db_url)() as s:
        names = list(s.scalars(select(IngestedObject.name_hour)))
        days = list(s.scalars(select(DownloadRecord.day).distinct()))
    days = sorted(dt.date.fromisoformat(d) if isinstance(d, str) else d for d in days)
    assert min(names).date() == cutover - ingest.CUTOVER_MARGIN
    assert max(names).date() == dt.date(2024, 2, 25)  # --until
    assert len(names) == 8 * 2 * PER_DAY
    assert days[0] == cutover  # the margin's objects hold only earlier lines: not counted
    first_keys = counter.keys
    assert first_keys <= len(names) + 3 * sources.WALK_PAGE
    # The daily run: from the newest name date less the look-back (3 days) to now.
    counter.keys = 0
    assert ingest.run(settings, source=f"s3://{BUCKET}/big/") is True
    with db.session_factory(db_url)() as s:
        total = s.scalar(select(func.count()).select_from(IngestedObject))
    after = [k for k in s3_env["big/"] if sources.parse_name(k).date() >= cutover - dt.timedelta(2)]
    assert total == len(after)
    # it listed 2024-02-22 .. 2024-02-29 (8 days) + discovery, never January
    assert counter.keys <= 8 * 2 * PER_DAY + 3 * sources.WALK_PAGE


def test_window_errors_are_one_line(db_url, tmp_path):
    settings = loaded(db_url, tmp_path, WEBSTATS_ETL_LOGS_SINCE="March")
    with pytest.raises(WebstatsError, match="etl/logs_since must be a date"):
        ingest.run(settings, source=str(tmp_path))
    settings = loaded(db_url, tmp_path)
    with pytest.raises(WebstatsError, match="--until 2024-01-01 is before --since 2024-02-01"):
        ingest.run(settings, source=str(tmp_path), since="2024-02-01", until="2024-01-01")
    with pytest.raises(WebstatsError, match="--until 'soon'"):
        ingest.run(settings, source=str(tmp_path), until="soon")
    # before the cut-over day: --since cannot go back there, so it is not offered
    since_cut = loaded(db_url, tmp_path, WEBSTATS_ETL_LOGS_SINCE="2024-03-01")
    with pytest.raises(WebstatsError) as exc:
        ingest.run(since_cut, source=str(tmp_path), until="2020-01-01")
    start = dt.date(2024, 3, 1) - ingest.CUTOVER_MARGIN
    assert str(exc.value) == (
        f"--until 2020-01-01 is before the window's start {start}; the log ETL reads nothing "
        "dated before etl/logs_since 2024-03-01"
    )
    # the same when the look-back itself starts there: --since cannot go back either

    class Newest:  # the ledger's newest name hour: exactly a look-back after that start
        def scalar(self, _query):
            return dt.datetime.combine(start + dt.timedelta(days=3), dt.time())

    with pytest.raises(WebstatsError, match="reads nothing dated before etl/logs_since"):
        ingest.plan_window(Newest(), 3, None, dt.date(2020, 1, 1), dt.date(2024, 3, 1))


def test_since_on_an_empty_ledger_does_not_narrow_the_cutover_window():
    """`etl run --since <cut-over day>` as the first run started at the day itself: the two
    days before, whose objects hold lines of the day, were left out, and the daily runs
    (from the newest name less the look-back) never went back to them."""

    class Empty:
        def scalar(self, _query):
            return None

    cut = dt.date(2024, 3, 10)
    first = cut - ingest.CUTOVER_MARGIN
    for since in (None, cut, cut + dt.timedelta(days=5), first - dt.timedelta(days=9)):
        window = ingest.plan_window(Empty(), 3, since, None, cut, dt.date(2024, 6, 1))
        assert window.start == first, since
    # no cut-over day: --since is the start
    window = ingest.plan_window(Empty(), 3, cut, None, None, dt.date(2024, 6, 1))
    assert window.start == cut


# --- listing by window: a local folder -----------------------------------------------------------


def _write(path: Path, day: dt.date, hour: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_tiny(day, hour))
    return path.name


def test_dir_source_follows_symlinked_folders_once(tmp_path):
    root = tmp_path / "logs"
    elsewhere = tmp_path / "archive"
    _write(root / "E1.2024-03-01-00.a.gz", CUTOVER, 0)
    _write(elsewhere / "E2" / "2024-03-01" / "E2.2024-03-01-01.b.gz", CUTOVER, 1)
    (root / "linked").symlink_to(elsewhere)  # a symlinked folder: followed
    (elsewhere / "loop").symlink_to(elsewhere)  # a loop: walked once
    (elsewhere / "up").symlink_to(root)  # back to the root: already walked
    objects, skipped = sources.DirSource(root).list()
    assert [o.key for o in objects] == [
        "E1.2024-03-01-00.a.gz",
        "linked/E2/2024-03-01/E2.2024-03-01-01.b.gz",
    ]
    assert skipped == []
    assert sum(1 for _ in sources.DirSource(root).chunks(objects[1])) == 1  # readable via key


def test_a_link_added_later_to_a_folder_read_names_the_same_objects(tmp_path):
    """A link to a folder inside the source, added after a run: its objects were new keys
    (``a/…`` next to ``b/…``), ingested a second time."""
    root = tmp_path / "logs"
    _write(root / "b" / "E1.2024-03-01-00.a.gz", CUTOVER, 0)
    before = [o.key for o in sources.DirSource(root).list()[0]]
    (root / "a").symlink_to("b")  # sorts first: walked first
    (root / "c").symlink_to(root / "b")
    assert (
        [o.key for o in sources.DirSource(root).list()[0]] == before == ["b/E1.2024-03-01-00.a.gz"]
    )
    assert sources.DirSource(root / "a").get("E1.2024-03-01-00.a.gz").size > 0


def test_dir_source_skips_names_and_day_folders_outside_the_window(tmp_path, monkeypatch):
    root = tmp_path / "logs"
    for i in range(10):
        day = CUTOVER + dt.timedelta(days=i)
        _write(root / f"E1.{day:%Y-%m-%d}-05.f.gz", day, 5)
        _write(root / "E2" / f"{day:%Y-%m-%d}" / f"E2.{day:%Y-%m-%d}-06.d.gz", day, 6)
    (root / "notes.txt").write_text("x")
    opened: list[str] = []
    real = os.scandir

    def scandir(path):
        opened.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(sources.os, "scandir", scandir)
    window = sources.Window(dt.date(2024, 3, 4), dt.date(2024, 3, 5))
    objects, skipped = sources.DirSource(root).list(window)
    assert [o.key for o in objects] == [
        "E1.2024-03-04-05.f.gz",
        "E1.2024-03-05-05.f.gz",
        "E2/2024-03-04/E2.2024-03-04-06.d.gz",
        "E2/2024-03-05/E2.2024-03-05-06.d.gz",
    ]
    assert skipped == ["notes.txt"]
    assert sorted(opened) == ["2024-03-04", "2024-03-05", "E2", "logs"]  # no other day opened


def test_run_on_a_symlinked_folder_is_not_zero_objects(db_url, tmp_path):
    real = tmp_path / "real"
    truth = loggen.generate(real, days=1, files_per_day=3, lines_per_file=100, subdirs=True)
    root = tmp_path / "logs"
    root.mkdir()
    (root / "cf").symlink_to(real)
    settings = loaded(db_url, tmp_path)
    assert ingest.run(settings, source=str(root)) is True
    with db.session_factory(db_url)() as s:
        assert s.scalar(select(func.count()).select_from(IngestedObject)) == len(truth.files)
        assert s.scalar(select(func.sum(DownloadRecord.downloads))) == truth.counted


@pytest.mark.parametrize(
    "args,why",
    [
        (["--until", "tomorrow"], "'tomorrow' is not a date YYYY-MM-DD"),
        (["--since", "20240101"], "'20240101' is not a date YYYY-MM-DD"),  # fromisoformat took it
        (["--until", "2024-W05-2"], "'2024-W05-2' is not a date YYYY-MM-DD"),
        (
            ["--until", "9999-12-31"],
            "'9999-12-31' is not a date YYYY-MM-DD from 1990-01-01 to 2999",
        ),
        (["--source", " "], "Invalid value for '--source': empty: name a directory or a URL"),
        (
            ["--since", "2024-02-01", "--until", "2024-01-31"],
            "--until 2024-01-31 is before --since 2024-02-01",
        ),
    ],
)
def test_cli_since_and_until_are_checked(tmp_path, monkeypatch, capsys, args, why):
    """Usage errors: exit 2, one line, before anything is read."""
    from bioc_webstats import cli

    monkeypatch.setenv("WEBSTATS_ENV_FILE", "/dev/null")
    with pytest.raises(SystemExit) as exc:
        cli.main(["etl", "run", "--source", str(tmp_path), *args])  # the last --source wins
    assert exc.value.code == 2
    assert why in capsys.readouterr().err


def test_logs_since_must_be_written_yyyy_mm_dd(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    settings = make_settings(url, tmp_path, WEBSTATS_ETL_LOGS_SINCE="20240101")
    with pytest.raises(ConfigError, match="etl/logs_since must be a date YYYY-MM-DD"):
        ingest.logs_since(settings)


def test_s3_walk_pages_grow_over_files_that_are_not_logs(s3_env):
    """A folder of many files that are not logs costs a few requests, not one per 20."""
    s3 = boto3.client("s3")
    for i in range(300):
        s3.put_object(Bucket=BUCKET, Key=f"noisy/a-{i:04d}.txt", Body=b"")
    key = "noisy/EX.2024-03-01-00.u.gz"
    s3.put_object(Bucket=BUCKET, Key=key, Body=_tiny(CUTOVER, 0))
    counter = KeyCounter()
    window = sources.Window(CUTOVER, None)
    objects, skipped = sources.S3Source(f"s3://{BUCKET}/noisy/", client=counter.client()).list(
        window
    )
    assert [o.key for o in objects] == [key] and len(skipped) == 300
    assert counter.requests <= 7  # pages of 20, 40, 80, 160, then the run and its end


def test_listing_a_folder_of_many_names_holds_nothing_per_name_outside_the_window(tmp_path):
    """A local copy of years of archive in one folder (`aws s3 sync`): names outside the window
    cost nothing, a name inside one small object (the listing of 200,000 names took 243 MB,
    and 71 MB with none of them in the window: every entry sorted in a list, a Path and an
    interned name each)."""
    import tracemalloc

    root = tmp_path / "logs"
    root.mkdir()
    names = 20_000
    for i in range(names):
        (root / f"E1.2023-01-{1 + i % 28:02d}-{i % 24:02d}.{i:08x}.gz").touch()
    peaks = {}
    for what, window in (
        ("outside", sources.Window(dt.date(2024, 1, 1), dt.date(2024, 1, 2))),
        ("inside", sources.EVERYTHING),
    ):
        tracemalloc.start()
        objects, _ = sources.DirSource(root).list(window)
        peaks[what] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(objects) == (0 if what == "outside" else names)
    assert peaks["outside"] < 64 * 1024, peaks  # was 300 bytes a name
    assert peaks["inside"] < names * 400, peaks  # was 1,150 bytes a name
