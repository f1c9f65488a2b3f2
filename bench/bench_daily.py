"""Daily-run benchmark (not a test): ``make bench-daily``.

The daily run as the systemd timer runs it — ``bioc-webstats packages sync --from DIR`` then
``bioc-webstats etl run --source DIR`` as subprocesses, each with its publish — against a year
of statistics, in a throw-away PostgreSQL cluster (``tests/conftest.py``):

1. December 31: 2023 filled with ``--records`` download records (default 36 M, about 3 M a
   month) straight into the table (``INSERT … SELECT generate_series``; skewed: a few
   packages and clients take most downloads, a long tail), ``stats rebuild`` (timed: the
   statistics and seen-sets of that year), then the next day's logs (``--lines``, default
   3 M, 24 hourly files of ``tests/loggen.py``) as the timer would run it: a packages sync
   from a local directory (one package new to devel) and the ETL with every count and the
   publish. Wall time of the two commands against ``zcat`` of the day's files, peak memory of
   the whole process tree (summed RSS and PSS, sampled from /proc).
2. February 1: the same with a year holding only January (``--records`` / 12).

The year's clients include the day's (hashed with the same key as the ETL does), as the
heaviest: the day meets clients the year has seen, and new ones. ``--day-clients`` sets how
many distinct addresses the day has (loggen's default: 400).

Targets: the whole daily run <= 2 x zcat on both days; memory <= 200 MB.
The last line is ``daily run / zcat: <ratio> (Dec 31), <ratio> (Feb 1)``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import loggen  # noqa: E402
from bench_etl import BIN, env_for, run_timed, time_zcat  # noqa: E402
from conftest import new_pg_database, pg_cluster  # noqa: E402 - the tests' throw-away cluster

SYNC_FIXTURE = ROOT / "tests" / "fixtures" / "sync" / "devel"
KEY = b"bench-key"  # env_for's WEBSTATS_IP_HASH_KEY
REPOS = {"bioc": "bioc", "annotation": "data/annotation", "experiment": "data/experiment",
         "workflows": "workflows"}  # fmt: skip
NEW_PACKAGE = "BenchNewPkg"


def run(args: list[str], env: dict[str, str]) -> str:
    """Run a CLI command; its stdout."""
    done = subprocess.run([str(BIN / "bioc-webstats"), *args], env=env, capture_output=True,
                          text=True)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"bioc-webstats {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def day_logs(base: Path, day: dt.date, lines: int, clients: int) -> Path:
    """The day's logs, generated once (cached per generator version)."""
    tag = hashlib.sha256(Path(loggen.__file__).read_bytes()).hexdigest()[:8]
    data = base / f"day-{day}-{lines}-{clients}-{tag}"
    if not (data / ".complete").exists():
        shutil.rmtree(data, ignore_errors=True)
        t0 = time.perf_counter()
        print(f"generating {lines:,} lines for {day} ({clients:,} clients) ...", flush=True)
        loggen.generate(data, days=1, start=day, lines_per_file=lines // 24, seed=2024,
                        truth=False, clients=clients)  # fmt: skip
        (data / ".complete").write_text("")  # not a log name: skipped by the ETL
        print(f"  generated in {time.perf_counter() - t0:.0f}s", flush=True)
    return data


def sync_dir(tmp: Path, url: str) -> Path:
    """A devel manifest listing every open package of the table, and one new package."""
    import sqlalchemy as sa

    out = tmp / "sync"
    shutil.rmtree(out, ignore_errors=True)
    (out).mkdir(parents=True)
    shutil.copy2(SYNC_FIXTURE / "config.yaml", out / "config.yaml")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("SELECT category, package FROM packages WHERE last_release IS NULL")
        ).all()
    engine.dispose()
    names: dict[str, list[str]] = {c: [] for c in REPOS}
    for cat, pkg in rows:
        names[cat].append(pkg)
    names["bioc"].append(NEW_PACKAGE)
    for cat, repo in REPOS.items():
        path = out / "packages" / "devel" / repo / "src" / "contrib" / "PACKAGES"
        path.parent.mkdir(parents=True)
        path.write_text("".join(f"Package: {n}\nVersion: 1.0.0\n\n" for n in sorted(names[cat])))
    return out


