"""ETL benchmark (not a test): ``make bench-etl``.

1. Generate a realistic day of CloudFront logs (default 3,000,000 lines in 24 hourly files;
   kept in ``--data`` between runs).
2. Time ``zcat`` of those files to /dev/null — the baseline of the same run.
3. Time ``bioc-webstats etl run`` of the same files into a throw-away PostgreSQL cluster;
   peak RSS of the largest process from ``/usr/bin/time -v``, and the peak of the summed
   RSS and PSS of all its processes (main + parse workers) sampled from /proc; the same for
   a quarter of the files (memory must not grow with the input).
4. Fill one year with 3,000,000 downloads a month and time a rebuild of it (statistics and
   seen-sets from the records) and the recount a re-ingest touching all its packages costs.
   (The daily run against such a year: ``make bench-daily``.)

Targets: ETL <= 1.5 x zcat, peak RSS <= 200 MB and flat.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

import loggen  # noqa: E402
from conftest import new_pg_database, pg_cluster  # noqa: E402 - the tests' throw-away cluster
from killharness import descendants  # noqa: E402 - the /proc process-tree walk

BIN = Path(sys.executable).parent


def env_for(url: str, state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBSTATS_", "AWS_"))}
    env.update(
        WEBSTATS_DATABASE_URL=url,
        WEBSTATS_STATE_DIR=str(state),
        WEBSTATS_ENV_FILE="/dev/null",
        WEBSTATS_IP_HASH_KEY="bench-key",
    )
    return env


def cli(args: list[str], env: dict[str, str]) -> None:
    subprocess.run([str(BIN / "bioc-webstats"), *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def _kb(pid: int, path: str, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples the memory of a process tree every 50 ms: peak of the summed RSS (shared
    pages counted in every process: an upper bound) and of the summed PSS (shared pages
    split between the processes that map them)."""

    def __init__(self, root: int) -> None:
        self.root, self.rss, self.pss, self.procs = root, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            pids = descendants(self.root)  # the root is /usr/bin/time: not counted
            self.rss = max(self.rss, sum(_kb(p, "status", "VmRSS:") for p in pids))
            self.pss = max(self.pss, sum(_kb(p, "smaps_rollup", "Pss:") for p in pids))
            self.procs = max(self.procs, len(pids))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_timed(args: list[str], env: dict[str, str]) -> tuple[float, str, TreeMemory]:
    """(wall seconds, stdout then stderr, memory of the process tree) of one CLI command under
    ``/usr/bin/time -v`` (its CPU and peak RSS end the output); exits with its stderr on
    failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["/usr/bin/time", "-v", str(BIN / "bioc-webstats"), *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    tree = TreeMemory(proc.pid)
    stdout, stderr = proc.communicate()
    elapsed = time.perf_counter() - t0
    tree.stop()
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return elapsed, stdout + stderr, tree  # packages sync answers on stdout, the ETL logs


def timed_etl(url: str, source: Path, state: Path) -> tuple[float, float, str, TreeMemory]:
    """(seconds, peak RSS MB of the largest process, summary line, memory of the whole process
    tree) of one ``etl run``."""
    env = env_for(url, state)
    cli(["db", "upgrade"], env)
    cli(["packages", "load", str(loggen.PACKAGES_SAMPLE)], env)
    elapsed, output, tree = run_timed(["etl", "run", "--source", str(source)], env)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", output)[1]) / 1024
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", output))
    summary = next((ln for ln in output.splitlines() if "etl run:" in ln), "")
    return elapsed, rss, f"{summary.split(': ', 1)[-1]}; CPU of the ETL processes {cpu:.1f}s", tree


def time_zcat(files: list[Path]) -> tuple[float, float]:
    """Best wall time of two runs, and its CPU seconds."""
    best, cpu = float("inf"), 0.0
    for _ in range(2):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        with open(os.devnull, "wb") as null:
            subprocess.run(["zcat", *map(str, files)], stdout=null, check=True)
        took = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if took < best:
            best = took
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return best, cpu


def recompute_bench(url: str, downloads_per_month: int) -> None:
    """Fill 2023 with ``downloads_per_month`` a month and time the recomputes."""
    import sqlalchemy as sa

    from bioc_webstats.store import db, stats

    db.upgrade(url)
    engine = db.get_engine(url)
    rows_per_month = downloads_per_month * 2 // 3  # records average 1.5 downloads
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO packages (package, category, first_release) "
            "SELECT 'pkg' || g, 'bioc', '3.0' FROM generate_series(0, 2999) g"
        ))  # fmt: skip
        conn.execute(sa.text(
            "INSERT INTO ingested_objects (key, size, name_hour, lines_read, accepted, rejected,"
            " ingested_at) VALUES ('bench', 0, '2023-01-01', 0, 0, 0, now())"
        ))  # fmt: skip
        # Package popularity is skewed (a few packages take most downloads), clients repeat.
        conn.execute(sa.text(
            "INSERT INTO download_records (object_id, category, package, day, ip_hash, downloads) "
            "SELECT 1, 'bioc', 'pkg' || floor(3000 * power(random(), 3))::int, "
            "date '2023-01-01' + (g % 365), "
            "(floor(random() * 400000)::bigint * 2654435761) - 9223372036854775807, "
            "1 + (random() < 0.5)::int "
            "FROM generate_series(0, :n - 1) g"
        ), {"n": rows_per_month * 12})  # fmt: skip
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE"))
    total = rows_per_month * 12
    print(f"  filled 2023: {total:,} records (~{downloads_per_month:,} downloads a month) "
          f"in {time.perf_counter() - t0:.0f}s")  # fmt: skip
    from bioc_webstats.config import load_settings

    t0 = time.perf_counter()
    line = stats.rebuild(load_settings(env_for(url, Path(tempfile.mkdtemp()))))
    print(f"  stats rebuild of 2023 (statistics and seen-sets from the records): "
          f"{time.perf_counter() - t0:.1f}s ({line})")  # fmt: skip
    with db.session_factory(url).begin() as s:
        stats.queue(s, [("bioc", f"pkg{i}", 2023, 5) for i in range(3000)])
        t0 = time.perf_counter()
        res = stats.apply_pending(s)
        took = time.perf_counter() - t0
    print(f"  recount of the year's packages from the records (what a re-ingest touching all "
          f"of them costs; {res.months} months): {took:.1f}s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=3_000_000, help="lines in the day of logs")
    ap.add_argument("--data", type=Path, default=ROOT / "build" / "bench-etl-data")
    ap.add_argument("--month-downloads", type=int, default=3_000_000)
    ap.add_argument("--skip-recompute", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="zcat + etl run pairs to time")
    args = ap.parse_args()

    per_file = args.lines // 24
    # cached per generator version: a changed generator makes new data
    tag = hashlib.sha256(Path(loggen.__file__).read_bytes()).hexdigest()[:8]
    data = args.data / f"day-{args.lines}-{tag}"
    if not (data / ".complete").exists():
        shutil.rmtree(data, ignore_errors=True)
        t0 = time.perf_counter()
        print(f"generating {args.lines:,} lines in 24 files under {data} ...", flush=True)
        loggen.generate(data, days=1, lines_per_file=per_file, seed=2024, truth=False)
        (data / ".complete").write_text("")  # listed and skipped by the ETL: not a log name
        print(f"  generated in {time.perf_counter() - t0:.0f}s")
    files = sorted(data.glob("*.gz"))
    size = sum(f.stat().st_size for f in files)
    print(f"input: {len(files)} files, {args.lines:,} lines, {size / 1e6:.0f} MB gzip")

    with pg_cluster() as base, tempfile.TemporaryDirectory() as tmp:
        ratios = []
        for i in range(args.repeat):
            zc, zcpu = time_zcat(files)
            print(f"zcat to /dev/null:      {zc:6.2f}s  {args.lines / zc:>12,.0f} lines/s  "
                  f"CPU {zcpu:.1f}s")  # fmt: skip
            et, rss, summary, tree = timed_etl(new_pg_database(base), data, Path(tmp) / f"s1-{i}")
            print(f"etl run (PostgreSQL):   {et:6.2f}s  {args.lines / et:>12,.0f} lines/s  "
                  f"peak RSS {rss:.0f} MB (largest process)")  # fmt: skip
            print(f"  all {tree.procs} ETL processes together: peak RSS sum "
                  f"{tree.rss / 1024:.0f} MB (shared pages counted in each), "
                  f"peak PSS sum {tree.pss / 1024:.0f} MB")  # fmt: skip
            print(f"  {summary}")
            print(f"ratio etl/zcat: {et / zc:.2f}  (target <= 1.5)", flush=True)
            ratios.append(et / zc)
        if len(ratios) > 1:
            print(f"ratios over {len(ratios)} runs: best {min(ratios):.2f}, "
                  f"median {statistics.median(ratios):.2f}, worst {max(ratios):.2f}")  # fmt: skip
        quarter = Path(tmp) / "quarter"
        quarter.mkdir()
        for f in files[:6]:
            (quarter / f.name).symlink_to(f)
        et4, rss4, _, tree4 = timed_etl(new_pg_database(base), quarter, Path(tmp) / "s2")
        print(f"etl run of 1/4 of it:   {et4:6.2f}s  peak RSS {rss4:.0f} MB largest process, "
              f"{tree4.rss / 1024:.0f} MB RSS sum / {tree4.pss / 1024:.0f} MB PSS sum "
              f"(full input: {rss:.0f} / {tree.rss / 1024:.0f} / {tree.pss / 1024:.0f} MB; "
              f"target <= 200 MB, flat)")  # fmt: skip
        if not args.skip_recompute:
            print("statistics recompute (PostgreSQL):")
            recompute_bench(new_pg_database(base), args.month_downloads)


if __name__ == "__main__":
    main()
