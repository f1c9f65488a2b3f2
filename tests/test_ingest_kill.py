"""Exactly once under SIGKILL: ``bioc-webstats etl run`` is killed at 10 points (between and
inside transactions), then run again; the result equals an uninterrupted run."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import func, select

import loggen
from bioc_webstats.store import db
from bioc_webstats.store.models import DownloadRecord, IngestedObject, StatsPending
from killharness import assert_whole, kill_at, prepared, run_cli
from test_ingest import assert_truth, snapshot

# (pause point[:n-th passage], workers); the mid-transaction points are inside the
# transaction of an object (ledger row, records, queue) or of the recompute.
POINTS = [
    ("listed", "1"),
    ("object_parsed:1", "1"),
    ("ledger_inserted:2", "1"),
    ("records_inserted:3", "2"),
    ("object_queued:1", "1"),
    ("object_committed:4", "2"),
    ("object_parsed:6", "2"),
    ("before_recompute", "1"),
    ("recompute_done", "2"),
    ("recompute_committed", "1"),
]


@pytest.fixture
def logs_dir(tmp_path) -> tuple[Path, loggen.Truth]:
    out = tmp_path / "logs"
    truth = loggen.generate(
        out, days=2, start=dt.date(2023, 12, 31), files_per_day=4, lines_per_file=150, seed=11
    )
    return out, truth


def assert_complete(db_url: str, truth: loggen.Truth) -> None:
    assert_truth(db_url, truth)
    with db.session_factory(db_url)() as s:
        assert sorted(s.scalars(select(IngestedObject.key))) == sorted(truth.files)
        assert s.scalar(select(func.sum(DownloadRecord.downloads))) == truth.counted
        assert s.scalar(select(func.count()).select_from(StatsPending)) == 0


# All ten points on PostgreSQL (production); three of them on SQLite too (keeps it quick).
CASES = [(p, w, "postgresql") for p, w in POINTS] + [
    (p, w, "sqlite")
    for p, w in POINTS
    if p in ("ledger_inserted:2", "records_inserted:3", "recompute_done")
]


@pytest.mark.parametrize(
    ("point", "workers", "db_url"),
    CASES,
    ids=[f"{d}-{p}" for p, _, d in CASES],
    indirect=["db_url"],
)
def test_killed_run_then_rerun_equals_uninterrupted(db_url, tmp_path, logs_dir, point, workers):
    out, truth = logs_dir
    env = prepared(db_url, tmp_path)
    env["WEBSTATS_ETL_WORKERS"] = workers
    kill_at(point, ["etl", "run", "--source", str(out)], env, tmp_path)
    assert_whole(db_url)  # every ledger row has its records
    done = run_cli(["etl", "run", "--source", str(out)], env)
    assert done.returncode == 0, done.stderr
    assert_complete(db_url, truth)
    # and once more: nothing changes
    before = snapshot(db_url)
    assert run_cli(["etl", "run", "--source", str(out)], env).returncode == 0
    assert snapshot(db_url) == before


def test_killed_reingest_keeps_old_records(db_url, tmp_path, logs_dir):
    out, truth = logs_dir
    env = prepared(db_url, tmp_path)
    assert run_cli(["etl", "run", "--source", str(out)], env).returncode == 0
    before = snapshot(db_url)
    args = ["etl", "reingest", "--source", str(out), *truth.files[:2]]
    kill_at("reingest_deleted:2", args, env, tmp_path)
    after = snapshot(db_url)
    assert after[:3] == before[:3]  # the first object's replacement committed: same content
    done = run_cli(args, env)
    assert done.returncode == 0, done.stderr
    assert_complete(db_url, truth)


# A day already counted, the next day's run killed: the increments of the killed run are
# applied exactly once by the next one (on top of seen-sets that hold the first day).
NEXT_DAY = [
    (p, d)
    for p in ("records_inserted:2", "object_committed:2", "before_recompute", "recompute_done",
              "recompute_committed")
    for d in ("postgresql", "sqlite")
    if d == "postgresql" or p in ("before_recompute", "recompute_done")
]  # fmt: skip


@pytest.mark.parametrize(
    ("point", "db_url"), NEXT_DAY, ids=[f"{d}-{p}" for p, d in NEXT_DAY], indirect=["db_url"]
)
def test_killed_next_day_then_rerun_equals_rebuild(db_url, tmp_path, logs_dir, point):
    from test_ingest import make_settings
    from test_stats import assert_rebuild_agrees

    out, truth = logs_dir
    source = tmp_path / "source"
    source.mkdir()
    for name in truth.files[:4]:  # 2023-12-31
        (source / name).symlink_to(out / name)
    env = prepared(db_url, tmp_path)
    assert run_cli(["etl", "run", "--source", str(source)], env).returncode == 0
    for name in truth.files[4:]:  # 2024-01-01: a new year, a new month
        (source / name).symlink_to(out / name)
    kill_at(point, ["etl", "run", "--source", str(source)], env, tmp_path)
    done = run_cli(["etl", "run", "--source", str(source)], env)
    assert done.returncode == 0, done.stderr
    assert_complete(db_url, truth)
    assert_rebuild_agrees(db_url, make_settings(db_url, tmp_path))