def fill(url: str, start: dt.date, days: int, records: int, day_hashes: list[int],
         clients: int) -> float:  # fmt: skip
    """``records`` download records over ``days`` days from ``start``, one ledger row per hour.
    Packages: the table's (and five names not in it) in a fixed random order of popularity,
    drawn as floor(n * u^3) (the first takes 16 %, a long tail); clients: floor(C * u^2.5)
    of ``clients`` (the top 1 % make 16 % of the records), the first ones the day's."""
    import sqlalchemy as sa

    t0 = time.perf_counter()
    engine = sa.create_engine(url)
    hours = days * 24
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO ingested_objects (key, size, name_hour, lines_read, accepted, "
            "rejected, ingested_at) SELECT 'fill/E0FILL.' || to_char(h, 'YYYY-MM-DD-HH24') "
            "|| '.gz', 0, h, 0, 0, 0, now() FROM generate_series(CAST(:s AS timestamp), "
            "CAST(:s AS timestamp) + make_interval(hours => :h - 1), interval '1 hour') h"
        ), {"s": start, "h": hours})  # fmt: skip
        conn.execute(sa.text(
            "CREATE TABLE fill_obj AS SELECT row_number() OVER (ORDER BY name_hour) - 1 AS hr, "
            "id, name_hour::date AS day FROM ingested_objects WHERE key LIKE 'fill/%'"
        ))  # fmt: skip
        conn.execute(sa.text(
            "CREATE TABLE fill_pkg AS SELECT row_number() OVER (ORDER BY md5(package || category))"
            " - 1 AS i, category, package FROM (SELECT category, package FROM packages UNION ALL "
            "SELECT 'bioc', 'Unknownpkg' || g FROM generate_series(0, 4) g) x"
        ))  # fmt: skip
        conn.execute(sa.text("CREATE TABLE fill_client (c int PRIMARY KEY, h bigint)"))
        conn.execute(sa.text("INSERT INTO fill_client VALUES (:c, :h)"),
                     [{"c": i, "h": h} for i, h in enumerate(day_hashes)])  # fmt: skip
        conn.execute(sa.text(
            "INSERT INTO fill_client SELECT g, ('x' || left(md5('fill' || g), 16))::bit(64)"
            "::bigint FROM generate_series(:n, :c - 1) g"
        ), {"n": len(day_hashes), "c": clients})  # fmt: skip
        conn.execute(sa.text("ANALYZE fill_obj, fill_pkg, fill_client"))
    n_pkg = len(loggen.read_packages()) + 5
    chunk = max(1, min(records, 3_000_000))
    for lo in range(0, records, chunk):  # in day order (BRIN on day), a month or so at a time
        hi = min(records, lo + chunk)
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO download_records (object_id, category, package, day, ip_hash, "
                "downloads) SELECT o.id, p.category, p.package, o.day, c.h, 1 + (x.r < 0.3)::int "
                "FROM (SELECT g, (g::bigint * :hours / :n)::int AS hr, "
                "floor(:np * power(random(), 3))::int AS pi, "
                "floor(:nc * power(random(), 2.5))::int AS ci, random() AS r "
                "FROM generate_series(:lo, :hi - 1) g) x "
                "JOIN fill_obj o ON o.hr = x.hr JOIN fill_pkg p ON p.i = x.pi "
                "JOIN fill_client c ON c.c = x.ci ORDER BY x.g"
            ), {"hours": hours, "n": records, "np": n_pkg, "nc": clients, "lo": lo,
                "hi": hi})  # fmt: skip
        print(f"\r  {hi:,} of {records:,} records", end="", flush=True)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE fill_obj, fill_pkg, fill_client"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE download_records"))
    engine.dispose()
    print()
    return time.perf_counter() - t0


def sizes(url: str) -> str:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.connect() as conn:

        def mb(table: str) -> float:
            size = sa.text("SELECT pg_total_relation_size(:t)")
            return conn.execute(size, {"t": table}).scalar() / 1e6

        def n(table: str) -> int:
            return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()

        line = (
            f"download_records {n('download_records'):,} rows {mb('download_records'):,.0f} MB; "
            f"stats_seen {n('stats_seen'):,} rows {mb('stats_seen'):,.0f} MB; "
            f"stats_seen_category {n('stats_seen_category'):,} rows "
            f"{mb('stats_seen_category'):,.0f} MB; record_months {mb('record_months'):.1f} MB"
        )  # fmt: skip
    engine.dispose()
    return line


