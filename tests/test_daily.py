"""``bioc-webstats daily`` (the ETL timer's command) and ``bioc-webstats status``: a failed or
limited sync is reported and does not stop the ETL, either failure exits 1, successes are
recorded in ``meta``; on SQLite and PostgreSQL, through the CLI."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from pathlib import Path

import pytest
from sqlalchemy import func, select

import loggen
from bioc_webstats import daily
from bioc_webstats.store import db
from bioc_webstats.store.models import IngestedObject, Package
from test_ingest import assert_truth
from test_ingest_s3 import cli_run

DEVEL = Path(__file__).parent / "fixtures" / "sync" / "devel"
SAMPLE = loggen.PACKAGES_SAMPLE


def meta(db_url: str) -> dict[str, str | None]:
    with db.session_factory(db_url)() as s:
        return {k: db.get_meta(s, k) for k in (daily.LAST_SYNC_OK, daily.LAST_ETL_OK)}


def recent(value: str | None) -> bool:
    if value is None:
        return False
    when = dt.datetime.fromisoformat(value)
    return when.tzinfo is not None and abs(dt.datetime.now(dt.UTC) - when).total_seconds() < 600


@pytest.fixture
def ready(db_url, tmp_path, monkeypatch):
    """A database with the packages sample and a day of generated logs."""
    out = tmp_path / "logs"
    truth = loggen.generate(out, days=1, files_per_day=3, lines_per_file=150, seed=4)
    assert cli_run(monkeypatch, db_url, tmp_path, "packages", "load", str(SAMPLE)) == 0
    return out, truth


def test_both_steps_ok(db_url, tmp_path, monkeypatch, capsys, ready):
    out, truth = ready
    capsys.readouterr()
    code = cli_run(
        monkeypatch, db_url, tmp_path, "daily", "--source", str(out), "--packages-from", str(DEVEL),
        WEBSTATS_ETL_SYNC_CHANGE_LIMIT="1000",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.splitlines()[-1] == "daily: packages sync ok, etl run ok"
    got = meta(db_url)
    assert recent(got[daily.LAST_SYNC_OK]) and recent(got[daily.LAST_ETL_OK])
    with db.session_factory(db_url)() as s:  # the sync's changes are in, the logs too
        assert s.scalar(select(Package).where(Package.package == "NewPkgA")) is not None
        assert s.scalar(select(func.count()).select_from(IngestedObject)) == len(truth.files)
        assert db.get_valid_thru(s) is not None


def test_failed_sync_is_reported_and_the_etl_runs(db_url, tmp_path, monkeypatch, capsys, ready):
    out, truth = ready
    capsys.readouterr()
    code = cli_run(
        monkeypatch, db_url, tmp_path, "daily", "--source", str(out),
        "--packages-from", str(tmp_path / "nowhere"),
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.splitlines()[-1] == "daily: packages sync failed, etl run ok"
    assert captured.err.splitlines()[-1] == (
        f"bioc-webstats: error: packages sync: packages source {tmp_path / 'nowhere'}: "
        "not a directory nor an http(s):// URL"
    )
    assert "Traceback" not in captured.err
    assert_truth(db_url, truth)  # the ETL ran anyway
    got = meta(db_url)
    assert got[daily.LAST_SYNC_OK] is None and recent(got[daily.LAST_ETL_OK])


def test_a_defect_in_the_sync_does_not_stop_the_etl(db_url, tmp_path, monkeypatch, capsys, ready):
    """Whatever the sync raises, the ETL still runs and the failure is one line."""
    from bioc_webstats.etl import packages

    def broken(*_a, **_k):
        raise KeyError("surprise")

    monkeypatch.setattr(packages, "sync", broken)
    out, truth = ready
    capsys.readouterr()
    code = cli_run(
        monkeypatch, db_url, tmp_path, "daily", "--source", str(out),
        "--packages-from", str(DEVEL),
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.splitlines()[-1] == "daily: packages sync failed, etl run ok"
    assert captured.err.splitlines()[-1] == (
        "bioc-webstats: error: packages sync: unexpected KeyError: 'surprise'"
    )
    assert "Traceback" not in captured.err
    assert_truth(db_url, truth)


def test_sync_stopped_at_its_limit_is_a_failure(db_url, tmp_path, monkeypatch, capsys, ready):
    out, truth = ready
    monkeypatch.setenv("WEBSTATS_ETL_SYNC_CHANGE_LIMIT", "50")
    code = cli_run(
        monkeypatch, db_url, tmp_path, "daily", "--source", str(out),
        "--packages-from", str(DEVEL),
    )  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert re.match(
        r"bioc-webstats: error: packages sync: \d+ changes exceed the change "
        r"limit of 50 \(etl/sync_change_limit\); nothing changed",
        err[-1],
    )
    assert_truth(db_url, truth)
    assert meta(db_url)[daily.LAST_SYNC_OK] is None


def test_failed_etl_exits_1_and_keeps_the_sync(db_url, tmp_path, monkeypatch, capsys, ready):
    out, _ = ready
    (out / f"{loggen.DIST}.2024-01-30-23.broken.gz").write_bytes(b"not gzip")
    code = cli_run(
        monkeypatch, db_url, tmp_path, "daily", "--source", str(out), "--packages-from", str(DEVEL),
        WEBSTATS_ETL_SYNC_CHANGE_LIMIT="1000",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.splitlines()[-1] == "daily: packages sync ok, etl run failed"
    assert captured.err.splitlines()[-1] == (
        "bioc-webstats: error: etl run: some objects failed (see above); retried on the next run"
    )
    got = meta(db_url)
    assert recent(got[daily.LAST_SYNC_OK]) and got[daily.LAST_ETL_OK] is None


def test_status_reports_the_facts(db_url, tmp_path, monkeypatch, capsys, ready, caplog):
    out, _ = ready
    caplog.set_level(logging.WARNING)
    capsys.readouterr()
    assert cli_run(monkeypatch, db_url, tmp_path, "status", "--json") == 0
    before = json.loads(capsys.readouterr().out)
    assert before[daily.LAST_ETL_OK] is None and before["valid_thru"] is None
    assert before["packages"] == 264
    assert cli_run(
        monkeypatch, db_url, tmp_path, "daily", "--source", str(out), "--packages-from", str(DEVEL),
        WEBSTATS_ETL_LOGS_SINCE="2024-01-01", WEBSTATS_ETL_SYNC_CHANGE_LIMIT="1000",
    ) == 0  # fmt: skip
    capsys.readouterr()
    assert (
        cli_run(monkeypatch, db_url, tmp_path, "status", WEBSTATS_ETL_LOGS_SINCE="2024-01-01") == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("ValidThru: 2024-01-3")
    assert lines[3].startswith("published: ") and "run 'bioc-webstats publish'" not in lines[3]
    assert lines[4].startswith("last packages sync ok: 20") and lines[4].endswith("(0 h ago)")
    assert lines[5].startswith("last ETL run ok: 20")
    assert lines[7].startswith("log objects ingested: 3, newest named 2024-01-30T")
    assert lines[8] == "cut-over day (etl/logs_since): 2024-01-01"
    # a bad setting is named, after the facts (it failed the whole command), and exits 1
    bad_day = {"WEBSTATS_ETL_LOGS_SINCE": "2024-13-01"}
    assert cli_run(monkeypatch, db_url, tmp_path, "status", **bad_day) == 1
    bad = capsys.readouterr()
    assert bad.out.splitlines() == [*lines[:8], "cut-over day (etl/logs_since): not set"]
    assert bad.err == (
        "bioc-webstats: error: parameter etl/logs_since must be a date YYYY-MM-DD from "
        "1990-01-01 to 2999-12-31, got '2024-13-01'\n"
    )
    monkeypatch.setenv("WEBSTATS_ETL_LOGS_SINCE", "2024-01-01")
    assert cli_run(monkeypatch, db_url, tmp_path, "status", "--json") == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["published"] == facts["data_version"]
    assert recent(facts[daily.LAST_SYNC_OK]) and recent(facts[daily.LAST_ETL_OK])


def test_status_counts_the_data_age_from_the_end_of_valid_thru():
    """As /healthz and the watchdog do: right after the 01:00 run that took yesterday, 1 h."""
    facts = {
        "version": "x", "valid_thru": "2024-04-01", "data_version": 3, "published": 3,
        daily.LAST_SYNC_OK: None, daily.LAST_ETL_OK: None, "packages": 1,
        "packages_seeded_not_synced": None, "objects_ingested": 1,
        "newest_object_hour": None, "logs_since": None,
    }  # fmt: skip
    now = dt.datetime(2024, 4, 2, 1, 0, tzinfo=dt.UTC)
    assert daily.status_lines(facts, now)[1] == "ValidThru: 2024-04-01 (ended 1 h ago)"
    # a log object that failed, retried by every run until read (meta retry_from)
    assert daily.status_lines({**facts, "retry_from": "2024-03-28"}, now)[7] == (
        "log objects ingested: 1, newest named -; failed ones named from 2024-03-28 are "
        "retried by every run"
    )


def test_the_daily_job_waits_for_a_command_run_by_hand(
    db_url, tmp_path, monkeypatch, capsys, caplog, ready
):
    """A backfill or a reingest SysOps started is still running at the timer's hour: the
    daily job refused at once (a lost day, and an alarm). It waits for it now, and gives up,
    in one line, only after its wait."""
    import threading

    from bioc_webstats import cli
    from bioc_webstats.config import load_settings
    from conftest import wait_for

    out, _ = ready
    settings = load_settings()  # the environment cli_run set (state directory included)
    monkeypatch.setattr(cli, "LOCK_POLL", 0.05)
    held, failures = threading.Event(), []

    def by_hand() -> None:
        try:
            with cli.writer_lock(settings, "etl run"):
                held.set()
                wait_for(
                    lambda: any("waiting for 'etl run'" in r.getMessage() for r in caplog.records),
                    60, what="the daily job to wait",
                )  # fmt: skip
        except Exception as exc:  # the test's own thread: reported below
            failures.append(exc)

    caplog.set_level(logging.WARNING)
    holder = threading.Thread(target=by_hand)
    holder.start()
    assert held.wait(30)
    capsys.readouterr()
    code = cli_run(
        monkeypatch, db_url, tmp_path, "daily", "--source", str(out), "--packages-from", str(DEVEL),
        WEBSTATS_ETL_SYNC_CHANGE_LIMIT="1000",
    )  # fmt: skip
    holder.join(60)
    assert not failures, failures
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.splitlines()[-1] == "daily: packages sync ok, etl run ok"
    assert recent(meta(db_url)[daily.LAST_ETL_OK])
    # a holder that does not finish within the wait: one line, nothing done
    monkeypatch.setattr(cli, "DAILY_LOCK_WAIT", 0.3)
    before = meta(db_url)
    with cli.writer_lock(settings, "etl reingest"):
        code = cli_run(monkeypatch, db_url, tmp_path, "daily", "--source", str(out))
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert err[-1].startswith("bioc-webstats: error: daily: not started after waiting 0.005 "), err
    assert "'etl reingest' (pid " in err[-1]
    assert meta(db_url) == before
