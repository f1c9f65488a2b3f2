"""stats.py: the daily increments give exactly what a rebuild from the records gives — statistics
and seen-sets — over many generated days, with late files, re-ingests, packages-table changes
and a release that does not keep the seen-sets; category totals as distinct IPs; the queue."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

import loggen
from bioc_webstats.etl import ingest, packages
from bioc_webstats.store import db, stats
from bioc_webstats.store.models import (
    CategoryStat,
    DownloadRecord,
    IngestedObject,
    PackageStat,
    RecordMonth,
    SeenCategoryClient,
    SeenClient,
    SeenPackage,
    StatsPending,
)
from test_ingest import SAMPLE, assert_truth, loaded, make_settings, stats_tables


def test_period():
    assert stats.period(2024, 2) == (dt.date(2024, 2, 1), dt.date(2024, 3, 1))
    assert stats.period(2024, 12) == (dt.date(2024, 12, 1), dt.date(2025, 1, 1))
    assert stats.period(2024, 0) == (dt.date(2024, 1, 1), dt.date(2025, 1, 1))


def derived(url: str) -> dict[str, list]:
    """Everything the statistics code keeps, as sorted rows."""
    with db.session_factory(url)() as s:

        def rows(model, *cols):
            return sorted(tuple(r) for r in s.execute(select(*(getattr(model, c) for c in cols))))

        out = {
            "package_stats": rows(PackageStat, "category", "package", "year", "month", "ips",
                                  "downloads"),
            "category_stats": rows(CategoryStat, "category", "year", "month", "ips", "downloads"),
            "stats_seen": rows(SeenClient, "year", "package_id", "ip_hash", "months"),
            "stats_seen_category": rows(SeenCategoryClient, "year", "category", "ip_hash",
                                        "months"),
            "stats_seen_packages": rows(SeenPackage, "package_id", "category", "package"),
            "record_months": rows(RecordMonth, "category", "package", "year", "month",
                                  "first_day", "last_day"),
        }  # fmt: skip
        out["pending"] = s.scalar(select(func.count()).select_from(StatsPending))
        out["uncounted"] = s.scalar(
            select(func.count())
            .where(text("counted_at IS NULL OR counted_at <> ingested_at"))
            .select_from(IngestedObject)
        )
    return out


def assert_rebuild_agrees(url: str, settings, record_months_exact: bool = True) -> None:
    """A rebuild from the records changes nothing the increments made."""
    before = derived(url)
    assert before["pending"] == 0 and before["uncounted"] == 0
    assert before["stats_seen"] and before["stats_seen_category"]  # the sets are in use
    stats.rebuild(settings)
    after = derived(url)
    if not record_months_exact:  # only ever widened: a superset of what the records hold
        wide = {r[:4]: r[4:] for r in before.pop("record_months")}
        for *key, lo, hi in after.pop("record_months"):
            assert wide[tuple(key)][0] <= lo and hi <= wide[tuple(key)][1]
    for name, rows in after.items():
        assert before[name] == rows, name


def day_files(staging: Path, truth: loggen.Truth, day: dt.date) -> list[str]:
    return [f for f in truth.files if f".{day:%Y-%m-%d}-" in f]


def feed(staging: Path, source: Path, names: list[str]) -> None:
    for name in names:
        shutil.copy2(staging / name, source / name)


def test_daily_runs_equal_a_rebuild(db_url, tmp_path):
    """Three weeks across a year end and two month ends, one run a day; a file arrives two
    days late; some packages join the table on day 6 (their earlier records become counted);
    then a re-ingest of unchanged objects, and one of an object whose content changed."""
    staging, source = tmp_path / "staging", tmp_path / "logs"
    source.mkdir()
    start = dt.date(2024, 12, 26)
    days = 21
    truth = loggen.generate(
        staging, days=days, start=start, files_per_day=3, lines_per_file=200, seed=21
    )
    settings = make_settings(db_url, tmp_path)
    rows = SAMPLE.read_text().splitlines()
    held = [r for r in rows[1:] if r.split(",")[1] in ("bioc", "annotation")][::9]
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join(r for r in rows if r not in held) + "\n")
    packages.load_csv(settings, partial)
    late = day_files(staging, truth, start + dt.timedelta(days=1))[1]
    for d in range(days):
        day = start + dt.timedelta(days=d)
        feed(staging, source, [f for f in day_files(staging, truth, day) if f != late])
        if d == 3:
            feed(staging, source, [late])  # two days late, inside the look-back
        if d == 5:
            with db.session_factory(db_url)() as s:
                missing = {(r.split(",")[1], r.split(",")[0]) for r in held}
                assert any(
                    (c, p) in missing
                    for c, p in s.execute(select(DownloadRecord.category, DownloadRecord.package))
                )
            packages.load_csv(settings, SAMPLE)  # adds them: their earlier records count now
        assert ingest.run(settings, source=str(source))
        if d in (4, 12):
            assert_rebuild_agrees(db_url, settings)  # mid-way too (continues from the rebuild)
    assert_truth(db_url, truth)
    assert_rebuild_agrees(db_url, settings)

    # Re-ingest unchanged objects: nothing changes.
    keys = truth.files[4:7]
    before = derived(db_url)
    ingest.reingest(settings, keys, source=str(source))
    assert derived(db_url) == before
    assert_truth(db_url, truth)

    # Re-ingest an object whose content changed (fewer lines, other clients): clients of its
    # old records leave the counts where no other record has them.
    gen = loggen.Generator(99, loggen.read_packages())
    hour = dt.datetime.strptime(keys[0].split(".")[1], "%Y-%m-%d-%H")
    loggen.write_file(source / keys[0], gen, hour, 60, 0, None, loggen.Truth())
    ingest.reingest(settings, keys[:1], source=str(source))
    assert stats_tables(db_url) != (truth.package, truth.category)
    assert_rebuild_agrees(db_url, settings, record_months_exact=False)


def test_daily_cost_follows_the_new_day_not_the_year(db_url, tmp_path, monkeypatch):
    """A day is counted from its own records: nothing is recounted, and every statement that
    reads download_records reads the new objects' records by object id."""
    from sqlalchemy import event

    staging, source = tmp_path / "staging", tmp_path / "logs"
    source.mkdir()
    start = dt.date(2024, 3, 1)
    truth = loggen.generate(staging, days=3, start=start, files_per_day=2, lines_per_file=100)
    settings = loaded(db_url, tmp_path)
    last = day_files(staging, truth, start + dt.timedelta(days=2))
    feed(staging, source, [f for f in truth.files if f not in last])
    assert ingest.run(settings, source=str(source))
    recounts, reads = [], []
    monkeypatch.setattr(stats, "_recount_packages", lambda *a: recounts.append(a))
    monkeypatch.setattr(stats, "_recount_category", lambda *a: recounts.append(a))

    def seen(conn, cursor, statement, *_):
        if "download_records" in statement and not statement.startswith(
            ("INSERT INTO download_records", "COPY")
        ):
            reads.append(statement)

    engine = db.get_engine(db_url)
    event.listen(engine, "before_cursor_execute", seen)
    try:
        feed(staging, source, last)
        assert ingest.run(settings, source=str(source))
        assert reads and all("r.object_id BETWEEN" in r for r in reads), reads
        reads.clear()
        with db.session_factory(db_url).begin() as s:  # nothing new: no record is read
            valid_thru = db.get_valid_thru(s)
            assert stats.apply_pending(s).valid_thru == valid_thru
        assert reads == []
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert recounts == []
    assert_truth(db_url, truth)


