"""molecule/shared/expected_site.py (the site the take-over scenario compares with) renders,
from aggregated ground truth, the same bytes as tests/webref.py's reference from raw records."""

from __future__ import annotations

import datetime as dt
import sys
from collections import defaultdict
from pathlib import Path

import webref

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "molecule" / "shared"))
import expected_site

VT = dt.date(2024, 3, 31)


def truth_of(records, valid_thru) -> dict:
    """The generator's truth format from raw records: distinct IPs and downloads per
    (category, package, year, month) and (category, year, month); month 0 is the year."""
    pkg, cat = defaultdict(lambda: [set(), 0]), defaultdict(lambda: [set(), 0])
    for c, p, day, ip in webref.counted(records, valid_thru):
        for key, acc in (((c, p, day.year), pkg), ((c, day.year), cat)):
            for month in (day.month, 0):
                acc[(*key, month)][0].add(ip)
                acc[(*key, month)][1] += 1
    return {
        "package": [[*k, len(v[0]), v[1]] for k, v in sorted(pkg.items())],
        "category": [[*k, len(v[0]), v[1]] for k, v in sorted(cat.items())],
    }


def test_same_files_same_bytes_as_the_reference():
    want = webref.Reference(VT).all_files()
    got = expected_site.render(truth_of(webref.RECORDS, VT), VT)
    assert len(want) > 30
    assert sorted(got) == sorted(want)
    differ = [rel for rel in want if got[rel] != want[rel]]
    assert not differ, differ


def test_another_valid_thru_moves_the_score_window():
    later = dt.date(2024, 12, 31)
    a = expected_site.render(truth_of(webref.RECORDS, VT), VT)
    b = expected_site.render(truth_of(webref.RECORDS, later), later)
    assert b == webref.Reference(later).all_files()
    assert a["bioc/bioc_pkg_scores.tab"] != b["bioc/bioc_pkg_scores.tab"]
