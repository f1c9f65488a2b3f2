"""``import legacy-db`` (etl/legacy.py) on SQLite and real PostgreSQL: history before a
cut-over day plus logs after it = the statistics of the whole; each rule of a legacy row;
broken files; exactly once (re-runs, appended and changed rows); the look-back of the logs."""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select

import legacygen
import loggen
from bioc_webstats.errors import ConfigError, WebstatsError
from bioc_webstats.etl import ingest, legacy, legacy_rows, rule
from bioc_webstats.store import db
from bioc_webstats.store.models import DownloadRecord, IngestedObject, StatsPending
from test_ingest import assert_truth, loaded, make_settings, snapshot, stats_tables

KEY = b"test-key"  # make_settings' WEBSTATS_IP_HASH_KEY
DL = "/packages/3.18/bioc/src/contrib/limma_3.58.1.tar.gz"


def records(url: str) -> list[tuple[str, str, dt.date, int, int]]:
    with db.session_factory(url)() as s:
        rows = s.execute(
            select(
                DownloadRecord.category, DownloadRecord.package, DownloadRecord.day,
                DownloadRecord.ip_hash, DownloadRecord.downloads,
            )
        ).all()  # fmt: skip
    return sorted(
        (c, p, dt.date.fromisoformat(d) if isinstance(d, str) else d, h, n)
        for c, p, d, h, n in rows
    )


def ledger(url: str) -> dict[str, tuple[int, int, int]]:
    with db.session_factory(url)() as s:
        return {
            o.key: (o.lines_read, o.accepted, o.rejected) for o in s.scalars(select(IngestedObject))
        }


def import_rows(settings, path: Path, rows: list[dict], until: str = "2030-01-01",
                status_col: str = "statuscode", **kw) -> bool:  # fmt: skip
    legacygen.write_rows(path, rows, status_col)
    return legacy.import_files(settings, [str(path)], until=until, **kw)


def cli_env(monkeypatch, db_url: str, tmp_path: Path) -> None:
    """The environment of ``bioc-webstats`` run in this process (cli.main)."""
    for k, v in {
        "WEBSTATS_DATABASE_URL": db_url,
        "WEBSTATS_STATE_DIR": str(tmp_path / "state"),
        "WEBSTATS_ENV_FILE": "/dev/null",
        "WEBSTATS_IP_HASH_KEY": KEY.decode(),
    }.items():
        monkeypatch.setenv(k, v)


def hashed(ip: str) -> int:
    return rule.ip_hasher(KEY)(ip.encode())


# --- history + logs = the whole ---------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> legacygen.SplitCorpus:
    """Dec 28 2019 - Jan 21 2020 split on Jan 10: the legacy side has an errorcode file
    (2019) and a statuscode file (2020); January straddles the cut-over."""
    return legacygen.generate_split(
        tmp_path / "legacy", tmp_path / "logs", dt.date(2019, 12, 28), 25, dt.date(2020, 1, 10),
        files_per_day=4, lines_per_file=150, seed=5,
    )  # fmt: skip


@pytest.mark.parametrize(("reader", "workers"), [("native", "2"), ("python", "1")])
def test_history_plus_logs_equal_the_whole(db_url, tmp_path, corpus, reader, workers, monkeypatch):
    monkeypatch.setattr(legacy_rows, "_FORCE_PYTHON", reader == "python")  # passed to readers
    assert legacy_rows.reader_name() == reader
    settings = loaded(db_url, tmp_path, WEBSTATS_ETL_WORKERS=workers,
                      WEBSTATS_ETL_LOGS_SINCE="2020-01-10")  # fmt: skip
    names = sorted(p.name for p in corpus.legacy_files)
    assert names == ["download_db_2019.sqlite", "download_db_2020.sqlite"]
    with sqlite3.connect(corpus.legacy_files[0]) as con:  # the old column name before 2020
        assert "errorcode" in {r[1] for r in con.execute("PRAGMA table_info(access_log)")}
    # the same clients on both sides of the cut-over: a sum of the halves would be wrong
    assert corpus.clients_legacy & corpus.clients_logs
    files = [str(p) for p in corpus.legacy_files]
    assert legacy.import_files(settings, files, unit_rows=700) is True
    assert ingest.run(settings, source=str(tmp_path / "logs")) is True
    assert_truth(db_url, corpus.truth)
    with db.session_factory(db_url)() as s:
        total = s.scalar(select(func.sum(DownloadRecord.downloads)))
        assert total == corpus.counted_legacy + corpus.counted_logs == corpus.truth.counted
        assert s.scalar(select(func.count()).select_from(StatsPending)) == 0
        assert db.get_valid_thru(s) >= dt.date(2020, 1, 21)
    january = {k: v for k, v in corpus.truth.category.items() if k[1:] == (2020, 1)}
    assert january and all(ips > 0 for ips, _ in january.values())
    # the units: several per file, each in the ledger once, none counted as a log object
    keys = [k for k in ledger(db_url) if k.startswith("legacy/")]
    assert sum(k.endswith("/file") for k in keys) == 2 and len(keys) > 6


def test_unsplit_corpus_as_logs_equals_the_same_truth(tmp_path):
    """The generator's other half: every request as a log line gives the same truth."""
    whole = legacygen.generate_split(
        None, tmp_path / "all", dt.date(2019, 12, 28), 25, None, files_per_day=4,
        lines_per_file=150, seed=5,
    )  # fmt: skip
    split = legacygen.generate_split(
        tmp_path / "legacy", tmp_path / "logs", dt.date(2019, 12, 28), 25, dt.date(2020, 1, 10),
        files_per_day=4, lines_per_file=150, seed=5,
    )  # fmt: skip
    assert whole.truth.package == split.truth.package
    url = f"sqlite:///{tmp_path / 'whole.sqlite3'}"
    db.upgrade(url)
    settings = loaded(url, tmp_path)
    assert ingest.run(settings, source=str(tmp_path / "all"))
    assert_truth(url, whole.truth)


# --- the rule, row by row ---------------------------------------------------------------------


@pytest.fixture
def sqlite_settings(tmp_path):
    url = f"sqlite:///{tmp_path / 'webstats.sqlite3'}"
    db.upgrade(url)
    yield loaded(url, tmp_path)
    db.dispose_engine(url)


def test_proxy_chain_is_its_first_address_hashed_like_a_log_ip(db_url, tmp_path):
    settings = loaded(db_url, tmp_path)
    rows = [
        legacygen.row(ips="203.0.113.5, 10.0.0.7"),
        legacygen.row(ips=" 203.0.113.5 ,10.1.1.1, 10.2.2.2"),
        legacygen.row(ips="203.0.113.5"),
        legacygen.row(ips="2001:db8::5, 10.0.0.7"),
        legacygen.row(ips="203.0.113.5 10.0.0.7"),  # a chain logged with spaces only
        legacygen.row(ips="203.0.113.5\t10.0.0.7 ,10.1.1.1"),
    ]
    assert import_rows(settings, tmp_path / "download_db_2024.sqlite", rows)
    got = records(db_url)
    assert got == sorted([
        ("bioc", "limma", dt.date(2024, 1, 30), hashed("203.0.113.5"), 5),
        ("bioc", "limma", dt.date(2024, 1, 30), hashed("2001:db8::5"), 1),
    ])  # fmt: skip
    # the same client in a log line of the same month: one distinct IP over both sources
    logs = tmp_path / "logs"
    logs.mkdir()
    line = loggen.log_line(uri=DL, ip="203.0.113.5", date="2024-01-31", time="08:00:00")
    (logs / f"{loggen.DIST}.2024-01-31-08.a1.gz").write_bytes(loggen.log_bytes(line))
    assert ingest.run(settings, source=str(logs))
    pkg, cat = stats_tables(db_url)
    assert pkg[("bioc", "limma", 2024, 1)] == (2, 7)
    assert cat[("bioc", 2024, 1)] == (2, 7)