def old_release_recompute(url: str) -> None:
    """What the release before the seen-sets does to the statistics after storing records:
    recount them from the records (COUNT(DISTINCT)), bump the data version; no seen-sets."""
    counted = "(r.category = 'workflows' AND r.day >= '2015-01-01' OR r.category <> 'workflows')"
    per = {
        "month": "CAST(strftime('%m', r.day) AS INTEGER)",
        "year": "CAST(strftime('%Y', r.day) AS INTEGER)",
    }
    if url.startswith("postgresql"):
        per = {"month": "extract(month FROM r.day)::int", "year": "extract(year FROM r.day)::int"}
    src = (
        "FROM download_records r JOIN packages p ON p.package = r.package "
        f"AND p.category = r.category WHERE {counted}"
    )
    y, m = per["year"], per["month"]
    with db.session_factory(url).begin() as s:
        s.execute(text("DELETE FROM package_stats"))
        s.execute(text("DELETE FROM category_stats"))
        for month in (m, "0"):
            s.execute(text(
                "INSERT INTO package_stats (category, package, year, month, ips, downloads) "
                f"SELECT r.category, r.package, {y}, {month}, count(DISTINCT r.ip_hash), "
                f"sum(r.downloads) {src} GROUP BY 1, 2, 3, 4"
            ))  # fmt: skip
            s.execute(text(
                "INSERT INTO category_stats (category, year, month, ips, downloads) "
                f"SELECT r.category, {y}, {month}, count(DISTINCT r.ip_hash), sum(r.downloads) "
                f"{src} GROUP BY 1, 2, 3"
            ))  # fmt: skip
        s.execute(text("DELETE FROM stats_pending"))
        db.bump_data_version(s)


