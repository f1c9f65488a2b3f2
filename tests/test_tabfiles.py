"""The text formats as pure functions (tabfiles), with literal expectations."""

from __future__ import annotations

import datetime as dt

import pytest

from bioc_webstats.web.app import tabfiles as t

H = "Year\tMonth\tNb_of_distinct_IPs\tNb_of_downloads\n"


def test_year_block_fills_months_and_sums_downloads():
    block = t.year_block(2024, {0: (3, 99), 2: (2, 5), 12: (1, 1)})
    lines = block.split("\n")
    assert lines[-1] == ""  # ends with \n
    assert lines[0] == "2024\tJan\t0\t0"
    assert lines[1] == "2024\tFeb\t2\t5"
    assert lines[11] == "2024\tDec\t1\t1"
    assert lines[12] == "2024\tall\t3\t6"  # year IPs from month 0, downloads = sum of months
    assert len(lines) == 14


def test_package_stats_newest_first_and_empty():
    body = t.package_stats_tab({2019: {1: (1, 1), 0: (1, 1)}, 2023: {5: (2, 3), 0: (2, 3)}})
    years = [line.split("\t")[0] for line in body.splitlines()[1:]]
    assert years == ["2023"] * 13 + ["2019"] * 13
    assert t.package_stats_tab({}) == H


def test_category_stats_zero_years():
    body = t.category_stats_tab({2010: {0: (1, 1), 3: (1, 1)}}, 2009, 2011)
    lines = body.splitlines()
    assert lines[0] + "\n" == H and len(lines) == 1 + 3 * 13
    assert lines[1] == "2011\tJan\t0\t0" and lines[-1] == "2009\tall\t0\t0"
    assert "2010\tMar\t1\t1" in lines


def test_pkg_stats_and_scores_and_packages_txt():
    body = t.pkg_stats_tab([("a.b", {2024: {1: (1, 2), 0: (1, 2)}})])
    lines = body.splitlines()
    assert lines[0] == "Package\tYear\tMonth\tNb_of_distinct_IPs\tNb_of_downloads"
    assert lines[1] == "a.b\t2024\tJan\t1\t2" and lines[13] == "a.b\t2024\tall\t1\t2"
    assert body.endswith("\n") and len(lines) == 14
    assert t.pkg_stats_tab([]) == "Package\tYear\tMonth\tNb_of_distinct_IPs\tNb_of_downloads\n"
    assert t.pkg_scores_tab([("x", 0), ("Y", 12)]) == "Package\tDownload_score\nx\t0\nY\t12\n"
    assert t.packages_txt([]) == ""
    assert t.packages_txt(["a", "B"]) == "a\nB\n"


def test_package_order_is_case_insensitive_then_code_point():
    names = ["trena", "CNAnorm", "agahomology", "TReNA", "cn.mops", "ag.db", "Zlib", "abc"]
    assert t.sort_packages(names) == [
        "abc",
        "ag.db",
        "agahomology",
        "cn.mops",
        "CNAnorm",
        "TReNA",
        "trena",
        "Zlib",
    ]


@pytest.mark.parametrize(
    ("valid_thru", "first", "last"),
    [
        ("2024-03-31", (2023, 4), (2024, 3)),  # last day of a month: April is current
        ("2024-03-01", (2023, 3), (2024, 2)),  # first day: March is current
        ("2024-02-29", (2023, 3), (2024, 2)),
        ("2023-12-31", (2023, 1), (2023, 12)),
        ("2024-01-01", (2023, 1), (2023, 12)),
    ],
)
def test_score_window(valid_thru, first, last):
    window = t.score_window(dt.date.fromisoformat(valid_thru))
    assert len(window) == 12 and window[0] == first and window[-1] == last
    assert len(set(window)) == 12


def test_download_score_is_ceil():
    assert t.download_score([]) == 0
    assert t.download_score([0] * 12) == 0
    assert t.download_score([1]) == 1
    assert t.download_score([12]) == 1
    assert t.download_score([13]) == 2
    assert t.download_score([6, 6, 1]) == 2


def test_rank_ties_keep_package_order():
    order = ["a", "B", "c", "d"]
    ranked = t.rank({"a": 1, "B": 5, "c": 5, "d": 0}, order)
    assert ranked == [(1, "B", 5), (2, "c", 5), (3, "a", 1), (4, "d", 0)]


def test_http_date_and_data_as_of():
    assert t.http_date(dt.date(2023, 10, 5)) == "Thu, 05 Oct 2023 00:00:00 GMT"
    assert t.http_date(dt.date(2024, 3, 1)) == "Fri, 01 Mar 2024 00:00:00 GMT"
    assert t.data_as_of(dt.date(2025, 6, 14)) == "Sat, 14 Jun 2025"
