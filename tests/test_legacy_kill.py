"""Exactly once under SIGKILL: ``bioc-webstats import legacy-db`` is killed at 10 points
(between and inside the transactions of its units, between files, before the recompute of
the first file's months, inside the last recompute), then run
again; the result equals an uninterrupted import, and no reader process outlives the kill."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select

import legacygen
from bioc_webstats.store import db
from bioc_webstats.store.models import DownloadRecord, IngestedObject, StatsPending
from killharness import assert_whole, kill_at, prepared, run_cli
from test_ingest import assert_truth, snapshot

# (pause point[:n-th passage], etl/workers: 1 reads in the importing process, 2 in two
# reader processes)
POINTS = [
    ("legacy_planned", "2"),
    ("unit_parsed:1", "1"),
    ("ledger_inserted:2", "2"),
    ("records_inserted:3", "1"),
    ("object_queued:4", "2"),
    ("unit_committed:2", "1"),
    ("file_recorded:1", "2"),
    ("unit_parsed:9", "2"),
    ("before_recompute", "1"),
    ("recompute_done:2", "2"),
]
CASES = [(p, w, "postgresql") for p, w in POINTS] + [
    (p, w, "sqlite") for p, w in POINTS if p in ("records_inserted:3", "file_recorded:1")
]


@pytest.fixture
def history(tmp_path) -> legacygen.SplitCorpus:
    """Five days across a year end, every row before the cut-over: two files."""
    return legacygen.generate_split(
        tmp_path / "legacy", tmp_path / "logs", dt.date(2019, 12, 29), 5, dt.date(2020, 1, 10),
        files_per_day=4, lines_per_file=100, seed=13,
    )  # fmt: skip


def whole_units(url: str) -> None:
    """Whatever was committed is whole: every unit's records add up to its ledger row."""
    assert_whole(url, IngestedObject.key.contains("/rows-"))


@pytest.mark.parametrize(
    ("point", "workers", "db_url"),
    CASES,
    ids=[f"{d}-{p}-w{w}" for p, w, d in CASES],
    indirect=["db_url"],
)
def test_killed_import_then_rerun_equals_uninterrupted(db_url, tmp_path, history, point, workers):
    assert [p.name for p in history.legacy_files] == [
        "download_db_2019.sqlite", "download_db_2020.sqlite",
    ]  # fmt: skip
    assert history.log_lines == 0
    env = prepared(db_url, tmp_path)
    env.update(WEBSTATS_ETL_WORKERS=workers, WEBSTATS_LEGACY_UNIT_ROWS="150")
    args = ["import", "legacy-db", "--until", "2020-01-10", *map(str, history.legacy_files)]
    kill_at(point, args, env, tmp_path, readers_exit=True)  # no reader outlives the kill
    whole_units(db_url)
    done = run_cli(args, env)
    assert done.returncode == 0, done.stderr
    assert_truth(db_url, history.truth)
    with db.session_factory(db_url)() as s:
        keys = list(s.scalars(select(IngestedObject.key)))
        assert s.scalar(select(func.sum(DownloadRecord.downloads))) == history.truth.counted
        assert s.scalar(select(func.count()).select_from(StatsPending)) == 0
    assert sorted(k for k in keys if k.endswith("/file")) == [
        "legacy/download_db_2019.sqlite/file", "legacy/download_db_2020.sqlite/file",
    ]  # fmt: skip
    assert len(keys) == len(set(keys)) > 10
    whole_units(db_url)
    # and once more: nothing changes
    before = snapshot(db_url)
    again = run_cli(args, env)
    assert again.returncode == 0, again.stderr
    assert snapshot(db_url) == before
    assert "2 unchanged since imported" in again.stderr