def scenario(base: str, tmp: Path, label: str, start: dt.date, days: int, records: int,
             logs: Path, args: argparse.Namespace) -> float:  # fmt: skip
    """Fill, rebuild, then the timed daily run; returns its ratio to zcat."""
    url = new_pg_database(base)
    state = tmp / f"state-{label.replace(' ', '')}"
    env = env_for(url, state)
    run(["db", "upgrade"], env)
    run(["packages", "load", str(loggen.PACKAGES_SAMPLE)], env)
    from bioc_webstats.etl.rule import ip_hasher

    hasher = ip_hasher(KEY)
    day_hashes = [hasher(ip.encode()) for ip in loggen.Generator(2024, loggen.read_packages(),
                                                                 args.day_clients).ips]  # fmt: skip
    print(f"{label}: filling {records:,} records over {days} days from {start} ...", flush=True)
    took = fill(url, start, days, records, day_hashes, args.year_clients)
    print(f"  filled in {took:.0f}s")
    t0 = time.perf_counter()
    line = run(["stats", "rebuild"], env).strip()
    print(f"  stats rebuild (CLI, publish included): {time.perf_counter() - t0:.1f}s -- {line}")
    print(f"  {sizes(url)}")
    files = sorted(logs.glob("*.gz"))
    zc, zcpu = time_zcat(files)
    print(f"  zcat of the day ({len(files)} files, {args.lines:,} lines): {zc:.2f}s, "
          f"CPU {zcpu:.1f}s")  # fmt: skip
    sync = sync_dir(tmp, url)
    t_sync, out_sync, mem_sync = run_timed(["packages", "sync", "--from", str(sync)], env)
    t_etl, out_etl, mem_etl = run_timed(["etl", "run", "--source", str(logs)], env)
    total = t_sync + t_etl
    summary = next((ln for ln in out_etl.splitlines() if "etl run:" in ln), "")
    changes = next((ln for ln in out_sync.splitlines() if "changes:" in ln), "")
    print(f"  packages sync: {t_sync:.2f}s ({changes.split('; ', 1)[-1]})")
    print(f"  etl run: {t_etl:.2f}s ({summary.split(': ', 1)[-1]})")
    rss = max(mem_sync.rss, mem_etl.rss) / 1024
    pss = max(mem_sync.pss, mem_etl.pss) / 1024
    print(f"  daily run: {total:.2f}s = {total / zc:.2f} x zcat (target <= 2); peak memory of "
          f"the process tree: PSS {pss:.0f} MB, RSS {rss:.0f} MB (target <= 200)")  # fmt: skip
    print(f"  {sizes(url)}", flush=True)
    return total / zc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=36_000_000, help="records in the full year")
    ap.add_argument("--lines", type=int, default=3_000_000, help="log lines of the new day")
    ap.add_argument("--day-clients", type=int, default=400, help="distinct clients of the day")
    ap.add_argument("--year-clients", type=int, default=3_000_000, help="clients of the year")
    ap.add_argument("--data", type=Path, default=ROOT / "build" / "bench-daily-data")
    ap.add_argument(
        "--pg-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a PostgreSQL server setting, e.g. shared_buffers=1GB (repeatable)",
    )
    args = ap.parse_args()
    settings = dict(s.split("=", 1) for s in args.pg_setting)

    dec31, feb1 = dt.date(2023, 12, 31), dt.date(2024, 2, 1)
    logs = {d: day_logs(args.data, d, args.lines, args.day_clients) for d in (dec31, feb1)}
    if settings:
        print(f"PostgreSQL settings: {settings}")
    with pg_cluster(settings=settings) as base, tempfile.TemporaryDirectory() as tmp:
        r_dec = scenario(base, Path(tmp), "Dec 31", dt.date(2023, 1, 1), 364, args.records,
                         logs[dec31], args)  # fmt: skip
        r_feb = scenario(base, Path(tmp), "Feb 1", dt.date(2024, 1, 1), 31, args.records // 12,
                         logs[feb1], args)  # fmt: skip
    print(f"daily run / zcat: {r_dec:.2f} (Dec 31), {r_feb:.2f} (Feb 1)")


if __name__ == "__main__":
    main()
