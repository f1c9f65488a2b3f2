#!/usr/bin/env python3
"""The site a take-over must serve, rendered from the sample generator's ground truth.

    python molecule/shared/expected_site.py --truth truth.json --valid-thru YYYY-MM-DD --out DIR

Writes under DIR every text file of the web contract that a site holding exactly the truth's
downloads publishes (``<stem>/<cat>_stats.tab``, ``_pkg_stats.tab``, ``_pkg_scores.tab``,
``_packages.txt``, each year's category file, each package's ``_stats.tab`` and year files):
the "legacy site" that ``bioc-webstats compare --against DIR`` checks the instance against.

An independent reading: it works from the generator's counts per (category, package, year,
month), with the contract's rules written out again here (tests/webref.py renders the same
formats from raw records), and shares no code with the app.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from collections import defaultdict
from pathlib import Path

FIRST_YEAR = {"bioc": 2009, "annotation": 2009, "experiment": 2009, "workflows": 2015}
STEM = {
    "bioc": "bioc",
    "annotation": "data-annotation",
    "experiment": "data-experiment",
    "workflows": "workflows",
}
MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
HEADER = "Year\tMonth\tNb_of_distinct_IPs\tNb_of_downloads\n"


def render(truth: dict, valid_thru: dt.date) -> dict[str, bytes]:
    """URL path under /packages/stats/ → bytes, for every file that exists."""
    pkg: dict[tuple[str, str, int, int], tuple[int, int]] = {}
    for cat, name, year, month, ips, dls in truth["package"]:
        if year >= FIRST_YEAR[cat] and dls:
            pkg[(cat, name, year, month)] = (ips, dls)
    per_cat: dict[tuple[str, int, int], tuple[int, int]] = {
        (c, y, m): (i, d) for c, y, m, i, d in truth["category"] if y >= FIRST_YEAR[c]
    }
    names: dict[str, set[str]] = defaultdict(set)
    years: dict[tuple[str, str], set[int]] = defaultdict(set)
    for cat, name, year, _month in pkg:
        names[cat].add(name)
        years[(cat, name)].add(year)

    def block(counts, key, year: int, lead: str = "") -> str:
        out = []
        for m in [*range(1, 13), 0]:
            ips, dls = counts.get((*key, year, m), (0, 0))
            out.append(f"{lead}{year}\t{MONTHS[m - 1] if m else 'all'}\t{ips}\t{dls}\n")
        return "".join(out)

    # the score window: the 12 whole months before the month after ValidThru
    after = valid_thru + dt.timedelta(days=1)
    window, y, m = [], after.year, after.month
    for _ in range(12):
        y, m = (y - 1, 12) if m == 1 else (y, m - 1)
        window.append((y, m))

    files: dict[str, bytes] = {}
    data_year = valid_thru.year
    for cat, stem in STEM.items():
        ordered = sorted(names[cat], key=lambda s: (s.lower(), s))
        all_years = range(data_year, FIRST_YEAR[cat] - 1, -1)
        files[f"{stem}/{cat}_stats.tab"] = (
            HEADER + "".join(block(per_cat, (cat,), yr) for yr in all_years)
        ).encode()
        for yr in range(FIRST_YEAR[cat], data_year + 1):
            files[f"{stem}/{cat}_{yr}_stats.tab"] = (HEADER + block(per_cat, (cat,), yr)).encode()
        stats = "Package\t" + HEADER
        scores = "Package\tDownload_score\n"
        for name in ordered:
            its_years = sorted(years[(cat, name)], reverse=True)
            stats += "".join(block(pkg, (cat, name), yr, lead=name + "\t") for yr in its_years)
            total = sum(pkg.get((cat, name, yy, mm), (0, 0))[0] for yy, mm in window)
            scores += f"{name}\t{math.ceil(total / 12)}\n"
            files[f"{stem}/{name}/{name}_stats.tab"] = (
                HEADER + "".join(block(pkg, (cat, name), yr) for yr in its_years)
            ).encode()
            for yr in its_years:
                files[f"{stem}/{name}/{name}_{yr}_stats.tab"] = (
                    HEADER + block(pkg, (cat, name), yr)
                ).encode()
        files[f"{stem}/{cat}_pkg_stats.tab"] = stats.encode()
        files[f"{stem}/{cat}_pkg_scores.tab"] = scores.encode()
        files[f"{stem}/{cat}_packages.txt"] = "".join(n + "\n" for n in ordered).encode()
    return files


def main() -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--truth", type=Path, required=True)
    ap.add_argument("--valid-thru", type=dt.date.fromisoformat, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    files = render(json.loads(args.truth.read_text()), args.valid_thru)
    for rel, body in files.items():
        path = args.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    print(f"expected_site: {len(files)} files in {args.out}")


if __name__ == "__main__":
    main()
