"""ingest.py + stats.py on SQLite and real PostgreSQL: ground truth, exactly once, late files,
re-ingest, bad input, dry run, packages-table changes and rebuild."""

from __future__ import annotations

import datetime as dt
import gzip
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

import loggen
from bioc_webstats.config import Settings, load_settings
from bioc_webstats.errors import WebstatsError
from bioc_webstats.etl import ingest, packages, parse, sources
from bioc_webstats.store import db, stats
from bioc_webstats.store.models import (
    CategoryStat,
    DownloadRecord,
    IngestedObject,
    Meta,
    PackageStat,
    RecordMonth,
    StatsPending,
)
from conftest import interruptible, wait_for

SAMPLE = loggen.PACKAGES_SAMPLE


def make_settings(db_url: str, tmp_path: Path, **env: str) -> Settings:
    base = {
        "WEBSTATS_DATABASE_URL": db_url,
        "WEBSTATS_STATE_DIR": str(tmp_path / "state"),
        "WEBSTATS_ENV_FILE": "/dev/null",
        "WEBSTATS_IP_HASH_KEY": "test-key",
    }
    return load_settings({**base, **env})


def stats_tables(url: str) -> tuple[dict, dict]:
    with db.session_factory(url)() as s:
        pkg = {
            (r.category, r.package, r.year, r.month): (r.ips, r.downloads)
            for r in s.scalars(select(PackageStat))
        }
        cat = {
            (r.category, r.year, r.month): (r.ips, r.downloads)
            for r in s.scalars(select(CategoryStat))
        }
    return pkg, cat


def snapshot(url: str) -> tuple:
    """Everything a run could change."""
    with db.session_factory(url)() as s:
        ledger = sorted(
            (o.key, o.lines_read, o.accepted, o.rejected) for o in s.scalars(select(IngestedObject))
        )
        records = sorted(
            (r.category, r.package, r.day, r.ip_hash, r.downloads)
            for r in s.scalars(select(DownloadRecord))
        )
        meta = {m.key: m.value for m in s.scalars(select(Meta))}
        pending = s.scalar(select(func.count()).select_from(StatsPending))
    return (stats_tables(url), ledger, records, meta, pending)


def assert_truth(url: str, truth: loggen.Truth) -> None:
    pkg, cat = stats_tables(url)
    assert pkg == truth.package
    assert cat == truth.category


@pytest.fixture
def data(tmp_path) -> tuple[Path, loggen.Truth]:
    """Three days across a year end (workflows start in 2015), six files a day."""
    out = tmp_path / "logs"
    truth = loggen.generate(
        out, days=3, start=dt.date(2014, 12, 30), files_per_day=6, lines_per_file=250, seed=7
    )
    return out, truth


def loaded(db_url: str, tmp_path: Path, **env: str) -> Settings:
    settings = make_settings(db_url, tmp_path, **env)
    packages.load_csv(settings, SAMPLE)
    return settings


@pytest.mark.parametrize(("workers", "parser"), [("1", "native"), ("2", "native"), ("2", "python")])
def test_statistics_equal_ground_truth(db_url, tmp_path, data, workers, parser, monkeypatch):
    out, truth = data
    monkeypatch.setattr(parse, "_FORCE_PYTHON", parser == "python")  # forked workers inherit it
    assert parse.parser_name() == parser
    settings = loaded(db_url, tmp_path, WEBSTATS_ETL_WORKERS=workers)
    assert ingest.run(settings, source=str(out)) is True
    assert_truth(db_url, truth)
    with db.session_factory(db_url)() as s:
        assert s.scalar(select(func.sum(DownloadRecord.downloads))) == truth.counted
        assert s.scalar(select(func.count()).select_from(IngestedObject)) == len(truth.files)
        newest = s.scalar(select(func.max(DownloadRecord.day)))
        assert db.get_valid_thru(s) == (
            dt.date.fromisoformat(newest) if isinstance(newest, str) else newest
        )
        assert db.get_data_version(s) >= 1
        assert s.scalar(select(func.count()).select_from(StatsPending)) == 0
    # nothing before a category's first year: workflows 2014 downloads exist but not counted
    assert any(k[0] == "workflows" for k in truth.package)
    assert not any(k[0] == "workflows" and k[2] < 2015 for k in stats_tables(db_url)[0])


def test_second_run_changes_nothing(db_url, tmp_path, data, caplog):
    out, _ = data
    settings = loaded(db_url, tmp_path)
    assert ingest.run(settings, source=str(out))
    before = snapshot(db_url)
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert ingest.run(settings, source=str(out))
    assert snapshot(db_url) == before
    assert "0 objects ingested" in caplog.text and "0 months recomputed" in caplog.text


def test_subdirectory_layout_and_skipped_names(db_url, tmp_path, caplog):
    out = tmp_path / "logs"
    truth = loggen.generate(out, days=1, files_per_day=3, lines_per_file=200, seed=3, subdirs=True)
    (out / "notes.txt").write_text("not a log")
    (out / "x\nERROR forged").write_text("a newline in its name")
    settings = loaded(db_url, tmp_path)
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert ingest.run(settings, source=str(out))
    assert_truth(db_url, truth)
    assert "skipped notes.txt: not a log object name" in caplog.text
    # A name is one escaped word of its line, never a line of its own.
    assert "skipped 'x\\nERROR forged': not a log object name" in caplog.text
    assert not any(line.startswith("ERROR forged") for line in caplog.text.splitlines())
    assert "2 skipped (not log names)" in caplog.text


def late_file(out: Path, hour: dt.datetime, n: int) -> Path:
    """A file for ``hour`` whose downloads all fall in that hour (known packages)."""
    names = [p for p, c in loggen.read_packages() if c == "bioc"][:5]
    lines = [
        loggen.log_line(
            uri=f"/packages/3.18/bioc/src/contrib/{names[i % 5]}_1.0.tar.gz",
            ip=f"198.51.100.{i % 7}",
            date=f"{hour:%Y-%m-%d}",
            time=f"{hour:%H}:{i % 60:02d}:00",
        )
        for i in range(n)
    ]
    path = out / f"{loggen.DIST}.{hour:%Y-%m-%d-%H}.late{n}.gz"
    path.write_bytes(loggen.log_bytes(*lines))
    return path


def test_late_file_picked_up_and_only_its_months_recomputed(db_url, tmp_path, caplog):
    out = tmp_path / "logs"
    loggen.generate(out, days=4, start=dt.date(2024, 1, 30), files_per_day=4, lines_per_file=200)
    settings = loaded(db_url, tmp_path)
    assert ingest.run(settings, source=str(out))
    # Tamper with February: if February were recomputed, the tampering would vanish.
    sf = db.session_factory(db_url)
    with sf.begin() as s:
        s.execute(
            update(PackageStat)
            .where(PackageStat.year == 2024, PackageStat.month == 2)
            .values(downloads=999999)
        )
        version = db.get_data_version(s)
    # Newest file is 2024-02-02-18; a file for 2024-01-31-20 arrives two days late.
    late_file(out, dt.datetime(2024, 1, 31, 20), 40)
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert ingest.run(settings, source=str(out))
    assert "1 objects ingested" in caplog.text
    assert "1 months recomputed" in caplog.text  # bioc January 2024 (and its year)
    pkg, _ = stats_tables(db_url)
    assert all(v[1] == 999999 for k, v in pkg.items() if k[2:] == (2024, 2))
    with sf() as s:
        assert db.get_data_version(s) == version + 1
    january = {k: v for k, v in pkg.items() if k[2:] == (2024, 1)}
    # January is what a full rebuild says it is.
    stats.rebuild(settings)
    pkg2, _ = stats_tables(db_url)
    assert january == {k: v for k, v in pkg2.items() if k[2:] == (2024, 1)}
    assert any(v[1] != 999999 for k, v in pkg2.items() if k[2:] == (2024, 2))


