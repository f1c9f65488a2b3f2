#!/usr/bin/env python3
"""Write the sample data set the demo and the molecule scenarios deploy with.

    python molecule/shared/sample_data.py --out DIR [--days 3 --files-per-day 4 ...]

DIR receives:
  logs/             CloudFront log objects from tests/loggen.py (the ETL's source)
  truth.json        the generator's ground truth for those logs (with --history: for the
                    history and the logs together)
  packages.csv      the packages table sample (tests/fixtures/packages_sample.csv), a subset of
                    the history shipped with the release (what a deploy seeds)
  packages-source/  config.yaml + devel PACKAGES files consistent with the shipped history, so
                    the ETL's `packages sync` runs offline and changes nothing after the seed
With --history (the take-over, as production will see it):
  legacy/           download_db_2009.sqlite … : the legacy stats server's history from
                    --history-from to the day before --start (tests/legacygen.py), a few
                    packages with thousands of downloads a month, a long tail with a handful,
                    traffic growing over the years; to load with
                    `bioc-webstats import legacy-db legacy/download_db_*.sqlite`
  cutover           the cut-over day (= --start): `etl/logs_since` (WEBSTATS_ETL_LOGS_SINCE)
  logs/             then hold the days from --start on only, with the same spread
Idempotent: an existing, complete DIR written with the same arguments is left as it is.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "src" / "bioc_webstats" / "data" / "packages.csv"  # `packages seed` loads it
sys.path.insert(0, str(REPO / "tests"))

import legacygen  # noqa: E402  (tests/legacygen.py: the legacy databases, same truth)
import loggen  # noqa: E402  (tests/loggen.py: the ETL's log generator, with its ground truth)

REPO_PATHS = {
    "bioc": "bioc",
    "annotation": "data/annotation",
    "experiment": "data/experiment",
    "workflows": "workflows",
}
RELEASE, DEVEL = "3.22", "3.23"
PACKAGE_S = 1.2  # Zipf exponent of package popularity in --history mode
RECIPE = 4  # bump when what is written changes (a complete DIR of another recipe is rewritten)


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


def write_history(
    out: Path, since: dt.date, cutover: dt.date, days: int, files_per_day: int,
    lines_per_file: int, seed: int,
) -> dict:  # fmt: skip
    """Legacy databases for [since, cutover) and logs for ``days`` days from ``cutover``,
    with one ground truth over both; returns it as truth.json holds it."""
    packages = loggen.read_packages()
    acc = loggen._Acc(set(packages))
    first, last = since.year, cutover.year

    def rows_per_day(day: dt.date) -> int:
        # traffic grows from 60 to 500 rows a day over the years
        return 60 + (440 * (day.year - first)) // max(1, last - first)

    history = legacygen.generate_history(
        out / "legacy", since, cutover, rows_per_day, seed=seed, packages=packages,
        clients=8_000, package_s=PACKAGE_S, acc=acc,
    )  # fmt: skip
    # the logs with the same spread: packages repeated by popularity for loggen.Generator
    spread = legacygen.weighted(packages, PACKAGE_S, seed)
    logs = legacygen.generate_logs(
        out / "logs", cutover, days, files_per_day, lines_per_file, seed, spread, acc,
        since=cutover,
    )  # fmt: skip
    truth = loggen.Truth(lines=logs.rows, counted=logs.downloads)
    acc.fill(truth)
    (out / "cutover").write_text(f"{cutover.isoformat()}\n")
    print(
        f"history: {history.rows} rows in {len(history.files)} legacy databases "
        f"({history.downloads} downloads), logs: {logs.rows} lines in {len(logs.files)} files"
    )
    return {
        **truth.to_json(),
        "cutover": cutover.isoformat(),
        "history_rows": history.rows,
        "history_counted": history.downloads,
    }


def main() -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--files-per-day", type=int, default=4)
    ap.add_argument("--lines-per-file", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--start", default="2024-01-30")
    ap.add_argument(
        "--history",
        action="store_true",
        help="also a legacy history (legacy/) up to the day before --start, the cut-over day",
    )
    ap.add_argument("--history-from", default="2009-01-01")
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
    if args.history:
        truth = write_history(
            args.out, dt.date.fromisoformat(args.history_from),
            dt.date.fromisoformat(args.start), args.days, args.files_per_day,
            args.lines_per_file, args.seed,
        )  # fmt: skip
        (args.out / "truth.json").write_text(json.dumps(truth) + "\n")
    else:
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