def test_a_release_without_seen_sets_in_between(db_url, tmp_path):
    """A rollback to the release before the seen-sets, then forward again: the old release
    stores a day (its ledger rows not counted), recounts its statistics, adds packages; this
    release notices (data version past seen_version, packages not in the seen-sets) and
    recounts those years from the records."""
    staging, source = tmp_path / "staging", tmp_path / "logs"
    source.mkdir()
    start = dt.date(2024, 5, 30)
    truth = loggen.generate(staging, days=3, start=start, files_per_day=2, lines_per_file=150)
    settings = make_settings(db_url, tmp_path)
    rows = SAMPLE.read_text().splitlines()
    held = [r for r in rows[1:] if r.split(",")[1] == "bioc"][:12]
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join(r for r in rows if r not in held) + "\n")
    packages.load_csv(settings, partial)
    feed(staging, source, day_files(staging, truth, start))
    assert ingest.run(settings, source=str(source))
    # The old release: records of day 2 stored (not counted), packages added, recounted.
    feed(staging, source, day_files(staging, truth, start + dt.timedelta(days=1)))
    summary = ingest.RunSummary()
    _, todo, _, _, _ = ingest.list_window(settings, str(source), None, None)
    ingest._ingest_objects(settings, str(source), todo, summary, ingest.store_new)
    with db.session_factory(db_url).begin() as s:
        for line in held:
            name, cat = line.split(",")[:2]
            s.execute(text("INSERT INTO packages (package, category) VALUES (:p, :c)"),
                      {"p": name, "c": cat})  # fmt: skip
    old_release_recompute(db_url)
    assert_truth_for_days = stats_tables(db_url)
    # Forward again: day 3 with this release.
    feed(staging, source, day_files(staging, truth, start + dt.timedelta(days=2)))
    assert ingest.run(settings, source=str(source))
    assert_truth(db_url, truth)
    assert assert_truth_for_days != stats_tables(db_url)
    assert_rebuild_agrees(db_url, settings)


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
    # The same two clients in August: new to the month, not to the year.
    (out / f"{loggen.DIST}.2024-08-01-10.b.gz").write_bytes(
        loggen.log_bytes(*[ln.replace("2024-07-01", "2024-08-01") for ln in lines])
    )
    assert ingest.run(settings, source=str(out))
    pkg, cat = stats_tables(db_url)
    assert cat[("bioc", 2024, 8)] == (2, 6)
    assert cat[("bioc", 2024, 0)] == (2, 12)
    assert {pkg[("bioc", n, 2024, 0)] for n in names} == {(2, 4)}


