"""Exactly once under SIGKILL: ``bioc-webstats import legacy-db`` is killed at 10 points
(between and inside the transactions of its units, between files, before the recompute of
the first file's months, inside the last recompute), then run
again; the result equals an uninterrupted import, and no reader process outlives the kill."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess

import pytest
from sqlalchemy import func, select

import legacygen
from bioc_webstats.store import db
from bioc_webstats.store.models import DownloadRecord, IngestedObject, StatsPending
from conftest import interruptible, wait_for
from killharness import EXE, alive, assert_whole, descendants, kill_at, prepared, run_cli
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


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_ctrl_c_ends_the_import_in_one_line(db_url, tmp_path, history):
    """^C reaches the terminal's whole process group: the reader processes printed their
    KeyboardInterrupt tracebacks under the importing process's 'aborted'. A re-run completes."""
    env = prepared(db_url, tmp_path)
    marker = tmp_path / "paused"
    env.update(
        WEBSTATS_ETL_WORKERS="2", WEBSTATS_LEGACY_UNIT_ROWS="150",
        WEBSTATS_TEST_PAUSE_AT="unit_parsed:3", WEBSTATS_TEST_PAUSE_FILE=str(marker),
    )  # fmt: skip
    args = ["import", "legacy-db", "--until", "2020-01-10", *map(str, history.legacy_files)]
    proc = subprocess.Popen(
        [EXE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # a process group of its own, as a shell gives a command,
        preexec_fn=interruptible,  # and with ^C's default (this process's may be changed)
    )  # fmt: skip
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, 60, what="the pause")
        readers = descendants(proc.pid)
        assert proc.poll() is None and len(readers) == 2, proc.communicate()[1]
        os.killpg(proc.pid, signal.SIGINT)
        # (past the import's own waits for its readers, 30 s each, before it kills one: a busy
        # machine's readers may still be starting)
        _, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wait_for(lambda: not any(alive(p) for p in readers), 30, what="readers to exit")
    assert "Traceback" not in err and err.rstrip().endswith("aborted"), err
    assert proc.returncode == 1
    del env["WEBSTATS_TEST_PAUSE_AT"]
    done = run_cli(args, env)
    assert done.returncode == 0, done.stderr
    assert_truth(db_url, history.truth)