def test_lookback_window_and_since(db_url, tmp_path):
    out = tmp_path / "logs"
    loggen.generate(out, days=2, start=dt.date(2024, 3, 10), files_per_day=2, lines_per_file=100)
    settings = loaded(db_url, tmp_path, WEBSTATS_ETL_LOOKBACK_DAYS="3")
    assert ingest.run(settings, source=str(out))
    old = late_file(out, dt.datetime(2024, 3, 1, 5), 10)  # 10 days before the newest
    assert ingest.run(settings, source=str(out))
    with db.session_factory(db_url)() as s:
        keys = set(s.scalars(select(IngestedObject.key)))
    assert old.name not in keys
    assert ingest.run(settings, source=str(out), since="2024-03-01")
    with db.session_factory(db_url)() as s:
        assert old.name in set(s.scalars(select(IngestedObject.key)))
    with pytest.raises(WebstatsError, match="--since"):
        ingest.run(settings, source=str(out), since="March")


def test_objects_of_the_day_still_running_wait_for_the_next_run(db_url, tmp_path, monkeypatch):
    """A run takes the names of complete UTC days only (a run at 01:00 would otherwise
    publish an hour of today, "Data as of" today, and a Last-Modified before ValidThru + 1
    day); the next day's run takes them through its look-back, and the whole equals the
    truth."""
    out = tmp_path / "logs"
    truth = loggen.generate(out, days=3, start=dt.date(2024, 3, 10), files_per_day=2)
    settings = loaded(db_url, tmp_path)
    monkeypatch.setattr(db, "last_complete_day", lambda: dt.date(2024, 3, 11))
    assert ingest.run(settings, source=str(out))
    with db.session_factory(db_url)() as s:
        days = {o.name_hour.date() for o in s.scalars(select(IngestedObject))}
    assert days <= {dt.date(2024, 3, 10), dt.date(2024, 3, 11)}
    first = len(snapshot(db_url)[1])  # (one of the 11th's holds a line of the 12th: it waits)
    assert first >= 3
    # an explicit --until past the last complete day is held to it too
    assert ingest.run(settings, source=str(out), until="2024-03-12")
    assert len(snapshot(db_url)[1]) == first
    # (the 12th's objects hold lines of the 13th, the generator's late lines)
    monkeypatch.setattr(db, "last_complete_day", lambda: dt.date(2024, 3, 13))
    assert ingest.run(settings, source=str(out))
    assert len(snapshot(db_url)[1]) == 6
    assert_truth(db_url, truth)


def test_downloads_of_a_day_not_over_wait_with_their_object(db_url, tmp_path, monkeypatch, caplog):
    """A line after midnight in one of yesterday's objects (the ETL takes lines up to 48 h
    off their object's hour) was stored at once while ValidThru stayed at yesterday: on the
    1st of a month the new month (and on Jan 1 the new year) showed downloads after "Data as
    of". The object now waits for the next run, which takes it, that day over; nothing is
    lost, and ValidThru is the latest record's day."""
    out = tmp_path / "logs"
    out.mkdir()
    (out / f"{loggen.DIST}.2024-03-31-05.a.gz").write_bytes(
        loggen.log_bytes(loggen.log_line(date="2024-03-31", time="05:00:00"))
    )
    lines = [
        loggen.log_line(date="2024-03-31", time="23:50:00", ip="10.8.8.8"),
        loggen.log_line(date="2024-04-01", time="00:10:00", ip="10.9.9.9"),
    ]
    late = f"{loggen.DIST}.2024-03-31-23.b.gz"
    (out / late).write_bytes(loggen.log_bytes(*lines))
    settings = loaded(db_url, tmp_path)
    monkeypatch.setattr(db, "last_complete_day", lambda: dt.date(2024, 3, 31))
    caplog.set_level(logging.INFO)
    assert ingest.run(settings, source=str(out))
    assert f"{late}: holds downloads of 2024-04-01, a day not over yet" in caplog.text
    summary = caplog.records[-1].getMessage()  # the last line is the summary, as before
    assert summary.startswith("etl run: 1 objects ingested, 0 failed"), summary
    assert (
        "1 objects held back: they hold downloads of a day not over yet (after 2024-03-31), "
        "read by the next run"
    ) in caplog.text
    with db.session_factory(db_url)() as s:
        assert db.get_valid_thru(s) == dt.date(2024, 3, 31)
        assert set(s.scalars(select(DownloadRecord.day))) == {dt.date(2024, 3, 31)}
        assert late not in set(s.scalars(select(IngestedObject.key)))
    pkg, _ = stats_tables(db_url)
    assert [k for k in pkg if k[2:] == (2024, 4)] == []  # April: nothing after ValidThru
    # the next day's run takes it through its look-back
    monkeypatch.setattr(db, "last_complete_day", lambda: dt.date(2024, 4, 1))
    assert ingest.run(settings, source=str(out))
    with db.session_factory(db_url)() as s:
        assert db.get_valid_thru(s) == dt.date(2024, 4, 1)
        assert late in set(s.scalars(select(IngestedObject.key)))
        assert sum(s.scalars(select(DownloadRecord.downloads))) == 3
    pkg, _ = stats_tables(db_url)
    assert [v[1] for k, v in pkg.items() if k[2:] == (2024, 4)] == [1]
    assert [v[1] for k, v in pkg.items() if k[2:] == (2024, 3)] == [2]


def test_a_backfill_slice_does_not_hold_its_last_objects(db_url, tmp_path, monkeypatch):
    """An --until before the last complete day stores the lines after it (a gap filled in
    the past is behind the daily run's look-back: held, they would never be read)."""
    out = tmp_path / "logs"
    out.mkdir()
    lines = [
        loggen.log_line(date="2024-03-11", time="23:50:00"),
        loggen.log_line(date="2024-03-12", time="00:10:00", ip="10.9.9.9"),
    ]
    (out / f"{loggen.DIST}.2024-03-11-23.a.gz").write_bytes(loggen.log_bytes(*lines))
    settings = loaded(db_url, tmp_path)
    monkeypatch.setattr(db, "last_complete_day", lambda: dt.date(2024, 6, 1))
    assert ingest.run(settings, source=str(out), since="2024-03-11", until="2024-03-11")
    with db.session_factory(db_url)() as s:
        assert db.get_valid_thru(s) == dt.date(2024, 3, 11)  # the slice's end
        days = set(s.scalars(select(DownloadRecord.day)))
    assert days == {dt.date(2024, 3, 11), dt.date(2024, 3, 12)}  # nothing lost