def test_apply_pending_skips_years_before_first_year_and_clears_queue(db_url, tmp_path):
    loaded(db_url, tmp_path)
    with db.session_factory(db_url).begin() as s:
        stats.queue(s, [("workflows", "x", 2014, 5), ("bioc", "affy", 2008, 1)])
        res = stats.apply_pending(s)
        assert (res.months, res.years) == (0, 0)
        assert s.scalar(select(func.count()).select_from(StatsPending)) == 0
        assert res.data_version == 2  # 1 was the packages load
        assert db.get_meta(s, stats.SEEN_VERSION) == "2"


def test_months_queued_by_an_older_release_advance_valid_thru(db_url, tmp_path):
    """A release before 0005 queued months and advanced ValidThru only when it counted them:
    its records may be newer than ValidThru while every ledger row reads counted."""
    loaded(db_url, tmp_path)
    with db.session_factory(db_url).begin() as s:
        db.advance_valid_thru(s, dt.date(2024, 5, 1))
        s.add(IngestedObject(key="E1.2024-05-03-10.old.gz", size=1, ingested_at=dt.datetime(
            2024, 5, 4, tzinfo=dt.UTC), counted_at=dt.datetime(2024, 5, 4, tzinfo=dt.UTC),
            name_hour=dt.datetime(2024, 5, 3, 10)))  # fmt: skip
        s.flush()
        obj = s.scalar(select(func.max(IngestedObject.id)))
        s.add(DownloadRecord(object_id=obj, category="bioc", package="affy",
                             day=dt.date(2024, 5, 3), ip_hash=7, downloads=1))  # fmt: skip
        stats.queue(s, [("bioc", "affy", 2024, 5)])
    with db.session_factory(db_url).begin() as s:
        assert stats.apply_pending(s).valid_thru == dt.date(2024, 5, 3)
        assert db.get_valid_thru(s) == dt.date(2024, 5, 3)


@pytest.mark.parametrize("where", ["package", "category"])
def test_add_month_tells_new_to_month_and_new_to_year(db_url, where):
    """The RETURNING of one month's upsert: (clients new to the month, new to the year)."""
    table, group, source = {
        "package": ("stats_seen", 7, "SELECT h, 7, 2024, :bit FROM src WHERE true"),
        "category": ("stats_seen_category", "bioc", "SELECT h, 2024, :bit, 'bioc' FROM src "
                     "WHERE true"),
    }[where]  # fmt: skip
    with db.session_factory(db_url).begin() as s:
        s.execute(text("CREATE TEMP TABLE src (h BIGINT)"))

        def add(month: int, hashes: list[int]):
            s.execute(text("DELETE FROM src"))
            s.execute(text("INSERT INTO src (h) VALUES (:h)"), [{"h": h} for h in hashes])
            return stats._add_month(s, table, source, {}, 1 << (month - 1)).get(group, (0, 0))

        assert add(3, [1, 2, 3]) == (3, 3)
        assert add(3, [1, 2, 4]) == (1, 1)  # 4 is new
        assert add(5, [1, 4, 5]) == (3, 1)  # all new to May, only 5 new to the year
        assert add(5, [1, 4, 5]) == (0, 0)
        assert add(1, [5, 6]) == (2, 1)  # a month earlier than the ones seen: same rule
        s.execute(text("DROP TABLE src"))


