"""The text files of web-contract.md, byte for byte, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest

import webref
from bioc_webstats import create_app
from bioc_webstats.config import load_settings
from bioc_webstats.store import db

P = "/packages/stats/"


def make_client(db_url, monkeypatch):
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", db_url)
    return create_app(load_settings()).test_client()


def load(db_url, valid_thru, loader="direct"):
    with db.session_factory(db_url)() as s:
        webref.LOADERS[loader](s, valid_thru=valid_thru)


# ValidThru on the last day of a month, the first day of a month, Feb 29 (leap year end of
# month) and Dec 31 (the window is then the whole year and the data year is the old one).
VALID_THRU = ["2024-03-31", "2024-03-01", "2024-02-29", "2023-12-31"]


@pytest.mark.parametrize("loader", ["etl", "direct"])
@pytest.mark.parametrize("vt", VALID_THRU)
def test_every_text_file_matches_reference(db_url, clean_env, monkeypatch, vt, loader):
    """Raw records -> (the ETL's real recompute | a direct test-side aggregation) -> the web
    service's bytes == the reference's bytes from the same raw records."""
    valid_thru = dt.date.fromisoformat(vt)
    load(db_url, valid_thru, loader)
    client = make_client(db_url, monkeypatch)
    ref = webref.Reference(valid_thru)
    expected = ref.all_files()
    assert len(expected) > 60
    for path, body in expected.items():
        resp = client.get(P + path)
        assert resp.status_code == 200, path
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8", path
        assert resp.data == body, path
    # second pass is served from the disk cache: same bytes
    for path in list(expected)[:10]:
        assert client.get(P + path).data == expected[path]


def test_reference_rules_hold_in_fixture():
    """The fixture exercises what it claims (guards the tests themselves)."""
    ref = webref.Reference(dt.date(2024, 3, 31))
    assert ref.packages("bioc") == [
        "affy",
        "agahomology",
        "cn.mops",
        "CNAnorm",
        "limma",
        "TReNA",
        "trena",
    ]
    assert ref.packages("annotation") == ["ag.db", "Ag.Db2", "CNAnorm"]
    assert ref.packages("experiment") == []
    assert ref.score("bioc", "limma") == 2  # 13 IPs -> ceil
    assert ref.score("bioc", "agahomology") == 1  # exactly 12
    assert ref.score("bioc", "cn.mops") == 0
    # the window boundary moves with ValidThru: March 2023 counts only on 03-01 / 02-29
    assert webref.Reference(dt.date(2024, 3, 1)).window()[-1] == (2023, 3)
    assert webref.Reference(dt.date(2024, 3, 31)).window()[-1] == (2023, 4)
    assert webref.Reference(dt.date(2024, 3, 31)).window()[0] == (2024, 3)


def test_specific_bytes(db_url, clean_env, monkeypatch):
    """A few literal expectations, independent of the reference code."""
    load(db_url, dt.date(2024, 3, 31))
    c = make_client(db_url, monkeypatch)
    body = c.get(P + "bioc/affy/affy_2009_stats.tab").data.decode()
    assert body.startswith("Year\tMonth\tNb_of_distinct_IPs\tNb_of_downloads\n2009\tJan\t1\t3\n")
    assert "2009\tFeb\t2\t2\n" in body
    assert body.endswith("2009\tDec\t0\t0\n2009\tall\t2\t5\n")  # all IPs = distinct over year
    assert c.get(P + "bioc/bioc_packages.txt").data == (
        b"affy\nagahomology\ncn.mops\nCNAnorm\nlimma\nTReNA\ntrena\n"
    )
    assert c.get(P + "data-annotation/annotation_packages.txt").data == b"ag.db\nAg.Db2\nCNAnorm\n"
    scores = c.get(P + "bioc/bioc_pkg_scores.tab").data.decode().splitlines()
    assert scores[0] == "Package\tDownload_score"
    assert "limma\t2" in scores and "agahomology\t1" in scores and "cn.mops\t0" in scores
    # affy's window Apr 2023..Mar 2024: Apr 2, Dec 1, Jan 1, Feb 1, Mar 2 -> 7/12 -> 1
    assert "affy\t1" in scores
    # empty category
    assert c.get(P + "data-experiment/experiment_packages.txt").data == b""
    assert c.get(P + "data-experiment/experiment_pkg_stats.tab").data == (
        b"Package\tYear\tMonth\tNb_of_distinct_IPs\tNb_of_downloads\n"
    )
    assert c.get(P + "data-experiment/experiment_pkg_scores.tab").data == (
        b"Package\tDownload_score\n"
    )
    exp = c.get(P + "data-experiment/experiment_stats.tab").data.decode().splitlines()
    assert len(exp) == 1 + 13 * (2024 - 2009 + 1)
    assert exp[1] == "2024\tJan\t0\t0" and exp[-1] == "2009\tall\t0\t0"
    wf = c.get(P + "workflows/workflows_stats.tab").data.decode().splitlines()
    assert wf[-1] == "2015\tall\t0\t0"  # first year 2015; the 2014 record is not reported
    # a year with no download in the package: 404; years without downloads left out
    assert c.get(P + "bioc/affy/affy_2010_stats.tab").status_code == 404
    assert "2010\t" not in c.get(P + "bioc/affy/affy_stats.tab").data.decode()
    # before first year, after the data year
    assert c.get(P + "bioc/affy/affy_2008_stats.tab").status_code == 404
    assert c.get(P + "bioc/bioc_2008_stats.tab").status_code == 404
    assert c.get(P + "bioc/bioc_2025_stats.tab").status_code == 404
    assert c.get(P + "bioc/bioc_2010_stats.tab").status_code == 200  # zeros allowed
    assert c.get(P + "workflows/workflows_2014_stats.tab").status_code == 404
    # not a package of the category: known but never downloaded, only before 2009, unknown
    for name in ("silent", "zzOld", "unknownpkg"):
        assert c.get(P + f"bioc/{name}/{name}_stats.tab").status_code == 404
        assert c.get(P + f"bioc/{name}/").status_code == 404


def test_score_window_first_day_of_month(db_url, clean_env, monkeypatch):
    """ValidThru 2024-03-01: March is current, so March 2023 .. Feb 2024 counts."""
    load(db_url, dt.date(2024, 3, 1))
    c = make_client(db_url, monkeypatch)
    scores = dict(
        line.split("\t") for line in c.get(P + "bioc/bioc_pkg_scores.tab").text.splitlines()[1:]
    )
    # affy: Mar23 1, Apr23 2, Dec23 1, Jan24 1, Feb24 1 = 6 -> 1 ; limma 13 -> 2
    assert scores["affy"] == "1" and scores["limma"] == "2"
    assert c.get(P + "data-annotation/Ag.Db2/").status_code == 404  # only after ValidThru
