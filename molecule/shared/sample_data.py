#!/usr/bin/env python3
"""Write the sample data set the demo and the molecule scenarios deploy with.

    python molecule/shared/sample_data.py --out DIR [--days 3 --files-per-day 4 ...]

DIR receives:
  logs/             CloudFront log objects from tests/loggen.py (the ETL's source)
  truth.json        the generator's ground truth for those logs
  packages.csv      the packages table sample (tests/fixtures/packages_sample.csv), a subset of
                    the history shipped with the release (what a deploy seeds)
  packages-source/  config.yaml + devel PACKAGES files consistent with the shipped history, so
                    the ETL's `packages sync` runs offline and changes nothing after the seed
Idempotent: an existing, complete DIR written with the same arguments is left as it is.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "src" / "bioc_webstats" / "data" / "packages.csv"  # `packages seed` loads it
sys.path.insert(0, str(REPO / "tests"))

import loggen  # noqa: E402  (tests/loggen.py: the ETL's log generator, with its ground truth)

REPO_PATHS = {
    "bioc": "bioc",
    "annotation": "data/annotation",
    "experiment": "data/experiment",
    "workflows": "workflows",
}
RELEASE, DEVEL = "3.22", "3.23"
RECIPE = 2  # bump when what is written changes (a complete DIR of another recipe is rewritten)


def write_packages_source(csv_path: Path, out: Path) -> None:
    """config.yaml and one devel PACKAGES file per category: every open row of the CSV."""
    # (the CSV: the shipped history, which the sample's packages.csv is a subset of)
    devel: dict[str, list[str]] = {cat: [] for cat in REPO_PATHS}
    with csv_path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if not row["last_version"]:
                devel[row["category"]].append(row["package"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(
        f'release_version: "{RELEASE}"\ndevel_version: "{DEVEL}"\n', encoding="utf-8"
    )
    for cat, names in devel.items():
        target = out / "packages" / "devel" / REPO_PATHS[cat] / "src" / "contrib" / "PACKAGES"
        target.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"Package: {n}\nVersion: 1.0.0\n\n" for n in sorted(names))
        target.write_text(body, encoding="utf-8")


def main() -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--files-per-day", type=int, default=4)
    ap.add_argument("--lines-per-file", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--start", default="2024-01-30")
    args = ap.parse_args()

    stamp = args.out / ".complete"
    key = json.dumps(
        {"recipe": RECIPE} | {k: str(v) for k, v in vars(args).items() if k != "out"},
        sort_keys=True,
    )
    if stamp.is_file() and stamp.read_text() == key:
        print(f"sample_data: {args.out} is up to date")
        return
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    loggen.main(
        [
            "--out",
            str(args.out / "logs"),
            "--days",
            str(args.days),
            "--files-per-day",
            str(args.files_per_day),
            "--lines-per-file",
            str(args.lines_per_file),
            "--seed",
            str(args.seed),
            "--start",
            args.start,
            "--truth",
            str(args.out / "truth.json"),
        ]
    )
    shutil.copyfile(loggen.PACKAGES_SAMPLE, args.out / "packages.csv")
    write_packages_source(SHIPPED, args.out / "packages-source")
    stamp.write_text(key)
    print(f"sample_data: wrote {args.out}")


if __name__ == "__main__":
    main()