def test_bulk_load_recounts_the_year(db_url, tmp_path, monkeypatch):
    """New downloads that outnumber a year's counted ones recount that year from the records
    (BULK_MIN lowered to see it on small data); same figures as increments."""
    monkeypatch.setattr(stats, "BULK_MIN", 0)
    recounted = []
    real = stats._recount_packages
    monkeypatch.setattr(stats, "_recount_packages", lambda *a: recounted.append(a[3]) or real(*a))
    staging, source = tmp_path / "staging", tmp_path / "logs"
    source.mkdir()
    start = dt.date(2024, 3, 1)
    truth = loggen.generate(staging, days=3, start=start, files_per_day=2, lines_per_file=150)
    settings = loaded(db_url, tmp_path)
    feed(staging, source, day_files(staging, truth, start))
    assert ingest.run(settings, source=str(source))
    assert recounted == [2024]  # nothing counted in 2024 yet: a bulk load
    feed(staging, source, day_files(staging, truth, start + dt.timedelta(days=1)))
    assert ingest.run(settings, source=str(source))
    before = len(recounted)
    feed(staging, source, day_files(staging, truth, start + dt.timedelta(days=2)))
    assert ingest.run(settings, source=str(source))
    assert len(recounted) == before  # a day against two counted ones: increments
    assert_truth(db_url, truth)
    assert_rebuild_agrees(db_url, settings)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_an_etl_login_with_dml_rights_only(db_url, tmp_path):
    """The ETL's login has SELECT, INSERT, UPDATE, DELETE and TEMPORARY, no TRUNCATE and does
    not own the tables: the daily count and a rebuild work all the same."""
    import sqlalchemy as sa

    admin = sa.create_engine(db_url, isolation_level="AUTOCOMMIT")
    name = f"etl_{db_url.rsplit('/', 1)[1]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{name}" LOGIN'))
        dbname = db_url.rsplit("/", 1)[1]
        conn.execute(sa.text(f'GRANT CONNECT, TEMPORARY ON DATABASE "{dbname}" TO "{name}"'))
        conn.execute(sa.text(f'GRANT USAGE ON SCHEMA public TO "{name}"'))
        conn.execute(sa.text(
            f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{name}"'
        ))  # fmt: skip
        conn.execute(sa.text(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{name}"'))
        # (roles/webstats_db: default privileges on the owner's functions)
        conn.execute(sa.text(f'GRANT EXECUTE ON FUNCTION webstats_analyze() TO "{name}"'))
        public = conn.execute(sa.text(
            "SELECT has_function_privilege('public', 'webstats_analyze()', 'EXECUTE')"
        )).scalar()  # fmt: skip
        assert public is False
    admin.dispose()
    etl_url = db_url.replace("://webstats@", f"://{name}@")
    out = tmp_path / "logs"
    truth = loggen.generate(out, days=2, start=dt.date(2024, 4, 29), files_per_day=2)
    settings = loaded(etl_url, tmp_path)
    assert ingest.run(settings, source=str(out))
    assert_truth(etl_url, truth)
    assert_rebuild_agrees(etl_url, settings)
    db.dispose_engine(etl_url)
    # the rebuild's ANALYZE ran (as the owner: the login may not, before PostgreSQL 17)
    with admin.connect() as conn:
        analyzed = conn.execute(sa.text(
            "SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'download_records'"
        )).scalar()  # fmt: skip
    admin.dispose()
    assert analyzed is not None


def test_a_bulk_year_beside_an_incremented_one(db_url, tmp_path, monkeypatch):
    """New records over two years, one of them recounted whole (a bulk load): the other is
    incremented, and the bulk year's records are not also added as an increment."""
    start = dt.date(2023, 12, 30)
    staging, source = tmp_path / "staging", tmp_path / "logs"
    source.mkdir()
    truth = loggen.generate(staging, days=3, start=start, files_per_day=2, lines_per_file=150)
    settings = loaded(db_url, tmp_path)
    feed(staging, source, day_files(staging, truth, start))
    assert ingest.run(settings, source=str(source))  # 2023 counted: increments from now on
    monkeypatch.setattr(stats, "_bulk_years", lambda session, objects: {2024})
    recounted = []
    real = stats._recount_packages
    monkeypatch.setattr(stats, "_recount_packages", lambda *a: recounted.append(a[3]) or real(*a))
    for day in (start + dt.timedelta(days=1), start + dt.timedelta(days=2)):
        feed(staging, source, day_files(staging, truth, day))
    assert ingest.run(settings, source=str(source))
    assert recounted == [2024]
    assert_truth(db_url, truth)
    assert_rebuild_agrees(db_url, settings)