def test_the_client_is_the_first_element_but_placeholders(sqlite_settings, tmp_path):
    """``unknown`` (a proxy's word for a client it does not know) was hashed as the client of
    a chain: every such row of the history one distinct IP; a port a proxy added made each port
    another client; an empty or ``-`` element before the address made the row malformed."""
    chains = {
        "unknown, 198.51.100.7": "198.51.100.7",
        ", 198.51.100.7": "198.51.100.7",
        "-, 198.51.100.7": "198.51.100.7",
        "198.51.100.7:5678": "198.51.100.7",
        "Unknown , 198.51.100.7:80": "198.51.100.7",
        "crawler.example.org, 198.51.100.8": "crawler.example.org",  # a client, as written
        "unknown, 192.0.2.9": "192.0.2.9",
        "[2001:db8::9]:443": "2001:db8::9",
        "2001:db8::9, 10.0.0.7": "2001:db8::9",
        "crawler.example.org": "crawler.example.org",  # no address: still one client
    }
    rows = [legacygen.row(ips=chain) for chain in chains]
    rows.append(legacygen.row(ips="-, "))  # no client at all: malformed
    assert import_rows(sqlite_settings, tmp_path / "download_db_2024.sqlite", rows)
    counted = Counter(hashed(client) for client in chains.values())
    got = records(sqlite_settings.database_url)
    assert {(r[3], r[4]) for r in got} == set(counted.items())
    assert sum(r[4] for r in got) == len(chains)


def test_absolute_urls_and_query_strings_test_the_path(sqlite_settings, tmp_path):
    counted = [
        "http://bioconductor.org" + DL,
        "https://master.bioconductor.org//packages/release/bioc/bin/windows/contrib/4.3/"
        "limma_3.58.1.zip?raw=true",
        DL + "?x=/packages/3.18/bioc/src/contrib/edgeR_1.0.tar.gz",
        DL + "?",
        "HTTP://BIOCONDUCTOR.ORG:80" + DL,
    ]
    not_counted = [
        "http://bioconductor.org/packages/3.18/bioc/src/contrib/PACKAGES?limma_1.0.tar.gz",
        "/packages/3.18/bioc/src/contrib/Archive/limma/limma_1.0.tar.gz",
        "http://bioconductor.org",
        "/index.html?/packages/3.18/bioc/src/contrib/limma_3.58.1.tar.gz",
        "bioconductor.org" + DL,  # no scheme: not a path either
        "/packages/3.18/bioc/src/contrib/limma_3.58.1.tgz",  # src/contrib holds .tar.gz only
    ]
    rows = [legacygen.row(url=u, ips=f"192.0.2.{i}") for i, u in enumerate(counted + not_counted)]
    assert import_rows(sqlite_settings, tmp_path / "download_db_2024.sqlite", rows)
    got = records(sqlite_settings.database_url)
    assert {(c, p) for c, p, *_ in got} == {("bioc", "limma")}
    assert sum(n for *_, n in got) == len(counted)
    assert {h for *_, h, _ in got} == {hashed(f"192.0.2.{i}") for i in range(len(counted))}


@pytest.mark.parametrize("status_col", ["errorcode", "statuscode"])
def test_status_column_old_and_new_name_method_as_logged(sqlite_settings, tmp_path, status_col):
    rows = [legacygen.row(status=s, ips=f"192.0.2.{i}") for i, s in
            enumerate(["200", "301", "302", "307", "308"])]  # fmt: skip
    rows += [legacygen.row(status=s) for s in ["304", "404", "206", "500"]]
    rows += [legacygen.row(method=m) for m in ["HEAD", "POST", "get", None]]
    rows += [legacygen.row(status=s) for s in ["-", "", None, "2OO", "2" * 5000]]  # malformed
    path = tmp_path / "download_db_2015.sqlite"
    assert import_rows(sqlite_settings, path, rows, status_col=status_col)
    got = records(sqlite_settings.database_url)
    assert sum(n for *_, n in got) == 5
    assert len(got) == 5  # five clients
    unit = {k: v for k, v in ledger(sqlite_settings.database_url).items() if "/rows-" in k}
    assert list(unit.values()) == [(len(rows), 5, 5)]  # rows read, downloads, malformed


def test_a_file_with_both_status_columns_reads_errorcode_where_statuscode_is_empty(
    sqlite_settings, tmp_path
):
    """A year file whose table got a statuscode column added beside errorcode (not renamed):
    rows of before have only errorcode, rows of after only statuscode, and a row with both
    is judged by statuscode."""
    path = tmp_path / "download_db_2020.sqlite"
    con = legacygen.create(path, "errorcode")
    con.execute("ALTER TABLE access_log ADD COLUMN statuscode TEXT")
    cases = [  # (errorcode, statuscode), downloads
        ("200", None), ("200", ""), (None, "200"), ("", "200"), ("404", "200"),  # 5
        ("200", "404"), ("404", None), (None, None), ("-", ""),
    ]  # fmt: skip
    with con:
        for i, (err, status) in enumerate(cases):
            r = legacygen.row(ips=f"192.0.2.{i}", day="30/Jan/2020")
            r.pop("status")
            con.execute(
                "INSERT INTO access_log (ips, day_month_year, method, url, errorcode, statuscode)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (r["ips"], r["day_month_year"], r["method"], r["url"], err, status),
            )
    con.close()
    assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01")
    got = records(sqlite_settings.database_url)
    assert {h for *_, h, _ in got} == {hashed(f"192.0.2.{i}") for i in range(5)}
    unit = {k: v for k, v in ledger(sqlite_settings.database_url).items() if "/rows-" in k}
    assert list(unit.values()) == [(len(cases), 5, 2)]  # rows read, downloads, malformed


def test_the_day_is_the_local_day_as_logged(db_url, tmp_path):
    settings = loaded(db_url, tmp_path)
    rows = [
        # 23:30 in Seattle is the next day in UTC: still January 31
        legacygen.row(day="31/Jan/2020", time="23:30:00", offset="-0800"),
        # 00:10 in Paris is the day before in UTC: still February 1
        legacygen.row(day="01/Feb/2020", time="00:10:00", offset="+0100", ips="192.0.2.9"),
    ]
    assert import_rows(settings, tmp_path / "download_db_2020.sqlite", rows)
    assert [r[2] for r in records(db_url)] == [dt.date(2020, 1, 31), dt.date(2020, 2, 1)]
    pkg, _ = stats_tables(db_url)
    assert pkg[("bioc", "limma", 2020, 1)] == (1, 1)
    assert pkg[("bioc", "limma", 2020, 2)] == (1, 1)
    assert pkg[("bioc", "limma", 2020, 0)] == (2, 2)
    with db.session_factory(db_url)() as s:  # ValidThru: the newest record, as for logs
        assert db.get_valid_thru(s) == dt.date(2020, 2, 1)


def test_old_parser_columns_are_not_trusted(sqlite_settings, tmp_path):
    rows = [
        legacygen.row(package="edgeR"),  # the url says limma
        {
            **legacygen.row(url="/packages/release/bioc/html/limma.html", package="limma"),
            "biocrepo": "bioc",
            "pkgtype": "source",
        },
    ]
    assert import_rows(sqlite_settings, tmp_path / "download_db_2024.sqlite", rows)
    assert [(c, p, n) for c, p, _, _, n in records(sqlite_settings.database_url)] == [
        ("bioc", "limma", 1)
    ]


def test_malformed_rows_are_counted_not_fatal(sqlite_settings, tmp_path, caplog):
    bad = [
        legacygen.row(day="2024-01-30"), legacygen.row(day="30/jan/2024"),
        legacygen.row(day="31/Feb/2024"), legacygen.row(day=None), legacygen.row(day="3/Jan/2024"),
        legacygen.row(ips=""), legacygen.row(ips=None), legacygen.row(ips="-"),
        legacygen.row(ips="-, "), legacygen.row(url="/" + "x" * 9000),
        legacygen.row(day="31/Dec/1999"), legacygen.row(day="15/Jun/1995"),
    ]  # fmt: skip
    caplog.set_level(logging.INFO, "bioc_webstats")
    rows = [legacygen.row(), *bad, legacygen.row(ips="192.0.2.77")]
    assert import_rows(sqlite_settings, tmp_path / "download_db_2024.sqlite", rows)
    unit = {k: v for k, v in ledger(sqlite_settings.database_url).items() if "/rows-" in k}
    assert list(unit.values()) == [(14, 2, 12)]
    # (a day before 2000 was "on or after the cut-over": the codes of a bad day are negative)
    assert (
        "12 malformed (day_month_year not a day like 17/Sep/2023 (from 2000 on): 7" in caplog.text
    )
    assert ", 0 dated on or after 2030-01-01" in caplog.text
    assert "no client address in ips: 4" in caplog.text
    assert "too long (url or ips over 8 KiB, any value over 4 MiB): 1" in caplog.text