def _day_objects(out: Path, day: dt.date, bad: bool = False) -> tuple[Path, bytes]:
    """One object of ``day`` (``bad``: cut short); its path and its whole bytes."""
    name = "bad" if bad else "good"
    path = out / f"{loggen.DIST}.{day}-{6 if bad else 5:02d}.{name}.gz"
    whole = loggen.log_bytes(loggen.log_line(date=day.isoformat(), time="05:00:00"))
    path.write_bytes(whole[:-12] if bad else whole)
    return path, whole


def _daily_runs(monkeypatch, settings, out: Path, days: Iterable[dt.date], ok: bool) -> None:
    """For each day: one good object of it, then the daily run that day; each returns ``ok``."""
    for day in days:
        _day_objects(out, day)
        monkeypatch.setattr(db, "last_complete_day", lambda d=day: d)
        assert ingest.run(settings, source=str(out)) is ok, day


def _days(start: dt.date, n: int) -> list[dt.date]:
    return [start + dt.timedelta(days=i) for i in range(n)]


def test_an_object_that_failed_is_retried_after_its_look_back(db_url, tmp_path, monkeypatch):
    """A corrupt object was retried only while its name was inside the look-back: after
    three days the runs went back to exit 0 and its downloads were never counted. Every run
    now lists back to the oldest failed object until it is read; a backfill slice elsewhere
    keeps it."""
    out = tmp_path / "logs"
    out.mkdir()
    start = dt.date(2024, 3, 10)
    bad, whole = _day_objects(out, start, bad=True)
    settings = loaded(db_url, tmp_path)
    _daily_runs(monkeypatch, settings, out, _days(start, 8), ok=False)
    with db.session_factory(db_url)() as s:
        assert db.get_retry_from(s) == start
    # a backfill slice before it neither reads it nor forgets it
    assert ingest.run(settings, source=str(out), since="2024-03-01", until="2024-03-05")
    with db.session_factory(db_url)() as s:
        assert db.get_retry_from(s) == start
    bad.write_bytes(whole)  # a good copy put in its place
    assert ingest.run(settings, source=str(out)) is True
    with db.session_factory(db_url)() as s:
        assert db.get_retry_from(s) is None
        assert bad.name in set(s.scalars(select(IngestedObject.key)))
        assert sum(s.scalars(select(DownloadRecord.downloads))) == 9


def test_a_slice_that_reads_the_oldest_failure_keeps_the_later_ones(db_url, tmp_path, monkeypatch):
    """Two failed objects (the 10th's, the 12th's); the first repaired and read again by a
    slice of its day: retry_from was cleared, the 12th's fell out of every window and the
    runs exited 0 without it."""
    out = tmp_path / "logs"
    out.mkdir()
    start = dt.date(2024, 3, 10)
    first, whole = _day_objects(out, start, bad=True)
    _day_objects(out, start + dt.timedelta(days=2), bad=True)
    settings = loaded(db_url, tmp_path)
    _daily_runs(monkeypatch, settings, out, _days(start, 10), ok=False)
    first.write_bytes(whole)
    assert ingest.run(settings, source=str(out), since=str(start), until=str(start))
    later = _days(start + dt.timedelta(days=10), 4)
    _daily_runs(monkeypatch, settings, out, later, ok=False)  # the 12th's, still
    with db.session_factory(db_url)() as s:
        assert db.get_retry_from(s) == start + dt.timedelta(days=2)
        assert first.name in set(s.scalars(select(IngestedObject.key)))


def test_an_unreadable_day_folder_is_retried_after_its_look_back(db_url, tmp_path, monkeypatch):
    """A `YYYY-MM-DD` folder that cannot be read fails the run; once outside the window it
    was not opened, so nothing named it again and the runs exited 0 without its objects."""
    out = tmp_path / "logs"
    start = dt.date(2024, 3, 10)
    for n in range(8):
        day = start + dt.timedelta(days=n)
        (out / str(day)).mkdir(parents=True)
        _day_objects(out / str(day), day)
    blocked = str(out / str(start + dt.timedelta(days=1)))
    real = os.scandir

    def scandir(path):
        if str(path) == blocked:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    settings = loaded(db_url, tmp_path)
    results = []
    for n in range(8):
        day = start + dt.timedelta(days=n)
        monkeypatch.setattr(db, "last_complete_day", lambda d=day: d)
        results.append(ingest.run(settings, source=str(out)))
    assert results == [True] + [False] * 7  # (the 10th's run lists no 11th yet)
    monkeypatch.setattr(os, "scandir", real)  # its mode fixed
    assert ingest.run(settings, source=str(out)) is True
    with db.session_factory(db_url)() as s:
        assert db.get_retry_from(s) is None
        keys = list(s.scalars(select(IngestedObject.key)))
    assert any(str(start + dt.timedelta(days=1)) in k for k in keys)


def test_a_failure_before_a_later_cutover_day_is_forgotten(db_url, tmp_path, monkeypatch):
    """The cut-over day moved past a failed object: nothing there counts any more, and its
    retry_from kept every run listing from the cut-over day, for ever."""
    out = tmp_path / "logs"
    out.mkdir()
    start = dt.date(2024, 3, 10)
    _day_objects(out, start, bad=True)
    settings = loaded(db_url, tmp_path)
    _daily_runs(monkeypatch, settings, out, _days(start, 3), ok=False)
    monkeypatch.setattr(ingest, "logs_since", lambda _s: dt.date(2024, 3, 20))
    _daily_runs(monkeypatch, settings, out, _days(dt.date(2024, 6, 1), 2), ok=True)
    with db.session_factory(db_url)() as s:
        assert db.get_retry_from(s) is None


def test_the_last_complete_day_is_yesterday_utc():
    now = dt.datetime.now(dt.UTC)
    assert db.last_complete_day() in {
        (now + dt.timedelta(seconds=s)).date() - dt.timedelta(days=1) for s in (0, 5)
    }


def test_reingest_replaces(db_url, tmp_path, data):
    out, truth = data
    settings = loaded(db_url, tmp_path)
    assert ingest.run(settings, source=str(out))
    before = snapshot(db_url)
    ingest.reingest(settings, truth.files[:3], source=str(out))
    after = snapshot(db_url)
    assert after[:3] == before[:3]  # stats, ledger counts, records: no double counting
    assert int(after[3]["data_version"]) > int(before[3]["data_version"])
    assert_truth(db_url, truth)
    with pytest.raises(WebstatsError):
        ingest.reingest(settings, ["E1.2024-01-01-00.nothere.gz"], source=str(out))


def test_reingest_of_object_not_in_ledger_fails_cleanly(db_url, tmp_path, data):
    out, truth = data
    settings = loaded(db_url, tmp_path)
    with pytest.raises(WebstatsError, match="1 objects failed"):
        ingest.reingest(settings, truth.files[:1], source=str(out))
    assert snapshot(db_url)[1] == []


