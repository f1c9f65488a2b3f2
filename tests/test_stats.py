"""stats.py: periods, both recompute strategies, category totals as distinct IPs, the queue."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select

import loggen
from bioc_webstats.etl import ingest
from bioc_webstats.store import db, stats
from bioc_webstats.store.models import StatsPending
from test_ingest import assert_truth, loaded, stats_tables


def test_period():
    assert stats.period(2024, 2) == (dt.date(2024, 2, 1), dt.date(2024, 3, 1))
    assert stats.period(2024, 12) == (dt.date(2024, 12, 1), dt.date(2025, 1, 1))
    assert stats.period(2024, 0) == (dt.date(2024, 1, 1), dt.date(2025, 1, 1))


def ingest_matches_truth(db_url, tmp_path, start: dt.date, days: int, files: int, seed: int):
    """Generate logs, run the ETL on them, and compare every statistic with the truth."""
    out = tmp_path / "logs"
    truth = loggen.generate(
        out, days=days, start=start, files_per_day=files, lines_per_file=300, seed=seed
    )
    settings = loaded(db_url, tmp_path)
    assert ingest.run(settings, source=str(out))
    assert_truth(db_url, truth)


@pytest.mark.parametrize("full_at", [0, 10_000])
def test_whole_category_and_per_package_recompute_agree(db_url, tmp_path, monkeypatch, full_at):
    """FULL_CATEGORY_AT 0: every period recomputed for the whole category in one statement;
    10000: always filtered by package names. Both give the truth."""
    monkeypatch.setattr(stats, "FULL_CATEGORY_AT", full_at)
    ingest_matches_truth(db_url, tmp_path, dt.date(2024, 6, 30), days=2, files=3, seed=9)


@pytest.mark.parametrize("one_pass", [True, False])
def test_year_in_one_pass_or_per_period_agree(db_url, tmp_path, monkeypatch, one_pass):
    """PostgreSQL recomputes a year of whole categories and its touched months in one pass
    when that pays (_one_pass_pays), else period by period; both give the truth (SQLite is
    always period by period)."""
    monkeypatch.setattr(stats, "FULL_CATEGORY_AT", 0)
    monkeypatch.setattr(stats, "_one_pass_pays", lambda *_: one_pass)
    ingest_matches_truth(db_url, tmp_path, dt.date(2024, 2, 28), days=3, files=2, seed=5)


def test_one_pass_pays_early_in_the_year_not_late():
    assert stats._one_pass_pays(2024, [1, 2], dt.date(2024, 2, 1))
    assert stats._one_pass_pays(2024, [1], None)
    assert not stats._one_pass_pays(2023, [12], dt.date(2023, 12, 31))
    assert not stats._one_pass_pays(2023, [5], dt.date(2024, 1, 3))  # a late file, old year


def test_category_total_counts_distinct_ips_not_sums(db_url, tmp_path):
    out = tmp_path / "logs"
    out.mkdir()
    names = [p for p, c in loggen.read_packages() if c == "bioc"][:3]
    lines = [
        loggen.log_line(
            uri=f"/packages/3.19/bioc/src/contrib/{name}_1.0.tar.gz",
            ip=ip,
            date="2024-07-01",
            time="10:00:00",
        )
        for name in names
        for ip in ("192.0.2.1", "192.0.2.2")
    ]
    (out / f"{loggen.DIST}.2024-07-01-10.a.gz").write_bytes(loggen.log_bytes(*lines))
    settings = loaded(db_url, tmp_path)
    assert ingest.run(settings, source=str(out))
    pkg, cat = stats_tables(db_url)
    assert {pkg[("bioc", n, 2024, 7)] for n in names} == {(2, 2)}
    assert cat[("bioc", 2024, 7)] == (2, 6)  # two clients over three packages
    assert cat[("bioc", 2024, 0)] == (2, 6)


def test_apply_pending_skips_years_before_first_year_and_clears_queue(db_url, tmp_path):
    settings = loaded(db_url, tmp_path)
    with db.session_factory(db_url).begin() as s:
        stats.queue(s, [("workflows", "x", 2014, 5), ("bioc", "affy", 2008, 1)])
        res = stats.apply_pending(s)
        assert (res.months, res.years) == (0, 0)
        assert s.scalar(select(func.count()).select_from(StatsPending)) == 0
        assert res.data_version == 2  # 1 was the packages load
    assert settings is not None