def test_cutover_day_until_or_logs_since_or_refused(db_url, tmp_path, monkeypatch, capsys):
    rows = [legacygen.row(day=f"{d:02d}/Jan/2020", ips=f"192.0.2.{d}") for d in (9, 10, 11)]
    path = tmp_path / "download_db_2020.sqlite"
    legacygen.write_rows(path, rows)
    days = lambda: sorted({r[2].day for r in records(db_url)})  # noqa: E731
    settings = loaded(db_url, tmp_path)
    with pytest.raises(WebstatsError, match=r"--until YYYY-MM-DD or set etl/logs_since"):
        legacy.import_files(settings, [str(path)])
    assert ledger(db_url) == {}
    assert legacy.import_files(settings, [str(path)], until="2020-01-10")
    assert days() == [9]
    # etl/logs_since is the default; a later cut-over changes the unit: refused, or replaced
    later = make_settings(db_url, tmp_path, WEBSTATS_ETL_LOGS_SINCE="2020-01-11")
    assert legacy.import_files(later, [str(path)]) is False
    assert days() == [9]
    assert legacy.import_files(later, [str(path)], replace=True)
    assert days() == [9, 10]
    # an --until after etl/logs_since would count the days between in both sources: refused
    with pytest.raises(
        ConfigError,
        match=r"^import legacy-db: --until 2020-01-12 is after etl/logs_since 2020-01-11, from "
        r"which the log ETL counts: the days between would be counted twice; give --until "
        r"2020-01-11 or earlier",
    ):
        legacy.import_files(later, [str(path)], until="2020-01-12", replace=True)
    assert days() == [9, 10]
    assert legacy.import_files(later, [str(path)], until="2020-01-11")  # the same day: fine
    bad = make_settings(db_url, tmp_path, WEBSTATS_ETL_LOGS_SINCE="2020-13-01")
    with pytest.raises(
        ConfigError,
        match=r"^parameter etl/logs_since must be a date YYYY-MM-DD from 1990-01-01 to 2999-12-31,",
    ):
        legacy.import_files(bad, [str(path)])
    # the command line: one line, exit 1, no traceback
    from bioc_webstats import cli

    cli_env(monkeypatch, db_url, tmp_path)
    monkeypatch.delenv("WEBSTATS_ETL_LOGS_SINCE", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["import", "legacy-db", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("bioc-webstats: error: import legacy-db: no cut")
    with pytest.raises(SystemExit) as exc:
        cli.main(["import", "legacy-db", "--until", "soon", str(path)])
    assert exc.value.code == 2 and "not a date YYYY-MM-DD" in capsys.readouterr().err


# --- broken files -------------------------------------------------------------------------


def good_db(path: Path, n: int = 40, day: str = "30/Jan/2024") -> Path:
    return legacygen.write_rows(
        path, [legacygen.row(day=day, ips=f"198.51.100.{i % 50}") for i in range(n)]
    )


def test_broken_files_fail_alone(db_url, tmp_path, caplog, monkeypatch, capsys):
    settings = loaded(db_url, tmp_path)
    d = tmp_path / "in"
    d.mkdir()
    good = good_db(d / "download_db_2024.sqlite")
    bad: dict[str, str] = {}
    (d / "notes.sqlite").write_text("this is not a database\n" * 10)
    bad["notes.sqlite"] = "not an SQLite database"
    (d / "empty.sqlite").write_bytes(b"")
    bad["empty.sqlite"] = "empty file (0 bytes)"
    with sqlite3.connect(d / "other.sqlite") as con:
        con.execute("CREATE TABLE other (x)")
    bad["other.sqlite"] = "no table access_log"
    with sqlite3.connect(d / "columns.sqlite") as con:
        con.execute("CREATE TABLE access_log (ips, day_month_year, url)")
    bad["columns.sqlite"] = "no column method, statuscode (or errorcode)"
    big = good_db(d / "download_db_2023.sqlite", n=3000, day="30/Jan/2023")
    half = d / "truncated.sqlite"
    half.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    bad["truncated.sqlite"] = "truncated: its header says"
    corrupt = d / "corrupt.sqlite"
    data = bytearray(big.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8192] = os.urandom(8192)  # pages of junk
    corrupt.write_bytes(bytes(data))
    bad["corrupt.sqlite"] = "malformed"
    bad["missing.sqlite"] = "No such file"
    (d / "adir.sqlite").mkdir()
    bad["adir.sqlite"] = "not a file"
    with sqlite3.connect(d / "view.sqlite") as con:
        con.execute(f"CREATE TABLE t ({', '.join(legacygen.COLUMNS)})")
        con.execute("CREATE VIEW access_log AS SELECT * FROM t")
    bad["view.sqlite"] = "access_log is a view, not a table"
    with sqlite3.connect(d / "norowid.sqlite") as con:
        cols = ", ".join(legacygen.COLUMNS)
        con.execute(f"CREATE TABLE access_log ({cols}, PRIMARY KEY (ips)) WITHOUT ROWID")
    bad["norowid.sqlite"] = "no rowid"
    with sqlite3.connect(d / "schema.sqlite") as con:  # read whole, it took 2x its size
        cols = ", ".join(legacygen.COLUMNS)
        con.execute(f"CREATE TABLE access_log ({cols} /* {'x' * (5 << 20)} */)")
    bad["schema.sqlite"] = "its schema is larger than 4 MiB"
    (d / "again").mkdir()
    shutil.copy(good, d / "again" / good.name)  # its name is the file's identity
    bad["again/download_db_2024.sqlite"] = "the same name as"
    shutil.copy(good, d / "copy_2024.sqlite")  # the same rows under another name
    bad["copy_2024.sqlite"] = "the same database under another name"
    big.unlink()
    caplog.set_level(logging.INFO, "bioc_webstats")
    paths = [str(good)] + [str(d / n) for n in bad]
    again = f"{d}/../{d.name}/./{good.name}"
    paths.insert(1, again)  # the same file again: read once
    assert legacy.import_files(settings, paths, until="2030-01-01", unit_rows=500) is False
    assert f"{again}: the same file as {good}, given before: read once" in caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for name, why in bad.items():
        mine = [m for m in errors if str(d / name) in m.split(": ")[0]]
        assert len(mine) == 1 and why in mine[0], (name, errors)
    assert len(errors) == len(bad)
    assert f"{len(bad) + 1} files ({len(bad)} failed" in caplog.text
    got = ledger(db_url)
    assert "legacy/download_db_2024.sqlite/file" in got
    assert not any(k.startswith(("legacy/notes", "legacy/truncated")) for k in got)
    assert "legacy/corrupt.sqlite/file" not in got
    assert sum(n for *_, n in records(db_url)) == 40 + sum(
        v[1] for k, v in got.items() if k.startswith("legacy/corrupt.sqlite/rows-")
    )
    # the command line: exit 1, one line at the end, no traceback
    from bioc_webstats import cli

    cli_env(monkeypatch, db_url, tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(["import", "legacy-db", "--until", "2030-01-01", str(d / "notes.sqlite")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    assert "notes.sqlite: not an SQLite database; not imported" in caplog.text
    assert err.strip().splitlines()[-1].startswith("bioc-webstats: error: import legacy-db: some")


def _hot_journal(path: Path) -> None:
    """A copy of a file and its -journal taken during a write (an interrupted write)."""
    src = path.with_name("src-" + path.name)
    good_db(src, n=2000)
    con = sqlite3.connect(src, isolation_level=None)
    con.execute("PRAGMA cache_size=1")  # pages reach the file before the commit
    con.execute("BEGIN")
    con.execute("UPDATE access_log SET ips = '203.0.113.9'")
    shutil.copy(src, path)
    shutil.copy(src.with_name(src.name + "-journal"), path.with_name(path.name + "-journal"))
    con.execute("ROLLBACK")
    con.close()
    src.unlink()


def test_a_file_a_live_writer_holds_says_so(sqlite_settings, tmp_path, caplog, monkeypatch):
    """A file the legacy server is writing (its lock and its -journal held) was said to hold
    "an interrupted write": a hint to remove the live writer's journal, which can corrupt
    it. It now says another process is writing it, and fails alone."""
    path = good_db(tmp_path / "download_db_2024.sqlite")
    real = legacy.open_ro

    def impatient(p: Path) -> sqlite3.Connection:  # a lock held: no 30 s wait in a test
        con = real(p)
        con.execute("PRAGMA busy_timeout = 50")
        return con

    monkeypatch.setattr(legacy, "open_ro", impatient)
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN EXCLUSIVE")
        writer.execute("UPDATE access_log SET ips = '203.0.113.9'")
        assert path.with_name(path.name + "-journal").exists()
        caplog.set_level(logging.ERROR, "bioc_webstats")
        assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01") is False
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert "database is locked); another process is writing it" in caplog.text, caplog.text
    assert "interrupted write" not in caplog.text
    assert not records(sqlite_settings.database_url)


def test_tables_whose_rows_are_no_file_rows_fail_alone(sqlite_settings, tmp_path, caplog):
    """Found by a probe: an FTS5 table over a view read the view's rows (an endless view:
    the import hung); columns named rowid, _rowid_ and oid hid the rowid (a traceback that
    stopped the whole import); a name with a newline forged a second log line; an
    interrupted write's journal said only "attempt to write a readonly database"."""
    d = tmp_path / "in"
    d.mkdir()
    good = good_db(d / "download_db_2024.sqlite")
    bad: dict[str, str] = {}
    with sqlite3.connect(d / "fts.sqlite") as con:
        con.execute(
            "CREATE VIEW v AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
            "SELECT x AS r, '1.2.3.4' ips, '30/Jan/2024' day_month_year, 'GET' method, "
            f"'{DL}' url, '200' statuscode FROM c"
        )
        con.execute(
            "CREATE VIRTUAL TABLE access_log USING fts5(ips, day_month_year, method, url, "
            "statuscode, content='v', content_rowid='r')"
        )
    bad["fts.sqlite"] = "access_log is a virtual table, not a table"
    with sqlite3.connect(d / "shadowed.sqlite") as con:
        con.execute(
            "CREATE TABLE access_log (rowid, _rowid_, oid, ips, day_month_year, method, url, "
            "statuscode)"
        )
        con.execute(f"INSERT INTO access_log VALUES ('a', 'b', 'c', '1.2.3.4', '30/Jan/2024', "
                    f"'GET', '{DL}', '200')")  # fmt: skip
    bad["shadowed.sqlite"] = "columns named rowid, _rowid_ and oid"
    _hot_journal(d / "hot.sqlite")
    bad["hot.sqlite"] = "a -journal file beside it holds an interrupted write"
    caplog.set_level(logging.INFO, "bioc_webstats")
    newline = d / "download_db_2023\nforged: imported.sqlite"
    shutil.copy(good, newline)
    paths = [str(good), *(str(d / n) for n in bad), str(newline)]
    assert legacy.import_files(sqlite_settings, paths, until="2030-01-01") is False
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for name, why in bad.items():
        mine = [m for m in errors if str(d / name) in m.split(": ")[0]]
        assert len(mine) == 1 and why in mine[0], (name, errors)
    assert len(errors) == len(bad) + 1
    assert "\n" not in errors[-1] and "its name has a control character" in errors[-1]
    assert f"{len(paths)} files ({len(paths) - 1} failed" in caplog.text
    pkg, _ = stats_tables(sqlite_settings.database_url)
    assert pkg[("bioc", "limma", 2024, 1)] == (40, 40)


def test_a_wal_file_in_a_read_only_directory_says_why(tmp_path):
    """A file in WAL mode where SQLite cannot create its -shm (a read-only mount, here bound
    in a mount namespace of its own): "unable to open database file" alone said nothing of
    why, for a file any sqlite3 shell opens elsewhere."""
    d = tmp_path / "ro"
    d.mkdir()
    path = good_db(d / "download_db_2024.sqlite")
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode=wal").fetchone() == ("wal",)
    assert not path.with_name(path.name + "-wal").exists()  # closed: checkpointed, removed
    code = (
        "import sys\nfrom pathlib import Path\nfrom bioc_webstats.etl import legacy\n"
        "try:\n    legacy.inspect(Path(sys.argv[1]))\n"
        "except legacy.LegacyFileError as exc:\n    print(exc)\n"
    )
    ro = f'mount --bind {d} {d} && mount -o remount,bind,ro {d} && exec "$0" -c "$1" "$2"'
    out = subprocess.run(
        ["unshare", "--mount", "sh", "-c", ro, sys.executable, code, str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "not a readable SQLite database (unable to open database file); it is in WAL mode, "
        "and SQLite could not create its -shm file beside it (a read-only directory?): copy "
        "it, with its -wal if any, where the import may write"
    )
    legacy.inspect(path)  # where it may: read


def test_a_column_named_rowid_and_a_generated_column(sqlite_settings, tmp_path):
    """A column named rowid hides SQLite's rowid from ``rowid`` (not from ``_rowid_``); a
    generated column is a column (PRAGMA table_info does not list it)."""
    path = tmp_path / "download_db_2024.sqlite"
    with sqlite3.connect(path) as con:
        con.execute(
            "CREATE TABLE access_log (rowid TEXT, ips, day_month_year, method, statuscode, "
            "path, url TEXT GENERATED ALWAYS AS ('http://h' || path) VIRTUAL)"
        )
        con.executemany(
            "INSERT INTO access_log (rowid, ips, day_month_year, method, statuscode, path) "
            "VALUES (?, ?, '30/Jan/2024', 'GET', '200', ?)",
            [(v, f"198.51.100.{i}", DL) for i, v in enumerate(["a", None, "1.5", "z"])],
        )
    assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01", unit_rows=2)
    pkg, _ = stats_tables(sqlite_settings.database_url)
    assert pkg[("bioc", "limma", 2024, 1)] == (4, 4)
    keys = sorted(
        k.rsplit("/", 1)[1] for k in ledger(sqlite_settings.database_url) if "/rows-" in k
    )
    assert keys == ["rows-1-2", "rows-3-4"]


def test_negative_rowids_are_units_like_any_other(sqlite_settings, tmp_path, caplog):
    """Keys ``rows--10--9`` were not read back as ranges: rows appended later were imported
    again with the old ones (counted twice)."""
    path = tmp_path / "download_db_2024.sqlite"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE access_log (ips, day_month_year, method, url, statuscode)")
        con.executemany(
            "INSERT INTO access_log (rowid, ips, day_month_year, method, url, statuscode) "
            "VALUES (?, ?, '30/Jan/2024', 'GET', ?, '200')",
            [(-10, "198.51.100.1", DL), (-9, "198.51.100.2", DL)],
        )
    assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01")
    with sqlite3.connect(path) as con:
        con.execute(
            "INSERT INTO access_log VALUES ('198.51.100.3', '31/Jan/2024', 'GET', ?, '200')", (DL,)
        )
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01")
    assert "1 imported, 0 replaced, 1 unchanged" in caplog.text
    keys = sorted(
        k.rsplit("/", 1)[1] for k in ledger(sqlite_settings.database_url) if "/rows-" in k
    )
    assert keys == ["rows--10--9", "rows--8--8"]  # (SQLite appends at the largest + 1)
    assert sum(n for *_, n in records(sqlite_settings.database_url)) == 3


def test_a_wal_file_the_import_left_empty_is_no_change(sqlite_settings, tmp_path, caplog):
    """Reading a WAL-mode file leaves an empty -wal beside it: the next import read the whole
    file again, as changed."""
    path = good_db(tmp_path / "download_db_2024.sqlite")
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode=wal").fetchone()[0] == "wal"
    con.close()
    assert not path.with_name(path.name + "-wal").exists()
    assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01")
    assert path.with_name(path.name + "-wal").stat().st_size == 0
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01")
    assert "imported before and unchanged since" in caplog.text


# --- exactly once ---------------------------------------------------------------------------


def test_a_copy_under_another_name_is_refused_in_a_later_import(sqlite_settings, tmp_path, caplog):
    """A file's name is its identity in the ledger; a copy of an imported database under
    another name would count every download twice: it is refused, nothing of it stored."""
    rows = [legacygen.row(ips=f"192.0.2.{i}") for i in range(30)]
    first = tmp_path / "download_db_2020.sqlite"
    assert import_rows(sqlite_settings, first, rows, unit_rows=10)
    url = sqlite_settings.database_url
    before = records(url), stats_tables(url)
    copy = tmp_path / "elsewhere" / "download_db_2020_copy.sqlite"
    copy.parent.mkdir()
    shutil.copy(first, copy)
    caplog.set_level(logging.ERROR, "bioc_webstats")
    assert (
        legacy.import_files(sqlite_settings, [str(copy)], until="2030-01-01", unit_rows=10) is False
    )
    assert (records(url), stats_tables(url)) == before
    assert not [k for k in ledger(url) if "_copy" in k]
    assert "its first 10 rows are those of download_db_2020.sqlite, imported before" in caplog.text
    # a ledger of a release that kept no first rows: its units tell the copy
    with db.session_factory(url).begin() as s:
        s.execute(delete(IngestedObject).where(IngestedObject.key.endswith("/head")))
    caplog.clear()
    assert (
        legacy.import_files(sqlite_settings, [str(copy)], until="2030-01-01", unit_rows=10) is False
    )
    assert (records(url), stats_tables(url)) == before
    assert "give exactly the downloads of download_db_2020.sqlite's" in caplog.text
    # and an import of the original (unchanged, skipped) keeps its first rows again
    assert legacy.import_files(sqlite_settings, [str(first)], until="2030-01-01", unit_rows=10)
    assert legacy.heads_key(first.name) in ledger(url)


def test_a_copy_is_refused_wherever_its_units_fall(sqlite_settings, tmp_path, caplog):
    """The check by units found a copy only when its units' ranges were the original's: a
    file first imported with fewer rows than a unit (the current year's early in January), or
    grown between imports, was counted twice under another name, exit 0. A copy, a newer and
    an older backup under other names are refused, and a copy given with its original in one
    command; a file of other rows is not."""
    url = sqlite_settings.database_url
    caplog.set_level(logging.ERROR, "bioc_webstats")
    rows = [legacygen.row(ips=f"192.0.2.{i}") for i in range(40)]
    first = tmp_path / "download_db_2024.sqlite"
    assert import_rows(sqlite_settings, first, rows[:10])  # one unit of 10 rows
    assert import_rows(sqlite_settings, first, rows[10:20])  # the server appended 10
    before = records(url), stats_tables(url)
    assert len(before[0]) == 20
    newer = tmp_path / "newer" / "download_db_2024.sqlite.bak"
    older = tmp_path / "older" / "download_db_2024_jan.sqlite"
    for path, n in ((tmp_path / "copy" / "download_db_2024_copy.sqlite", 20), (newer, 35),
                    (older, 5)):  # fmt: skip
        path.parent.mkdir()
        legacygen.write_rows(path, rows[:n])
        caplog.clear()
        assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01") is False
        assert (records(url), stats_tables(url)) == before, path
        assert f"rows are those of {first.name}, imported before" in caplog.text, caplog.text
    # both new, in one command: the second is refused, the first imported
    one, two = tmp_path / "a" / "download_db_2023.sqlite", tmp_path / "b" / "dl_2023.sqlite"
    others = [legacygen.row(ips=f"198.51.100.{i}", day="02/Feb/2023") for i in range(3)]
    for path in (one, two):
        path.parent.mkdir()
        legacygen.write_rows(path, others)
    caplog.clear()
    assert legacy.import_files(sqlite_settings, [str(one), str(two)], until="2030-01-01") is False
    assert f"rows are those of {one.name}, given before ({one})" in caplog.text
    assert len(records(url)) == 23
    # the original itself, grown again, goes on as before
    assert import_rows(sqlite_settings, first, rows[20:40])
    assert len(records(url)) == 43


def test_rerun_adds_nothing(db_url, tmp_path, corpus, caplog):
    settings = loaded(db_url, tmp_path, WEBSTATS_ETL_LOGS_SINCE="2020-01-10")
    files = [str(p) for p in corpus.legacy_files]
    assert legacy.import_files(settings, files, unit_rows=500)
    before = snapshot(db_url)
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert legacy.import_files(settings, files, unit_rows=500)
    assert snapshot(db_url) == before
    assert caplog.text.count("imported before and unchanged since") == 2
    # touched (a copy kept its bytes, not its mtime): every unit read again, all unchanged
    caplog.clear()
    for p in corpus.legacy_files:
        os.utime(p, ns=(1, 1))
    assert legacy.import_files(settings, files, unit_rows=999)  # the ranges are the ledger's
    assert snapshot(db_url)[:3] == before[:3]
    assert snapshot(db_url)[3]["data_version"] == before[3]["data_version"]
    assert "0 units imported (0 replaced)" in caplog.text and "0 refused" in caplog.text
    # the same file under another directory is the same file (its name is the key)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy2(corpus.legacy_files[0], copy)
    assert legacy.import_files(settings, [str(copy / corpus.legacy_files[0].name)])
    assert snapshot(db_url)[:3] == before[:3]


def test_rows_appended_later_become_new_units(db_url, tmp_path):
    settings = loaded(db_url, tmp_path)
    path = tmp_path / "download_db_2024.sqlite"
    rows = [legacygen.row(ips=f"198.51.100.{i}") for i in range(25)]
    assert import_rows(settings, path, rows[:10], unit_rows=4)
    assert sorted(k for k in ledger(db_url) if "/rows-" in k) == [
        "legacy/download_db_2024.sqlite/rows-1-4",
        "legacy/download_db_2024.sqlite/rows-5-8",
        "legacy/download_db_2024.sqlite/rows-9-10",
    ]
    # the old server appended rows: they go in as new units, the old ones are unchanged
    assert import_rows(settings, path, rows[10:], unit_rows=4)
    keys = sorted((k for k in ledger(db_url) if "/rows-" in k), key=lambda k: int(k.split("-")[-2]))
    assert [k.rsplit("/", 1)[1] for k in keys] == [
        "rows-1-4", "rows-5-8", "rows-9-10", "rows-11-14", "rows-15-18", "rows-19-22",
        "rows-23-25",
    ]  # fmt: skip
    pkg, _ = stats_tables(db_url)
    assert pkg[("bioc", "limma", 2024, 1)] == (25, 25)


def test_changed_rows_are_refused_unless_replace(db_url, tmp_path, caplog):
    settings = loaded(db_url, tmp_path)
    path = tmp_path / "download_db_2024.sqlite"
    assert import_rows(settings, path, [legacygen.row(ips=f"198.51.100.{i}") for i in range(9)],
                       unit_rows=3)  # fmt: skip
    before = snapshot(db_url)
    with sqlite3.connect(path) as con:  # rewritten in place: another package
        con.execute("UPDATE access_log SET url = replace(url, 'limma', 'edgeR') WHERE rowid = 5")
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert legacy.import_files(settings, [str(path)], until="2030-01-01") is False
    assert snapshot(db_url) == before
    refused = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refused) == 2 and "rows 4-6 changed since they were imported" in refused[0]
    assert "--replace" in refused[0]
    assert legacy.import_files(settings, [str(path)], until="2030-01-01", replace=True)
    pkg, _ = stats_tables(db_url)
    assert pkg[("bioc", "limma", 2024, 1)] == (8, 8)
    assert pkg[("bioc", "edgeR", 2024, 1)] == (1, 1)
    assert sum(n for *_, n in records(db_url)) == 9


def test_a_moved_cut_over_day_is_one_line_a_file(db_url, tmp_path, caplog):
    """Imported with a cut-over day too early (a typo), then with the right one: every unit
    holding rows between the two was refused in a line of its own ("changed since", which
    they were not: ~670 lines for the real history). One line names the two days."""
    settings = loaded(db_url, tmp_path)
    path = tmp_path / "download_db_2024.sqlite"
    rows = [legacygen.row(day=f"{d:02d}/Feb/2024", ips=f"198.51.100.{d}") for d in range(1, 13)]
    assert import_rows(settings, path, rows, until="2024-01-15", unit_rows=3)
    assert sum(n for *_, n in records(db_url)) == 0
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert legacy.import_files(settings, [str(path)], until="2024-03-01", unit_rows=3) is False
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors  # the reason, then the file's line
    assert errors[0] == (
        f"{path}: 4 units changed since they were imported, with the cut-over day 2024-01-15 "
        "then and 2024-03-01 now; not imported: 'import legacy-db --replace' replaces their "
        "records (or --until 2024-01-15 keeps them)"
    )
    assert legacy.import_files(settings, [str(path)], until="2024-03-01", replace=True)
    assert sum(n for *_, n in records(db_url)) == 12


def test_a_moved_cut_over_day_is_said_beside_a_damaged_unit(tmp_path, caplog):
    """The units refused for the moved day were not said when a later unit was damaged."""
    f = legacy.LegacyFile(tmp_path / "download_db_2024.sqlite", "download_db_2024.sqlite")
    f.refused, f.until_before = 3, "2024-01-15"
    f.error = "rows 1001-1500: cannot read access_log: database disk image is malformed"
    summary = legacy.ImportSummary(until=dt.date(2024, 3, 1))
    caplog.set_level(logging.INFO, "bioc_webstats")
    legacy._finish_file(None, f, dt.date(2024, 3, 1), summary)
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert line.startswith(f"{f.path}: 3 units changed since they were imported, with the cut")
    assert summary.failures == [str(f.path)]


def test_legacy_ledger_rows_do_not_move_the_log_lookback(db_url, tmp_path):
    """The newest legacy unit (August) is later than the logs (June): if it counted, the
    look-back would start in late July and never read the June logs."""
    settings = loaded(db_url, tmp_path)
    path = tmp_path / "download_db_2024.sqlite"
    assert import_rows(settings, path, [legacygen.row(day="20/Aug/2024")], until="2024-09-01")
    with db.session_factory(db_url)() as s:
        assert s.scalar(select(func.max(IngestedObject.name_hour))) == dt.datetime(2024, 8, 20)
    from bioc_webstats.daily import status  # nor what `status` says of the log objects

    facts = status(settings)
    assert facts["objects_ingested"] == 0 and facts["newest_object_hour"] is None
    logs = tmp_path / "logs"
    truth = loggen.generate(logs, days=2, start=dt.date(2024, 6, 10), files_per_day=2,
                            lines_per_file=50)  # fmt: skip
    assert ingest.run(settings, source=str(logs))
    keys = set(ledger(db_url))
    assert set(truth.files) <= keys
    # and a late log file inside the logs' own look-back window is still picked up
    late = tmp_path / "logs" / f"{loggen.DIST}.2024-06-10-05.late.gz"
    late.write_bytes(loggen.log_bytes(loggen.log_line(date="2024-06-10", time="05:10:00")))
    assert ingest.run(settings, source=str(logs))
    assert late.name in set(ledger(db_url))


def test_units_cover_every_row_once_whatever_the_gaps(sqlite_settings, tmp_path):
    path = tmp_path / "download_db_2024.sqlite"
    legacygen.write_rows(path, [legacygen.row(ips=f"198.51.100.{i}") for i in range(30)])
    with sqlite3.connect(path) as con:
        con.execute("DELETE FROM access_log WHERE rowid BETWEEN 8 AND 19")
    assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01", unit_rows=5)
    units = {k: v for k, v in ledger(sqlite_settings.database_url).items() if "/rows-" in k}
    spans = sorted(tuple(map(int, k.rsplit("rows-", 1)[1].split("-"))) for k in units)
    # every unit starts at a row, none overlaps, the gap costs no unit
    assert spans == [(1, 5), (6, 10), (20, 24), (25, 29), (30, 30)]
    assert [units[legacy.unit_key(path.name, *s)][0] for s in spans] == [5, 2, 5, 5, 1]


def test_rowids_far_apart_cost_units_by_rows_not_by_span(sqlite_settings, tmp_path, caplog):
    """Rows at rowids 1, 2 and 2**62 (a hand-made or damaged file): the units followed the
    whole span, 2**62 / 100,000 of them, and the import grew until it ran out of memory."""
    path = tmp_path / "download_db_2024.sqlite"
    legacygen.write_rows(path, [legacygen.row(ips=f"198.51.100.{i}") for i in range(3)])
    with sqlite3.connect(path) as con:
        con.execute("UPDATE access_log SET rowid = ? WHERE rowid = 3", (2**62,))
        con.execute("UPDATE access_log SET rowid = ? WHERE rowid = 2", (10**9,))
    caplog.set_level(logging.INFO, "bioc_webstats")
    assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01")
    units = sorted(k for k in ledger(sqlite_settings.database_url) if "/rows-" in k)
    # fewer rows than a unit's least (1,000) in the first 100,000 rowids: the unit goes on
    # to the last row
    assert units == [legacy.unit_key(path.name, 1, 2**62)]
    pkg, _ = stats_tables(sqlite_settings.database_url)
    assert pkg[("bioc", "limma", 2024, 1)] == (3, 3)
    # appended after the far row: one more unit
    with sqlite3.connect(path) as con:
        con.execute(
            "INSERT INTO access_log (rowid, ips, day_month_year, method, url, statuscode)"
            " VALUES (?, '198.51.100.9', '30/Jan/2024', 'GET', ?, '200')",
            (2**62 + 10**6, DL),
        )
    assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01")
    assert len([k for k in ledger(sqlite_settings.database_url) if "/rows-" in k]) == 2
    pkg, _ = stats_tables(sqlite_settings.database_url)
    assert pkg[("bioc", "limma", 2024, 1)] == (4, 4)


def test_the_extreme_rowids_are_one_unit_and_the_next_file_goes_on(db_url, tmp_path):
    """Rows at the smallest and the largest rowid SQLite allows: the unit's span of rowids
    (2**64) went to the ledger as its size and overflowed PostgreSQL's BIGINT, which stopped
    the whole import with a line naming no file, the files after it not read."""
    settings = loaded(db_url, tmp_path)
    far = tmp_path / "download_db_2023.sqlite"
    legacygen.write_rows(far, [legacygen.row(day="10/Jan/2023") for _ in range(3)])
    with sqlite3.connect(far) as con:
        con.execute("UPDATE access_log SET rowid = ? WHERE rowid = 1", (-(2**63),))
        con.execute("UPDATE access_log SET rowid = ? WHERE rowid = 3", (2**63 - 1,))
    after = tmp_path / "download_db_2024.sqlite"
    legacygen.write_rows(after, [legacygen.row()])
    assert legacy.import_files(settings, [str(far), str(after)], until="2030-01-01")
    units = ledger(db_url)
    assert units[legacy.unit_key(far.name, -(2**63), 2**63 - 1)] == (3, 3, 0)
    pkg, _ = stats_tables(db_url)
    assert pkg[("bioc", "limma", 2023, 1)] == (1, 3)
    assert pkg[("bioc", "limma", 2024, 1)] == (1, 1)


def test_sparse_rowids_take_a_unit_per_hundredth_of_the_unit_rows(sqlite_settings, tmp_path):
    """Every row a million rowids from the next (a hand-made or rewritten file): a unit of
    100,000 rowids held one row, so a file of 10 million such rows meant 10 million ledger
    rows and transactions. A unit now holds at least unit_rows // 100 rows (here 1000 // 100
    = 10), never more than unit_rows."""
    path = tmp_path / "download_db_2024.sqlite"
    n = 205
    legacygen.write_rows(
        path, [legacygen.row(ips=f"198.51.{i // 250}.{i % 250}") for i in range(n)]
    )
    with sqlite3.connect(path) as con:
        con.execute("UPDATE access_log SET rowid = rowid * 1000000")
    assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01", unit_rows=1000)
    units = {k: v for k, v in ledger(sqlite_settings.database_url).items() if "/rows-" in k}
    spans = sorted(tuple(map(int, k.rsplit("rows-", 1)[1].split("-"))) for k in units)
    assert len(spans) == 21  # 20 of 10 rows, the last of 5
    assert spans[0] == (10**6, 10 * 10**6) and spans[-1] == (201 * 10**6, 205 * 10**6)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))  # none overlaps
    rows = [units[legacy.unit_key(path.name, *sp)][0] for sp in spans]
    assert rows == [10] * 20 + [5]
    pkg, _ = stats_tables(sqlite_settings.database_url)
    assert pkg[("bioc", "limma", 2024, 1)] == (n, n)
    # dense rowids: the units are those of before (1,000 rowids each)
    dense = tmp_path / "download_db_2023.sqlite"
    legacygen.write_rows(dense, [legacygen.row(day="10/Jan/2023") for _ in range(2500)])
    assert legacy.import_files(sqlite_settings, [str(dense)], until="2030-01-01", unit_rows=1000)
    keys = sorted(
        k for k in ledger(sqlite_settings.database_url) if dense.name in k and "/rows-" in k
    )
    assert keys == sorted(
        legacy.unit_key(dense.name, lo, hi) for lo, hi in [(1, 1000), (1001, 2000), (2001, 2500)]
    )


def test_rows_in_the_wal_file_are_imported(sqlite_settings, tmp_path, caplog):
    """A file in WAL mode with a writer still open: rows appended since the last import are
    in the -wal file only, the main file's size and mtime unchanged. The import skipped the
    file as "unchanged since" and lost them."""
    path = tmp_path / "download_db_2024.sqlite"
    legacygen.write_rows(path, [legacygen.row(ips=f"198.51.100.{i}") for i in range(5)])
    writer = sqlite3.connect(path)
    try:
        assert writer.execute("PRAGMA journal_mode=wal").fetchone()[0] == "wal"
        writer.execute("PRAGMA wal_autocheckpoint=0")  # the old server's rows stay in the -wal
        assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01")
        before = path.stat()
        writer.executemany(
            "INSERT INTO access_log (ips, day_month_year, method, url, statuscode)"
            " VALUES (?, '30/Jan/2024', 'GET', ?, '200')",
            [(f"203.0.113.{i}", DL) for i in range(3)],
        )
        writer.commit()
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (
            before.st_size,
            before.st_mtime_ns,
        )
        assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01")
    finally:
        writer.close()
    pkg, _ = stats_tables(sqlite_settings.database_url)
    assert pkg[("bioc", "limma", 2024, 1)] == (8, 8)


def test_names_that_are_not_utf8_fail_alone(sqlite_settings, tmp_path, caplog):
    """A file whose name is not UTF-8: one line, the good files imported; an extra column of
    access_log whose name is not UTF-8 is no reason to fail (a traceback stopped the whole
    import, the good file included)."""
    good = good_db(tmp_path / "download_db_2023.sqlite", n=10)
    odd_name = tmp_path / os.fsdecode(b"download_db_\xff2019.sqlite")
    shutil.copy(good, odd_name)
    odd_col = tmp_path / "download_db_2021.sqlite"
    with sqlite3.connect(odd_col) as con:
        con.execute(
            'CREATE TABLE access_log (ips, day_month_year, method, url, statuscode, "x\u00ff")'
        )
        con.executemany(
            "INSERT INTO access_log VALUES (?, '30/Jan/2024', 'GET', ?, '200', NULL)",
            [(f"203.0.113.{i}", DL) for i in range(4)],
        )
    con.close()
    raw = odd_col.read_bytes()
    assert raw.count("x\u00ff".encode()) == 1
    odd_col.write_bytes(raw.replace("x\u00ff".encode(), b"x\xff\xfe"))  # same length
    caplog.set_level(logging.INFO, "bioc_webstats")
    paths = [str(good), str(odd_name), str(odd_col)]
    assert not legacy.import_files(sqlite_settings, paths, until="2030-01-01")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "its name is not UTF-8" in errors[0], errors
    pkg, _ = stats_tables(sqlite_settings.database_url)
    assert pkg[("bioc", "limma", 2024, 1)] == (14, 14)


# --- the two loops -----------------------------------------------------------------------------


def test_native_and_python_readers_give_the_same_bytes(tmp_path):
    # make test builds the C reader: its absence is a failure
    assert legacy_rows._legacy is not None, "the C reader is not built (BIOC_WEBSTATS_PURE?)"
    assert legacy_rows._sqlite_api() is not None, "SQLite's functions not found by ctypes"
    stats = legacygen.generate_history(
        tmp_path / "h", dt.date(2019, 12, 30), dt.date(2020, 1, 3), 3000, seed=3, clients=500
    )
    odd = tmp_path / "download_db_2021.sqlite"
    weird = [
        legacygen.row(url="/x\tyz" + DL, ips="1.2.3.4\t5"), legacygen.row(url=DL + "\n"),
        legacygen.row(url="http://h" + DL, ips="\n1.2.3.4"), legacygen.row(url="/" + "y" * 9000),
        legacygen.row(ips="9" * 9000), legacygen.row(day=None, ips=None, status=None, method=None),
        legacygen.row(url=DL.encode() + b"\xff\xfe"), legacygen.row(ips=b"1.2.3.4\x00x"),
        legacygen.row(status=200), legacygen.row(status=200.0), legacygen.row(status=b"302"),
        legacygen.row(day="29/Feb/2020"), legacygen.row(day="29/Feb/2021"),
        # one C cache key "GET\0" "200" for both (a probe): the answer of the first, twice
        legacygen.row(method="GET\0", status="200"), legacygen.row(method="GET", status="\x00200"),
        # a day string past the C loop's DAY_MAX: malformed there before any callback
        legacygen.row(day="17/Sep/2023" + " " * 100),
    ]  # fmt: skip
    legacygen.write_rows(odd, weird * 3)
    downloads = 0
    for path in [*stats.files, odd]:
        f = legacy.inspect(path)
        until = dt.date(2020, 1, 2) if path != odd else dt.date(2030, 1, 1)
        for a in range(f.lo, f.hi + 1, 2500):
            args = (path, f.status_col, a, a + 2499)
            native = legacy_rows.read_unit(legacy_rows.Rule(KEY, until), *args)
            assert native == legacy_rows.read_unit_python(legacy_rows.Rule(KEY, until), *args)
            assert native.rows == min(f.hi, a + 2499) - a + 1
            downloads += native.downloads
    assert downloads > 0.5 * stats.downloads / 2  # about half the days are before until
    # date, long, status, ips, until, not GET+download status, not a download path
    one = legacy_rows.read_unit(
        legacy_rows.Rule(KEY, dt.date(2030, 1, 1)), odd, "statuscode", 1, 13
    )
    assert one.reasons == [2, 2, 1, 0, 0, 0, 3] and one.downloads == 5
    two = legacy_rows.read_unit(
        legacy_rows.Rule(KEY, dt.date(2030, 1, 1)), odd, "statuscode", 14, 15
    )
    assert two.reasons == [0, 0, 1, 0, 0, 1, 0]


def test_a_value_sqlite_would_hold_whole_is_an_over_long_row_and_the_rest_is_read(tmp_path):
    """A value over LOAD_MAX (a 300 MB url was loaded whole before the length check): SQLite
    refuses to load it, the row counts as too long, and the rows after it are read, by both
    loops alike: first, last, two in a row, in any of the five columns."""
    big = "z" * (legacy_rows.LOAD_MAX + 1)
    path = tmp_path / "download_db_2024.sqlite"
    rows = [
        legacygen.row(url="/" + big), legacygen.row(ips="192.0.2.9"),
        legacygen.row(ips=big), legacygen.row(day=big), legacygen.row(ips="192.0.2.8"),
        legacygen.row(method=big), legacygen.row(status=big),
        legacygen.row(ips="192.0.2.7"), legacygen.row(url=DL + "?" + big),
    ]  # fmt: skip
    legacygen.write_rows(path, rows)
    for lo, hi, downloads in ((1, 9, 3), (3, 8, 2), (2, 2, 1), (9, 9, 0), (6, 7, 0)):
        args = (path, "statuscode", lo, hi)
        native = legacy_rows.read_unit(legacy_rows.Rule(KEY, dt.date(2030, 1, 1)), *args)
        assert native == legacy_rows.read_unit_python(
            legacy_rows.Rule(KEY, dt.date(2030, 1, 1)), *args
        )
        assert native.rows == hi - lo + 1
        assert native.downloads == downloads, (lo, hi)
        assert native.reasons[legacy_rows.R_LONG] == hi - lo + 1 - downloads, (lo, hi)


@pytest.mark.parametrize("loop", ["read_unit", "read_unit_python"])
def test_a_huge_value_is_never_loaded(tmp_path, loop):
    """The peak memory of reading a unit with a 96 MB url is that of the same unit without it."""
    path = tmp_path / "download_db_2024.sqlite"
    legacygen.write_rows(path, [legacygen.row(), legacygen.row(url="/" + "z" * (96 << 20))])
    code = (
        "import re, datetime as dt; from pathlib import Path;"
        "from bioc_webstats.etl import legacy_rows as L;"
        "r = L.Rule(b'k', dt.date(2030, 1, 1));"
        f"L.{loop}(r, Path({str(path)!r}), 'statuscode', 1, 1);"  # the reader warmed up
        # VmHWM: this program's peak (ru_maxrss would carry the test process's through fork)
        "hwm = lambda: int(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read())[1]);"
        "before = hwm();"
        f"u = L.{loop}(r, Path({str(path)!r}), 'statuscode', 1, 2);"
        "after = hwm();"
        "print(u.rows, u.downloads, u.reasons[L.R_LONG], (after - before) >> 10)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    rows, downloads, long, grew_mib = map(int, done.stdout.split() or [-1] * 4)
    assert (rows, downloads, long) == (2, 1, 1), done.stderr[-2000:]
    assert grew_mib < 16, f"the peak memory grew by {grew_mib} MiB"


def test_the_python_loop_keeps_its_caches_and_rows_bounded(tmp_path):
    """The Python loop's rule caches grew with every url that was no download (only those
    of downloads were counted), and it fetched 4,096 rows at a time (4 GB of 1 MB rows)."""
    path = tmp_path / "download_db_2024.sqlite"
    urls = [f"/{'d' * 150}{i:06d}/x.html" for i in range(2000)]
    legacygen.write_rows(path, [legacygen.row(url=u) for u in urls])
    r = legacy_rows.Rule(KEY, dt.date(2030, 1, 1), cache_bytes=10_000)
    for lo in (1, 1001):
        got = legacy_rows.read_unit_python(r, path, "statuscode", lo, lo + 999)
        assert got.reasons[legacy_rows.R_PATH] == 1000
    assert len(r.dirs) + len(r.files) <= 2 * 1000  # the second unit's, not both
    big = tmp_path / "download_db_2023.sqlite"
    good_db(big, n=1000)
    with sqlite3.connect(big) as con:  # 1000 rows of 1 MB each, in a file of a few KB
        con.execute(f"ALTER TABLE access_log ADD COLUMN x TEXT DEFAULT '{'A' * (1 << 20)}'")
        con.execute("UPDATE access_log SET url = x")
    code = (
        "import resource, sys, datetime as dt; from pathlib import Path;"
        "resource.setrlimit(resource.RLIMIT_AS, (800 << 20, 800 << 20));"
        "from bioc_webstats.etl import legacy_rows as L;"
        f"u = L.read_unit_python(L.Rule(b'k', dt.date(2030, 1, 1)), Path({str(big)!r}),"
        "'statuscode', 1, 1000); print(u.rows, u.reasons[L.R_LONG])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["1000", "1000"], done.stderr[-2000:]


# --- the demo's take-over -----------------------------------------------------------------------


def test_demo_history_and_logs_give_their_truth(tmp_path):
    """molecule/shared/sample_data.py --history (what `make demo` deploys, shortened): the
    legacy databases through `import legacy-db`, the logs through `etl run`, with the cut-over
    day it writes as etl/logs_since: the statistics are its truth, with a Zipf-like spread."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "sample_data", Path(__file__).parents[1] / "molecule" / "shared" / "sample_data.py"
    )
    sample_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_data)
    out = tmp_path / "sample"
    out.mkdir()
    truth = sample_data.write_history(
        out, dt.date(2023, 11, 1), dt.date(2024, 1, 15), days=2, files_per_day=4,
        lines_per_file=150, seed=7,
    )  # fmt: skip
    assert (out / "cutover").read_text().strip() == truth["cutover"] == "2024-01-15"
    assert json.loads(json.dumps(truth)) == truth
    url = f"sqlite:///{tmp_path / 'demo.sqlite3'}"
    db.upgrade(url)
    settings = loaded(url, tmp_path, WEBSTATS_ETL_LOGS_SINCE=truth["cutover"])
    files = sorted(str(p) for p in (out / "legacy").glob("download_db_*.sqlite"))
    assert [Path(f).name for f in files] == ["download_db_2023.sqlite", "download_db_2024.sqlite"]
    assert legacy.import_files(settings, files)
    assert ingest.run(settings, source=str(out / "logs"))
    pkg, cat = stats_tables(url)
    assert pkg == {tuple(r[:4]): tuple(r[4:]) for r in truth["package"]}
    assert cat == {tuple(r[:3]): tuple(r[3:]) for r in truth["category"]}
    december = sorted((v[1] for k, v in pkg.items() if k[2:] == (2023, 12)), reverse=True)
    assert december[0] > 20 * december[len(december) // 2] and december[-1] <= 3


def test_one_writer_at_a_time(sqlite_settings, tmp_path, monkeypatch, capsys):
    """import legacy-db takes the writer lock of etl run: while one holds it, it stops at
    once with one line naming the holder, and changes nothing."""
    from bioc_webstats import cli

    path = good_db(tmp_path / "download_db_2024.sqlite")
    cli_env(monkeypatch, sqlite_settings.database_url, tmp_path)
    with cli.writer_lock(sqlite_settings, "etl run"):
        with pytest.raises(SystemExit) as exc:
            cli.main(["import", "legacy-db", "--until", "2030-01-01", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    assert "import legacy-db: not started, 'etl run' (pid" in err
    assert ledger(sqlite_settings.database_url) == {}
    with pytest.raises(SystemExit) as exc:
        cli.main(["import", "legacy-db", "--until", "2030-01-01", str(path)])
    assert exc.value.code == 0
    assert sum(n for *_, n in records(sqlite_settings.database_url)) == 40


def test_a_month_in_two_files_counts_both(db_url, tmp_path):
    """Each file's months are recomputed when the file is in; a later file with rows of the
    same month (the old server's year files overlap at new year) counts them too."""
    settings = loaded(db_url, tmp_path)
    a = legacygen.write_rows(
        tmp_path / "download_db_2019.sqlite",
        [legacygen.row(day="30/Dec/2019", ips="192.0.2.1")],
        "errorcode",
    )
    b = legacygen.write_rows(tmp_path / "download_db_2020.sqlite", [
        legacygen.row(day="31/Dec/2019", ips="192.0.2.2"),
        legacygen.row(day="31/Dec/2019", ips="192.0.2.1"),
        legacygen.row(day="02/Jan/2020", ips="192.0.2.1"),
    ])  # fmt: skip
    assert legacy.import_files(settings, [str(a), str(b)], until="2030-01-01")
    pkg, cat = stats_tables(db_url)
    assert pkg[("bioc", "limma", 2019, 12)] == (2, 3)
    assert pkg[("bioc", "limma", 2019, 0)] == (2, 3)
    assert pkg[("bioc", "limma", 2020, 1)] == (1, 1)
    assert cat[("bioc", 2019, 12)] == (2, 3)
    with db.session_factory(db_url)() as s:
        assert s.scalar(select(func.count()).select_from(StatsPending)) == 0


def test_readers_end_when_the_import_stops_early(tmp_path):
    """An import that stops part-way (an error, Ctrl-C) ends its reader processes: what they
    still send is dropped, none is left behind."""
    from killharness import alive, descendants

    path = good_db(tmp_path / "download_db_2024.sqlite", n=3000)
    tasks = [
        (f"k{lo}", str(path), ("statuscode", "rowid"), lo, lo + 99) for lo in range(1, 3001, 100)
    ]
    units = legacy_rows.read_all(tasks, KEY, dt.date(2030, 1, 1), workers=2)
    first = next(units)
    assert first.rows == 100 and first.downloads == 100

    def is_reader(pid: int) -> bool:
        try:
            return b"_reader_boot" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    readers = {p for p in descendants(os.getpid()) if is_reader(p)}
    assert len(readers) == 2 and all(alive(p) for p in readers)
    units.close()  # the importing process gives up
    assert not any(alive(p) for p in readers)


def test_the_first_rows_fingerprint_loads_no_huge_value(sqlite_settings, tmp_path):
    """The fingerprints of a file's first rows read its values as the readers do: a 96 MB url
    in the second row is not loaded (the readers call that row over-long), the fingerprint
    stops before it, and the file is imported (it failed: 'string or blob too big')."""
    path = tmp_path / "download_db_2024.sqlite"
    legacygen.write_rows(path, [legacygen.row(), legacygen.row(url="/" + "z" * (96 << 20))])
    code = (
        "import re; from pathlib import Path; from bioc_webstats.etl import legacy as L;"
        f"f = L.inspect(Path({str(path)!r}));"
        "hwm = lambda: int(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read())[1]);"
        "before = hwm(); heads = L.read_heads(f); after = hwm();"
        "print(sorted(heads), (after - before) >> 10)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split(" ", 1)[0] == "[1]", done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 16, done.stdout  # MiB the peak grew by
    assert legacy.import_files(sqlite_settings, [str(path)], until="2030-01-01")
    assert len(records(sqlite_settings.database_url)) == 1