def test_bad_input(db_url, tmp_path, caplog):
    out = tmp_path / "logs"
    truth = loggen.generate(out, days=1, start=dt.date(2024, 5, 1), files_per_day=3)
    good = loggen.log_bytes(loggen.log_line(date="2024-05-01", time="07:00:00"))
    bad = {
        f"{loggen.DIST}.2024-05-01-07.truncated.gz": good[:-10],
        f"{loggen.DIST}.2024-05-01-08.notgzip.gz": b"date time\n2024-05-01 08:00:00\n",
        f"{loggen.DIST}.2024-05-01-09.empty.gz": b"",
        f"{loggen.DIST}.2024-05-01-10.headerless.gz": gzip.compress(
            (loggen.log_line(date="2024-05-01", time="10:00:00") + "\n").encode()
        ),
        f"{loggen.DIST}.2024-05-01-11.garbage.gz": gzip.compress(b"\x00garbage\nmore\tjunk\n"),
        # too short for zlib to check the header: not "truncated gzip"
        f"{loggen.DIST}.2024-05-01-13.short.gz": b"hello\n",
    }
    for name, content in bad.items():
        (out / name).write_bytes(content)
    # a gzip object of no line, or of headers only: empty, not bad (no data line came before
    # a #Fields line); it failed every run, and now every run until it was gone
    empties = {f"{loggen.DIST}.2024-05-01-14.{name}.gz": gzip.compress(body)
               for name, body in (("nothing", b""), ("version", b"#Version: 1.0\n\n"))}  # fmt: skip
    for name, content in empties.items():
        (out / name).write_bytes(content)
    # garbage lines after a valid header: the file is fine, its lines are rejected
    (out / f"{loggen.DIST}.2024-05-01-12.junklines.gz").write_bytes(
        loggen.log_bytes("junk", "more\tjunk", "2024-05-01\tnot a time")
    )
    settings = loaded(db_url, tmp_path)
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert ingest.run(settings, source=str(out)) is False
    assert_truth(db_url, truth)  # the good files are in, nothing of the bad ones
    with db.session_factory(db_url)() as s:
        keys = set(s.scalars(select(IngestedObject.key)))
        junk = s.scalar(select(IngestedObject).where(IngestedObject.key.like("%junklines%")))
        assert (junk.lines_read, junk.rejected, junk.accepted) == (3, 3, 0)
    assert keys == {*truth.files, junk.key, *empties}
    messages = {r.getMessage() for r in caplog.records if r.levelno == logging.ERROR}
    for name, why in [
        ("truncated", "truncated gzip"),
        ("notgzip", "not a valid gzip"),
        ("empty", "empty file"),
        ("headerless", "no #Fields line before the first data line"),
        ("garbage", "no #Fields"),
        ("short", "not a gzip file (6 bytes, no gzip header)"),
    ]:
        assert any(name in m and why in m and "will be retried" in m for m in messages), name
    assert "3 of 3 lines rejected" in caplog.text
    assert "6 failed" in caplog.text
    # Retried next time, still failing, nothing changes; once repaired, it goes in.
    before = snapshot(db_url)
    assert ingest.run(settings, source=str(out)) is False
    assert snapshot(db_url) == before
    for name in bad:
        (out / name).unlink()
    assert ingest.run(settings, source=str(out)) is True


def test_bad_input_cli_exit_status(db_url, tmp_path, monkeypatch, capsys):
    from bioc_webstats import cli

    out = tmp_path / "logs"
    out.mkdir()
    (out / f"{loggen.DIST}.2024-05-01-07.bad.gz").write_bytes(b"nope")
    for k, v in {
        "WEBSTATS_DATABASE_URL": db_url,
        "WEBSTATS_STATE_DIR": str(tmp_path / "state"),
        "WEBSTATS_ENV_FILE": "/dev/null",
        "WEBSTATS_IP_HASH_KEY": "k",
    }.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exc:
        cli.main(["etl", "run", "--source", str(out)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "some objects failed" in err and "Traceback" not in err


def test_dry_run_writes_nothing(db_url, tmp_path, data, caplog):
    out, truth = data
    settings = loaded(db_url, tmp_path)
    before = snapshot(db_url)
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert ingest.run(settings, source=str(out), dry_run=True)
    assert snapshot(db_url) == before
    assert f"{len(truth.files)} to ingest" in caplog.text
    assert f"would ingest {truth.files[0]}" in caplog.text
    assert f"etl run --dry-run: {len(truth.files)} objects to ingest, 0 failed" in caplog.text
    assert caplog.text.rstrip().endswith("s)") and "ValidThru -," in caplog.text  # none yet
    # after a run: the ValidThru there is (it said '-')
    caplog.clear()
    assert ingest.run(settings, source=str(out))
    valid_thru = re.search(r"etl run: .* ValidThru (\S+),", caplog.text)[1]
    assert valid_thru != "-"
    caplog.clear()
    assert ingest.run(settings, source=str(out), dry_run=True)
    assert f"ValidThru {valid_thru}," in caplog.text.split("etl run --dry-run:")[-1]


def test_an_unreadable_folder_fails_the_run_not_the_others(db_url, tmp_path, caplog, monkeypatch):
    """A folder of the source that cannot be listed: one line, the other files ingested,
    the run fails at its end (the next run reads the folder once it can)."""
    import shutil

    from bioc_webstats.etl import sources

    out = tmp_path / "logs"
    truth = loggen.generate(out, days=2, files_per_day=2, lines_per_file=50)
    (out / "locked").mkdir()
    later = truth.files[-1:]
    for name in later:
        shutil.move(out / name, out / "locked" / name)
    real = sources.os.scandir

    def scandir(path):
        if str(path).endswith("/locked"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(sources.os, "scandir", scandir)
    settings = loaded(db_url, tmp_path)
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert ingest.run(settings, source=str(out)) is False
    assert f"log source {out / 'locked'}: Permission denied; its files are not read" in caplog.text
    assert f"{len(truth.files) - len(later)} objects ingested, 1 failed" in caplog.text
    monkeypatch.setattr(sources.os, "scandir", real)
    assert ingest.run(settings, source=str(out))  # readable again: the rest comes in
    assert_truth(db_url, truth)


def test_a_log_name_on_no_file_fails_the_run_and_other_entries_are_listed(db_url, tmp_path, caplog):
    """A log object's name on a broken symlink was dropped without a word (its downloads
    missing, the run green); a FIFO or a broken link under another name was not listed."""
    out = tmp_path / "logs"
    truth = loggen.generate(out, days=1, files_per_day=2, lines_per_file=50)
    day = truth.files[0].split(".")[1][:10]
    (out / f"E1TVLJONPTUXV3.{day}-05.broken.gz").symlink_to(tmp_path / "gone.gz")
    (out / "notes.link").symlink_to(tmp_path / "gone.txt")
    os.mkfifo(out / "a.fifo")
    settings = loaded(db_url, tmp_path)
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert ingest.run(settings, source=str(out)) is False
    assert (
        f"log source {out}: E1TVLJONPTUXV3.{day}-05.broken.gz is not a file (a broken"
        " symlink?); not read" in caplog.text
    )
    assert f"{len(truth.files)} objects ingested, 1 failed" in caplog.text
    assert_truth(db_url, truth)
    objects, skipped = sources.DirSource(out).list()
    assert [o.key for o in objects] == sorted(truth.files)
    assert skipped == ["a.fifo", "notes.link"]


def test_a_symlink_loop_fails_the_run_not_the_other_entries(db_url, tmp_path, caplog):
    """An entry whose kind cannot be told (a link to itself) is named and fails the run at
    its end; it stopped the whole run at the top of the source, and below it dropped the
    entries after it in directory order without naming them."""
    import shutil

    out = tmp_path / "logs"
    truth = loggen.generate(out, days=2, files_per_day=3, lines_per_file=50)
    (out / "sub").mkdir()
    for name in truth.files[::2]:
        shutil.move(out / name, out / "sub" / name)
    (out / "README.txt").symlink_to("README.txt")
    (out / "sub" / "loop").symlink_to("loop")
    settings = loaded(db_url, tmp_path)
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert ingest.run(settings, source=str(out)) is False
    assert f"log source {out}: README.txt: Too many levels of symbolic links; not read" in (
        caplog.text
    )
    assert f"log source {out / 'sub'}: loop: Too many levels of symbolic links" in caplog.text
    assert f"{len(truth.files)} objects ingested, 2 failed" in caplog.text
    assert_truth(db_url, truth)
    objects, _ = sources.DirSource(out).list()
    assert len(objects) == len(truth.files)


def test_names_that_are_not_utf8_fail_alone(db_url, tmp_path, caplog):
    """A folder (and a file) whose name is not UTF-8: one line, the rest ingested, the run
    fails at its end (it stopped at once with a UnicodeEncodeError traceback)."""
    import shutil

    out = tmp_path / "logs"
    truth = loggen.generate(out, days=2, files_per_day=2, lines_per_file=50)
    odd = os.fsencode(out) + b"/sub\xff"
    os.mkdir(odd)
    later = truth.files[-1]
    shutil.move(out / later, os.fsdecode(odd + b"/" + os.fsencode(later)))
    (Path(os.fsdecode(os.fsencode(out) + b"/notes\xfe.txt"))).write_text("x\n")
    settings = loaded(db_url, tmp_path)
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert ingest.run(settings, source=str(out)) is False
    assert f"log source {out}: sub\ufffd: name not UTF-8, not read" in caplog.text
    assert f"{len(truth.files) - 1} objects ingested, 1 failed" in caplog.text
    shutil.move(os.fsdecode(odd + b"/" + os.fsencode(later)), out / later)  # renamed
    assert ingest.run(settings, source=str(out)) is False  # the odd folder is still there
    os.rmdir(odd)
    assert ingest.run(settings, source=str(out))
    assert_truth(db_url, truth)


def test_reingest_takes_keys_relative_to_the_source(data):
    """`etl reingest` of an absolute path (even one outside the source) is refused by name."""
    from bioc_webstats.etl import sources

    out, truth = data

    with pytest.raises(WebstatsError) as exc:
        sources.DirSource(out).get(str(out / truth.files[0]))
    assert str(exc.value) == f"{out / truth.files[0]}: a key is relative to the log source {out}"


def test_ctrl_c_stops_the_run_in_one_line(db_url, tmp_path):
    """Ctrl-C (SIGINT to the process group) while workers parse: 'aborted', exit 1, no
    traceback from any worker; the next run ingests everything."""
    import signal
    import subprocess
    import sys
    import threading

    from conftest import wait_for

    settings = loaded(db_url, tmp_path)
    out = tmp_path / "logs"
    truth = loggen.generate(out, days=3, files_per_day=8, lines_per_file=20000)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBSTATS_")}
    env.update(
        WEBSTATS_DATABASE_URL=db_url, WEBSTATS_STATE_DIR=str(settings.state_dir),
        WEBSTATS_ENV_FILE="/dev/null", WEBSTATS_IP_HASH_KEY="test-key", WEBSTATS_ETL_WORKERS="2",
        # the run holds after its second object, the workers parsing ahead: the signal always
        # comes mid-run (the run could be over before it)
        WEBSTATS_TEST_PAUSE_AT="object_committed:2",
        WEBSTATS_TEST_PAUSE_FILE=str(tmp_path / "paused"),
    )  # fmt: skip
    exe = str(Path(sys.executable).parent / "bioc-webstats")
    proc = subprocess.Popen(
        [exe, "etl", "run", "--source", str(out)], env=env, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=interruptible,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        wait_for(lambda: (tmp_path / "paused").exists(), 120, what="the run to hold mid-way")
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    reader.join(10)
    err = "".join(lines)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.rstrip().endswith("aborted"), err[-500:]
    assert ingest.run(settings, source=str(out))
    assert_truth(db_url, truth)


def test_packages_table_change_recomputes_those_packages(db_url, tmp_path, data):
    out, truth = data
    settings = make_settings(db_url, tmp_path)
    rows = SAMPLE.read_text().splitlines()
    held_back = [r for r in rows[1:] if r.split(",")[1] == "bioc"][:15]
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join(r for r in rows if r not in held_back) + "\n")
    packages.load_csv(settings, partial)
    assert ingest.run(settings, source=str(out))
    pkg, cat = stats_tables(db_url)
    missing = {r.split(",")[0] for r in held_back}
    assert not any(k[1] in missing and k[0] == "bioc" for k in pkg)
    assert cat != truth.category  # totals are over known packages only
    with db.session_factory(db_url)() as s:
        version = db.get_data_version(s)
    packages.load_csv(settings, SAMPLE)  # adds them: their months and the totals follow
    assert_truth(db_url, truth)
    with db.session_factory(db_url)() as s:
        assert db.get_data_version(s) > version


def test_rebuild_restores_everything(db_url, tmp_path, data):
    out, truth = data
    settings = loaded(db_url, tmp_path)
    assert ingest.run(settings, source=str(out))
    with db.session_factory(db_url).begin() as s:
        s.execute(update(PackageStat).values(ips=0))
        s.execute(update(CategoryStat).values(downloads=1))
    message = stats.rebuild(settings)
    assert "stats rebuild:" in message
    assert_truth(db_url, truth)


def test_valid_thru_never_moves_backwards(db_url, tmp_path):
    out = tmp_path / "logs"
    out.mkdir()
    f = late_file(out, dt.datetime(2024, 6, 10, 3), 5)
    settings = loaded(db_url, tmp_path)
    with db.session_factory(db_url).begin() as s:
        db.advance_valid_thru(s, dt.date(2024, 7, 1))
    assert ingest.run(settings, source=str(out))
    with db.session_factory(db_url)() as s:
        assert db.get_valid_thru(s) == dt.date(2024, 7, 1)
    ingest.reingest(settings, [f.name], source=str(out))
    with db.session_factory(db_url)() as s:
        assert db.get_valid_thru(s) == dt.date(2024, 7, 1)


def test_generated_ip_key_is_private_and_stable(tmp_path):
    settings = load_settings(
        {"WEBSTATS_STATE_DIR": str(tmp_path / "state"), "WEBSTATS_ENV_FILE": "/dev/null"}
    )
    k1 = ingest.ip_hash_key(settings, str(tmp_path))
    k2 = ingest.ip_hash_key(settings, str(tmp_path))
    assert k1 == k2 and len(k1) >= 32
    assert (tmp_path / "state" / "ip_hash.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(WebstatsError, match="ip_hash_key"):
        ingest.ip_hash_key(settings, "s3://bucket/prefix")


def test_progress_bar_on_a_terminal_and_lines_in_the_journal(capsys, caplog, monkeypatch):
    bar = ingest.Progress(objects=2, total_bytes=200, tty=True)
    bar.update(100, 1000)
    bar.last = 0  # the bar redraws at most 5 times a second
    bar.update(100, 1000)
    err = capsys.readouterr().err
    assert "\r[" in err and "objects 2/2" in err and "lines 2,000/~2,000" in err
    assert "lines/s" in err and "ETA" in err and err.endswith("\n")
    monkeypatch.setattr(ingest, "PROGRESS_EVERY", 0.0)
    caplog.set_level(logging.INFO, "bioc_webstats")
    journal = ingest.Progress(objects=4, total_bytes=400, tty=False)
    journal.update(100, 10)
    assert "progress: " in caplog.text and "objects 1/4" in caplog.text
    assert "\r" not in capsys.readouterr().err


def test_a_source_that_is_no_directory_is_named_as_given():
    with pytest.raises(WebstatsError) as exc:  # a Path would print http:/example.com
        sources.open_source("http://example.com/")
    assert str(exc.value) == "log source http://example.com/: not a directory nor an s3:// URL"


def test_cli_bad_since_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from bioc_webstats import cli

    monkeypatch.setenv("WEBSTATS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("WEBSTATS_ENV_FILE", "/dev/null")
    with pytest.raises(SystemExit) as exc:
        cli.main(["etl", "run", "--source", str(tmp_path), "--since", "yesterday"])
    assert exc.value.code == 2
    assert "not a date YYYY-MM-DD" in capsys.readouterr().err


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WEBSTATS_ETL_LOOKBACK_DAYS": "99999999"}, "etl/lookback_days must be at most 3660"),
        # an object held back for a day not over is listed again by the next run
        ({"WEBSTATS_ETL_LOOKBACK_DAYS": "1"}, "etl/lookback_days must be at least 2"),
        ({"WEBSTATS_ETL_LOGS_SINCE": "0001-01-01"}, "etl/logs_since must be a date YYYY-MM-DD"),
        ({"WEBSTATS_ETL_WORKERS": "100000"}, "etl/workers must be at most 64"),
    ],
)
def test_settings_far_out_of_range_are_one_line(db_url, tmp_path, env, message):
    """Values that overflowed the window's date arithmetic (a traceback) or forked a process
    per unit of a huge count are refused in one line naming the parameter."""
    import subprocess
    import sys

    loaded(db_url, tmp_path)
    out = tmp_path / "logs"
    loggen.generate(out, days=1, files_per_day=2, lines_per_file=20)
    base = {k: v for k, v in os.environ.items() if not k.startswith("WEBSTATS_")}
    base.update(
        WEBSTATS_DATABASE_URL=db_url, WEBSTATS_STATE_DIR=str(tmp_path / "state"),
        WEBSTATS_ENV_FILE="/dev/null", WEBSTATS_IP_HASH_KEY="test-key", **env,
    )  # fmt: skip
    exe = str(Path(sys.executable).parent / "bioc-webstats")
    res = subprocess.run([exe, "etl", "run", "--source", str(out)], env=base,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]  # after the run's own log lines, if any
    assert line.startswith("bioc-webstats: error: ") and message in line, res.stderr


@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        # a full disk (a statement timeout is the same): a 40-line traceback
        ("RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full'",
         "database: could not extend file"),
        # the connection dropped (an RDS restart or failover): the failed rollback's
        # "connection already closed" was said instead of why
        ("PERFORM pg_terminate_backend(pg_backend_pid())",
         "database: server closed the connection unexpectedly"),
    ],
)  # fmt: skip
def test_a_database_error_inside_the_records_copy_is_one_line(
    pg_server, tmp_path, trigger, message
):
    """The records' COPY runs on the driver's own cursor: its errors are psycopg2's, which
    nothing took for a database error. One line that says why; nothing is stored."""
    import subprocess
    import sys

    import sqlalchemy as sa

    from conftest import new_pg_database

    url = new_pg_database(pg_server)
    db.upgrade(url)
    loaded(url, tmp_path)
    out = tmp_path / "logs"
    loggen.generate(out, days=1, files_per_day=2, lines_per_file=50)
    failing = sa.text(
        "CREATE FUNCTION failing() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"{trigger}; RETURN NEW; END $$; "
        "CREATE TRIGGER failing BEFORE INSERT ON download_records "
        "FOR EACH ROW EXECUTE FUNCTION failing()"
    )
    with sa.create_engine(url).begin() as c:
        c.execute(failing)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBSTATS_")}
    env.update(
        WEBSTATS_DATABASE_URL=url, WEBSTATS_STATE_DIR=str(tmp_path / "state"),
        WEBSTATS_ENV_FILE="/dev/null", WEBSTATS_IP_HASH_KEY="test-key",
        WEBSTATS_ETL_LOGS_SINCE="2009-01-01", WEBSTATS_ETL_WORKERS="1",
    )  # fmt: skip
    exe = str(Path(sys.executable).parent / "bioc-webstats")
    res = subprocess.run([exe, "etl", "run", "--source", str(out)], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    *logged, line = res.stderr.strip().splitlines()
    assert line.startswith(f"bioc-webstats: error: {message}"), res.stderr
    # the run's log lines, and no exception dump before the line (psycopg2 printed one)
    assert all(ln.startswith(("INFO ", "WARNING ", "ERROR ")) for ln in logged), res.stderr
    with db.session_factory(url)() as s:
        assert s.scalar(select(func.count()).select_from(IngestedObject)) == 0


def test_a_second_writer_stops_at_once_and_names_the_holder(db_url, tmp_path):
    """Two `etl run` at once: the second one does no work and says who holds the lock."""
    import subprocess
    import sys

    settings = loaded(db_url, tmp_path)
    out = tmp_path / "logs"
    loggen.generate(out, days=1, files_per_day=2, lines_per_file=50)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBSTATS_")}
    env.update(
        WEBSTATS_DATABASE_URL=db_url,
        WEBSTATS_STATE_DIR=str(settings.state_dir),
        WEBSTATS_ENV_FILE="/dev/null",
        WEBSTATS_IP_HASH_KEY="test-key",
        WEBSTATS_TEST_PAUSE_AT="before_recompute",
        WEBSTATS_TEST_PAUSE_FILE=str(tmp_path / "paused"),
    )
    exe = str(Path(sys.executable).parent / "bioc-webstats")
    first = subprocess.Popen([exe, "etl", "run", "--source", str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: (tmp_path / "paused").exists(), 120, what="the first run to pause")
        env.pop("WEBSTATS_TEST_PAUSE_AT")
        for args in (["etl", "run", "--source", str(out)], ["stats", "rebuild"]):
            second = subprocess.run([exe, *args], env=env, capture_output=True, text=True,
                                    timeout=120)  # fmt: skip
            assert second.returncode == 1
            [line] = second.stderr.splitlines()
            assert f"'etl run' (pid {first.pid}, since " in line and "holds" in line, line
    finally:
        first.kill()
        first.wait(30)
    done = subprocess.run([exe, "etl", "run", "--source", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr  # the lock died with its holder


def test_no_log_source_names_the_parameter(db_url, tmp_path, monkeypatch):
    monkeypatch.delenv("WEBSTATS_LOG_SOURCE", raising=False)
    settings = loaded(db_url, tmp_path)
    with pytest.raises(WebstatsError) as exc:
        ingest.run(settings)
    assert str(exc.value) == (
        "no log source: etl/s3_download_logs (WEBSTATS_LOG_SOURCE) is not set; set it, "
        "or give --source"
    )


def test_sqlite_stores_an_object_s_records_in_bounded_memory(tmp_path):
    """SQLite has no COPY: the records were decoded into a list of every row as a dict (ten
    times the COPY data: 3 GB for an object of 2 M distinct clients). Now in batches."""
    import tracemalloc

    from bioc_webstats.store import records

    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    db.upgrade(url)
    rows = [("bioc", "limma", dt.date(2024, 1, 30), i, 1) for i in range(200_000)]
    data = parse.with_object_id(records.text_rows(rows), "text", 7)
    del rows
    tracemalloc.start()
    try:
        with db.session_factory(url).begin() as session:
            records.write(session, data, "text")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 << 20, peak  # a batch's worth (16 MB); the list of every row: 343 MB
    with db.session_factory(url)() as session:
        assert session.scalar(select(func.sum(DownloadRecord.downloads))) == 200_000


@pytest.mark.parametrize("parser", ["native", "python"])
def test_objects_past_the_memory_bound_are_stored_through_spool_files(
    db_url, tmp_path, data, monkeypatch, parser
):
    """Records spilled past parse's bound, and results over INLINE_MAX, go from the parse
    workers through files of the run's spool directory: the statistics are the truth, a
    re-ingest replaces them, and no file is left."""
    out, truth = data
    monkeypatch.setattr(parse, "_FORCE_PYTHON", parser == "python")  # forked workers inherit it
    monkeypatch.setattr(sources, "OUT_MAX", 4096)
    monkeypatch.setattr(parse, "SPILL_BYTES", 2048)
    monkeypatch.setattr(parse, "HITS_MAX", 4)
    monkeypatch.setattr(ingest, "INLINE_MAX", 512)
    spool_root = tmp_path / "tmp"
    spool_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_root))
    read = []
    parts = ingest.spool_parts
    monkeypatch.setattr(ingest, "spool_parts", lambda path: read.append(path) or parts(path))
    settings = loaded(db_url, tmp_path, WEBSTATS_ETL_WORKERS="2")
    assert ingest.run(settings, source=str(out)) is True
    assert len(read) == len(truth.files)  # every object had a spool file
    assert_truth(db_url, truth)
    ingest.reingest(settings, truth.files[:4], source=str(out))
    assert len(read) == len(truth.files) + 4
    assert_truth(db_url, truth)
    assert list(spool_root.iterdir()) == []


def test_counting_a_day_of_many_unknown_names_holds_no_row_per_name(db_url, tmp_path, monkeypatch):
    """100,000 distinct unknown package names in a day: record_months gets a row each, and the
    counting takes back one row per year (a hostile day's million names took 600 MB)."""
    import tracemalloc

    out = tmp_path / "logs"
    out.mkdir()
    uri = "/packages/3.18/bioc/src/contrib/P{:07d}x_1.0.tar.gz"
    lines = [loggen.log_line(uri=uri.format(i)) for i in range(100_000)]
    (out / "E1.2024-01-30-12.many.gz").write_bytes(loggen.log_bytes(*lines))
    peaks = []
    real = stats.apply_pending

    def measured(session, *args):
        tracemalloc.start()
        try:
            return real(session, *args)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    monkeypatch.setattr(stats, "apply_pending", measured)
    settings = loaded(db_url, tmp_path, WEBSTATS_ETL_WORKERS="1")
    assert ingest.run(settings, source=str(out)) is True
    with db.session_factory(db_url)() as s:
        assert s.scalar(select(func.count()).select_from(RecordMonth)) == 100_000
        assert db.get_valid_thru(s) == dt.date(2024, 1, 30)
    assert peaks and max(peaks) < 4 << 20, peaks


def test_a_spool_file_that_cannot_be_written_or_read_back_fails_its_object_alone(
    db_url, tmp_path, data, monkeypatch, caplog
):
    """No spool directory (a full disk is the same path), or a spool file cut short: that
    object fails with one line and is not in the ledger; no traceback, the others stored."""
    out, _ = data
    monkeypatch.setattr(ingest, "INLINE_MAX", 0)  # every object's records through a file
    objs, _ = sources.open_source(str(out)).list()
    gone = tmp_path / "gone"
    ingest._init_worker(str(out), b"k", child=False, spool_dir=str(gone))
    failed = ingest._parse(objs[0])
    assert failed.error == f"cannot spool its records in {gone}: No such file or directory"
    assert failed.spool is None
    ingest._init_worker(str(out), b"k", child=False, spool_dir=str(tmp_path))
    cut, whole = ingest._parse(objs[1]), ingest._parse(objs[2])
    assert cut.error is None and cut.spool and whole.spool
    os.truncate(cut.spool, os.path.getsize(cut.spool) - 1)
    settings = loaded(db_url, tmp_path)
    summary = ingest.RunSummary()
    progress = ingest.Progress(3, 3, tty=False)
    with caplog.at_level(logging.ERROR):
        ingest.store_all(settings, [failed, cut, whole], summary, ingest.store_new, progress)
    assert (summary.objects, summary.failed) == (1, 2)
    assert f"{objs[1].key}: spool file {cut.spool} cut short" in caplog.text
    assert not os.path.exists(cut.spool) and not os.path.exists(whole.spool)
    with db.session_factory(db_url)() as s:
        assert list(s.scalars(select(IngestedObject.key))) == [objs[2].key]


def test_one_log_object_under_two_names_is_counted_once(db_url, tmp_path, caplog):
    """A CloudFront object is its name: a copy in another folder (the same name) and a link to
    it (another name, one file) were each ingested again, their downloads counted twice. Once
    in one run, and once when the other name appears in a later run."""
    import shutil

    out = tmp_path / "logs"
    truth = loggen.generate(out, days=2, files_per_day=3, lines_per_file=50)
    first, second, third = (out / name for name in truth.files[:3])
    (out / "copies").mkdir()
    shutil.copy(first, out / "copies" / first.name)  # the same name in another folder
    # a link whose name sorts before its file's: the file's own name is the one read
    link = second.with_name(second.name.replace(".gz", "").rsplit(".", 1)[0] + ".0link.gz")
    link.symlink_to(second.name)
    assert link.name < second.name and sources.parse_name(link.name)
    settings = loaded(db_url, tmp_path)
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert ingest.run(settings, source=str(out))
    assert_truth(db_url, truth)
    assert f"copies/{first.name}: the same log object as {first.name} (its CloudFront name)" in (
        caplog.text
    )
    assert f"{link.name} is another name of {second.name} (a link); not read under it" in (
        caplog.text
    )
    with db.session_factory(db_url)() as s:
        keys = set(s.scalars(select(IngestedObject.key)))
    assert keys == set(truth.files)
    # Later: another copy and a hard link of objects read before add nothing.
    (out / "later").mkdir()
    shutil.copy(second, out / "later" / second.name)
    hard = third.with_name(third.name.replace(".gz", "").rsplit(".", 1)[0] + ".0hard.gz")
    os.link(third, hard)
    assert hard.name < third.name  # the name listed for the file: the ledger has the other
    before = snapshot(db_url)
    assert ingest.run(settings, source=str(out))
    assert snapshot(db_url) == before


def test_copies_of_one_name_that_differ_are_not_read_and_fail_the_run(db_url, tmp_path, caplog):
    """Two objects of one CloudFront name and different sizes (a copy cut short): which one is
    CloudFront's cannot be told, so neither is read, both are named and the run fails, until
    the wrong one is removed; against an object read before, the same."""
    import shutil

    out = tmp_path / "logs"
    truth = loggen.generate(out, days=2, files_per_day=3, lines_per_file=50)
    first, second = (out / name for name in truth.files[:2])
    (out / "short").mkdir()
    (out / "short" / first.name).write_bytes(first.read_bytes()[:-10])
    settings = loaded(db_url, tmp_path)
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert ingest.run(settings, source=str(out)) is False
    assert f"short/{first.name}: named as {first.name} but" in caplog.text
    assert f"{len(truth.files) - 1} objects ingested, 2 failed" in caplog.text
    shutil.rmtree(out / "short")
    (out / "later").mkdir()
    (out / "later" / second.name).write_bytes(second.read_bytes() + b"x")  # read before
    assert ingest.run(settings, source=str(out)) is False
    assert f"later/{second.name}: named as {second.name} but" in caplog.text
    shutil.rmtree(out / "later")
    assert ingest.run(settings, source=str(out))
    assert_truth(db_url, truth)


def test_reingest_of_a_moved_object_replaces_it_under_its_new_key(db_url, tmp_path, caplog):
    """An object read before a bucket was reorganised (now in another folder, the same name):
    `etl reingest` of its new key replaces the ledger's object of that name, which then lies
    under the new key, instead of saying it is not in the ledger; the statistics stay exact."""
    out = tmp_path / "logs"
    truth = loggen.generate(out, days=2, files_per_day=3, lines_per_file=50)
    settings = loaded(db_url, tmp_path)
    assert ingest.run(settings, source=str(out))
    first = out / truth.files[0]
    (out / "2024").mkdir()
    moved = f"2024/{first.name}"
    first.rename(out / moved)
    caplog.set_level(logging.INFO, "bioc_webstats")
    ingest.reingest(settings, [moved], source=str(out))
    assert f"{moved}: in the ledger as {first.name} (moved): re-read from here" in caplog.text
    assert_truth(db_url, truth)
    with db.session_factory(db_url)() as s:
        keys = set(s.scalars(select(IngestedObject.key)))
    assert keys == set(truth.files) - {first.name} | {moved}
    before = snapshot(db_url)
    assert ingest.run(settings, source=str(out))  # the moved object is not read again
    assert snapshot(db_url)[:3] == before[:3]
    # a file of that name and another size is not the object: refused, nothing replaced
    second = out / truth.files[1]
    (out / "short").mkdir()
    other = gzip.compress(gzip.decompress(second.read_bytes())[:-200], compresslevel=1)
    assert len(other) != second.stat().st_size
    (out / "short" / second.name).write_bytes(other)
    with pytest.raises(WebstatsError, match="1 objects failed"):
        ingest.reingest(settings, [f"short/{second.name}"], source=str(out))
    assert f"short/{second.name}: named as {second.name} but" in caplog.text
    assert snapshot(db_url)[:3] == before[:3]


def test_a_run_across_midnight_does_not_claim_the_new_day(db_url, tmp_path, monkeypatch):
    """A run that listed before midnight (the objects up to Dec 30) and counted after it: a
    line of Dec 31 00:10 in Dec 30's last object did not make ValidThru Dec 31, a day none
    of whose objects the run read (it took the clock again when it counted)."""
    out = tmp_path / "logs"
    out.mkdir()

    def put(hour: str, *lines: str) -> None:
        (out / f"{loggen.DIST}.{hour}.{len(list(out.iterdir())):08x}.gz").write_bytes(
            loggen.log_bytes(*lines)
        )

    put("2026-12-30-10", loggen.log_line(date="2026-12-30", time="10:00:00"))
    put("2026-12-30-23", loggen.log_line(date="2026-12-30", time="23:50:00"),
        loggen.log_line(date="2026-12-31", time="00:10:00", ip="192.0.2.9"))  # fmt: skip
    put("2026-12-31-12", loggen.log_line(date="2026-12-31", time="12:00:00"))  # not listed
    settings = loaded(db_url, tmp_path)
    days = iter([dt.date(2026, 12, 30)])  # at the listing; then the day is over
    monkeypatch.setattr(db, "last_complete_day", lambda: next(days, dt.date(2026, 12, 31)))
    assert ingest.run(settings, source=str(out))
    with db.session_factory(db_url)() as s:
        assert not any("2026-12-31-12" in k for k in s.scalars(select(IngestedObject.key)))
        assert db.get_valid_thru(s) == dt.date(2026, 12, 30)
        # the object with Dec 31's line waits too (the day was not over when listed)
        assert s.scalar(select(func.max(DownloadRecord.day))) == dt.date(2026, 12, 30)
    assert ingest.run(settings, source=str(out))  # the next run reads Dec 31's objects
    with db.session_factory(db_url)() as s:
        assert db.get_valid_thru(s) == dt.date(2026, 12, 31)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_lock_that_cannot_take_its_holders_name_still_locks(db_url, tmp_path):
    """On a full disk every writing command failed with a bare "No space left on device" (no
    path, no step): writing who holds the lock failed first. That name is not needed (the
    flock is the lock): a warning naming the lock, and the command goes on. Here the state
    directory's files may not grow at all (RLIMIT_FSIZE 0)."""
    import resource
    import subprocess

    from killharness import EXE, prepared

    env = prepared(db_url, tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()

    def no_growth() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    done = subprocess.run(
        [EXE, "etl", "run", "--dry-run", "--source", str(logs), "--since", "2024-01-01"],
        env=env, capture_output=True, text=True, timeout=120, preexec_fn=no_growth,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"cannot write its name into the lock {tmp_path / 'state' / 'etl.lock'}: File too " \
        "large" in done.stderr  # fmt: skip
